"""What is measured, as data: workloads (search x batch x source length), their random sources,
the forced-length search options, and the statistics of repeated timings. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    beam: int  # 1: greedy
    batch: int  # sentences
    src_len: int  # approximate source length in pieces (</s> included)

    @property
    def search(self) -> str:
        return "greedy" if self.beam == 1 else f"beam {self.beam}"

    @property
    def name(self) -> str:
        return f"{self.search}, batch {self.batch}, src ~{self.src_len}"

    @property
    def key(self) -> str:
        return f"b{self.beam}-n{self.batch}-s{self.src_len}"


def workloads(src_lens=(10, 30, 100), batches=(1, 32), beams=(1, 5)) -> list[Workload]:
    return [Workload(beam, batch, s) for beam in beams for batch in batches for s in src_lens]


def make_sources(vocab_size: int, eos: int, pad: int, batch: int, src_len: int, seed: int) -> np.ndarray:
    """[batch, width] int64, left-padded: random ids in [4, vocab) ending with </s>. Batch 1 has
    exactly ``src_len`` pieces; larger batches lengths spread over 0.8 .. 1.2 x src_len."""
    rng = np.random.default_rng(seed)
    if batch == 1:
        lengths = [src_len]
    else:
        lengths = rng.integers(max(2, round(0.8 * src_len)), round(1.2 * src_len) + 1, size=batch).tolist()
    width = max(lengths)
    src = np.full((batch, width), pad, dtype=np.int64)
    for r, n in enumerate(lengths):
        src[r, width - n :] = np.concatenate([rng.integers(4, vocab_size, size=n - 1), [eos]])
    return src


def forced_length_options(beam: int, n: int):
    """Every hypothesis gets exactly n tokens and then </s>: n + 1 decoder steps."""
    from deltalm.options import TranslateOptions

    return TranslateOptions(beam=beam, nbest=1, max_len_a=0.0, max_len_b=n, min_len=n)


def time_stats(seconds) -> dict:
    """n, mean, p50, p90, min, max of a list of durations (seconds in, milliseconds out)."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def plan_cell(
    n_target: int, encode_s: float, step_s: float, budget_s: float, max_reps: int, min_reps: int = 3, min_steps: int = 4
) -> tuple[int, int]:
    """(steps to generate, repetitions) for a cell whose warm-up showed ``encode_s`` and a step of
    ``step_s``: the full ``n_target`` when ``min_reps`` full runs fit the budget (more runs, up to
    ``max_reps``, when they fit); else fewer steps (at least ``min_steps``), ``min_reps`` runs, and
    the caller extrapolates the per-step time to ``n_target`` steps."""
    full = encode_s + (n_target + 1) * step_s
    if full * min_reps <= budget_s:
        return n_target, int(max(min_reps, min(max_reps, budget_s // max(full, 1e-9))))
    per_run = budget_s / min_reps
    steps = int((per_run - encode_s) / max(step_s, 1e-9)) - 1
    return max(min_steps, min(n_target, steps)), min_reps


def random_shortlist(vocab_size: int, seed: int = 0):
    """A shortlist of the default sizes for a random-weight model, where no corpus means anything:
    ``FREQUENT`` random frequent ids and ``PER_SOURCE`` random ids for every source id (no two
    lists sharing ids on purpose: more candidates per batch than real text, whose frequent source
    pieces repeat and whose lists overlap)."""
    from deltalm.shortlist import FREQUENT, PER_SOURCE, Shortlist

    rng = np.random.default_rng(seed)
    frequent = rng.choice(np.arange(4, vocab_size), size=min(FREQUENT, vocab_size - 4), replace=False)
    targets = rng.integers(4, vocab_size, size=vocab_size * PER_SOURCE)
    offsets = np.arange(vocab_size + 1, dtype=np.int64) * PER_SOURCE
    return Shortlist(
        vocab_size,
        np.sort(frequent).astype(np.int64),
        offsets,
        targets.astype(np.int64),
        info={"built_from": f"random ids (seed {seed}): {FREQUENT} frequent, {PER_SOURCE} per source id"},
    )
