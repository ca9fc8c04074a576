"""Scoring given translations: the log-probability the model assigns to each target token given the
source and the target tokens before it (fairseq's ``SequenceScorer``, ``generate
--score-reference``). numpy only.

A target is scored teacher-forced in one run of the decoder step: the step graph takes a whole
target as its new tokens (``new_len`` = the target's length, an empty cache), so scoring costs one
decoder pass per batch instead of one per token, and returns only the scores of the target's own
tokens (``score_ids``), never a [tokens, vocabulary] tensor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends.interface import Backend, step_feeds
from .errors import DecodeError, InputError
from .graphs import cache_names, cross_names, per_layer
from .tokenizer import collate

# target tokens per decoder run: the run builds their logits ([tokens, vocabulary] float32); this
# many bytes of them at most (one pair is always scored whole, whatever its length)
LOGITS_BUDGET = 256 << 20


@dataclass(frozen=True)
class ScorePair:
    """A (source, target) pair ready to be scored: ``index`` its position in the input, ``src``
    the source ids (``</s>`` included), ``tokens`` the target ids (final ``</s>`` included)."""

    index: int
    src: tuple[int, ...]
    tokens: tuple[int, ...]

    def score(self, positional_scores: Sequence[float]) -> Score:
        """The pair's ``Score``: the mean as fairseq's SequenceScorer takes it, a float32 sum over
        the target's length."""
        total = np.sum(np.asarray(positional_scores, dtype=np.float32), dtype=np.float32)
        return Score(
            self.index, list(self.tokens), float(total / np.float32(len(self.tokens))), list(positional_scores)
        )


@dataclass(frozen=True)
class Score:
    """The score of one (source, target) pair. ``tokens``: the target's dictionary ids with the
    final ``</s>`` (and the forced target prefix, if any); ``positional_scores``: the natural-log
    probability of each of them; ``score``: their mean, as fairseq's SequenceScorer reports it."""

    index: int
    tokens: list[int]
    score: float
    positional_scores: list[float]

    def to_dict(self) -> dict:
        """The record of ``deltalm score --format jsonl`` (also the HTTP API's): -inf scores
        become None (null)."""
        return {
            "id": self.index,
            "tokens": list(self.tokens),
            "score": _json_float(self.score),
            "positional_scores": [_json_float(s) for s in self.positional_scores],
        }

    def to_json(self) -> str:
        """``to_dict()`` as one line of JSON."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def max_target_tokens(vocab_size: int) -> int:
    """Target tokens per decoder run under LOGITS_BUDGET."""
    return max(1, LOGITS_BUDGET // (4 * vocab_size))


def score_pairs(
    backend: Backend, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], max_tokens: int | None = None
) -> list[list[float]]:
    """Positional scores (natural log) of each target (ids, final ``</s>`` included) given its
    source (ids, ``</s>`` included). Pairs are sorted by target length and scored in runs of at
    most ``max_tokens`` padded target tokens (default: ``max_target_tokens``). A failure of the
    backend is a ``DecodeError`` naming the positions of the pairs of the failed run."""
    cfg = backend.cfg
    if "candidates" in backend.step_spec.input_names:
        raise InputError("scoring needs the full decoder step: open the model without a vocabulary shortlist")
    budget = max_tokens or max_target_tokens(cfg.vocab_size)
    order = sorted(range(len(targets)), key=lambda i: (-len(targets[i]), i))
    results: list[list[float]] = [[] for _ in targets]
    start = 0
    while start < len(order):
        width = len(targets[order[start]])  # the longest of the run: it comes first
        count = max(1, min(len(order) - start, budget // max(width, 1)))
        run = order[start : start + count]
        start += count
        try:
            scored = _score_run(backend, [sources[i] for i in run], [targets[i] for i in run])
        except Exception as e:  # the backend's
            raise DecodeError(run, e) from e
        for i, positional in zip(run, scored):
            results[i] = positional
    return results


def _score_run(backend: Backend, sources: list, targets: list) -> list[list[float]]:
    cfg = backend.cfg
    rows, width = len(targets), max(len(t) for t in targets)
    encoded = backend.encode(collate(sources, cfg.pad))
    target = np.full((rows, width), cfg.eos, dtype=np.int64)  # right-padded: later tokens never reach earlier ones
    for r, t in enumerate(targets):
        target[r, : len(t)] = t
    prev = np.concatenate([np.full((rows, 1), cfg.eos, dtype=np.int64), target[:, :-1]], axis=1)  # fairseq: </s> first
    empty = np.zeros((rows, cfg.heads, 0, cfg.head_dim), dtype=backend.float_dtype)
    arrays = dict(
        tokens=prev,
        positions=np.zeros(rows, dtype=np.int64),
        src_padding=encoded.padding,
        forced_tokens=np.full(rows, -1, dtype=np.int64),
        ban_eos=np.zeros(rows, dtype=bool),
        only_eos=np.zeros(rows, dtype=bool),
        unk_penalty=np.zeros(rows, dtype=np.float32),
        score_ids=target[:, :, None],
        want_log_probs=np.array(False),
    )
    arrays |= {name: empty for name in per_layer(cfg, cache_names)}
    arrays |= dict(zip(per_layer(cfg, cross_names), encoded.cross))
    out = backend.run_step(step_feeds(backend.step_spec, **arrays))
    return [[float(x) for x in out.token_scores[r, : len(t), 0]] for r, t in enumerate(targets)]
