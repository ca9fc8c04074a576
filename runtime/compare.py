"""The one comparator: how far one computation is from another, and whether that is acceptable.

Used by export parity (exported graphs against the PyTorch model), the benchmark's agreement
columns (reduced precisions against fp32) and the GPU check (ORT CUDA / TensorRT against ORT CPU),
so that "agreement" means the same thing everywhere. Three levels, each over any two backends of
the common interface (``encode`` / ``step``, see ``backends/__init__.py``):

- ``compare_arrays``: one output tensor against a reference (max abs / max rel error for floats,
  fraction of equal ids and of equal top-1 ids for integer top-k outputs);
- ``compare_steps``: teacher-forced greedy decoding, both backends fed the reference's tokens:
  top-1 agreement of every (row, step) and the largest log-prob difference;
- ``compare_translations``: full searches (greedy and beam), the fraction of sentences with
  identical token ids and the largest score difference among them.

``Thresholds`` turns those numbers into a verdict. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relative errors are taken only where the reference is at least this large in magnitude.
REL_FLOOR = 1e-3


def compare_arrays(got: np.ndarray, want: np.ndarray) -> dict:
    """``got`` against ``want``. Float tensors: ``max_abs`` = max |got - want| (equal infinities
    count as no error, NaN as infinite error) and ``max_rel`` over elements with |want| >=
    REL_FLOOR. Integer tensors (top-k ids): ``agreement`` (equal elements) and ``top1_agreement``
    (equal first column). A shape mismatch gives ``shape_ok`` False and both shapes."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return {"shape_ok": False, "got_shape": list(got.shape), "want_shape": list(want.shape)}
    if np.issubdtype(want.dtype, np.integer) or want.dtype == np.bool_:
        agree = float(np.mean(got == want)) if want.size else 1.0
        top1 = float(np.mean(got[:, 0] == want[:, 0])) if want.ndim == 2 and want.size else agree
        return {"shape_ok": True, "agreement": agree, "top1_agreement": top1}
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    both_inf = np.isinf(g) & np.isinf(w) & (np.sign(g) == np.sign(w))
    with np.errstate(invalid="ignore"):
        diff = np.where(both_inf, 0.0, np.abs(g - w))
    diff = np.nan_to_num(diff, nan=np.inf)
    big = np.abs(w) >= REL_FLOOR
    return {
        "shape_ok": True,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff[big] / np.abs(w[big])).max()) if big.any() else 0.0,
    }


DECISIVE_MARGIN = 0.1  # nats between the reference's best and second-best token


def decisive_top1(
    got_ids: np.ndarray, want_ids: np.ndarray, want_scores: np.ndarray, margin: float = DECISIVE_MARGIN
) -> dict:
    """Top-1 agreement over the rows where the reference's choice is decisive: its best score
    leads the second by at least ``margin``. A near-tie can flip under any rounding (fp16, int8)
    without the model being wrong; a decisive choice must not. [rows, k] ids and scores, best first."""
    want_scores = np.asarray(want_scores, np.float64)
    lead = want_scores[:, 0] - want_scores[:, 1] if want_scores.shape[1] > 1 else np.full(len(want_scores), np.inf)
    rows = np.isfinite(want_scores[:, 0]) & (np.nan_to_num(lead, nan=0.0, posinf=np.inf) >= margin)
    n = int(rows.sum())
    agree = float(np.mean(np.asarray(got_ids)[rows, 0] == np.asarray(want_ids)[rows, 0])) if n else 1.0
    return {"decisive_rows": n, "decisive_top1_agreement": agree}


def compare_steps(reference, candidate, src: np.ndarray, steps: int) -> dict:
    """Greedy decoding of ``src`` [batch, src_len] (left-padded) teacher-forced by ``reference``:
    at every step both backends get the token the reference chose, so one early disagreement does
    not make every later step differ. ``top1_agreement``: fraction of (row, step) whose top-1 ids
    agree (rows whose reference score is -inf excluded: their ids are arbitrary ties);
    ``decisive_rows`` / ``decisive_top1_agreement``: the same over the (row, step) where the
    reference's best token leads its second by at least DECISIVE_MARGIN (``decisive_top1``);
    ``log_probs_max_abs``: the largest difference of the raw log-probs.

    The reference decodes first, all its steps, then the candidate (with the same tokens): the two
    never run at the same time, so a caller can keep only one backend's weights in memory at a
    time. The reference's log-probs wait in a temporary file meanwhile, not in memory."""
    import tempfile

    from .batch import DecoderBatch
    from .search import StepRules, apply_rules

    cfg = reference.cfg
    rows = src.shape[0]

    def rules_at(step: int) -> StepRules:  # no </s> before the last step, only </s> at it
        return StepRules(
            np.full(rows, -1, np.int64),
            np.full(rows, step < steps),
            np.full(rows, step >= steps),
            np.zeros(rows, np.float32),
        )

    def run(backend, tokens_at):
        """The backend's raw log-probs at every step, fed ``tokens_at(step, previous log-probs)``."""
        encoded = backend.encode(src)
        batch = DecoderBatch(cfg, backend.float_dtype, 1)
        batch.admit(encoded.cross, encoded.padding, np.arange(rows))
        lp = None
        for step in range(steps + 1):
            positions = np.full(rows, step, dtype=np.int64)
            batch.fit_positions(step + 1)
            feeds = batch.feeds(
                backend.step_spec, tokens_at(step, lp)[:, None], positions, rules_at(step), want_log_probs=True
            )
            out = backend.run_step(feeds)
            batch.write(out.new_kv, positions)
            lp = np.ascontiguousarray(out.log_probs[:, 0, :], dtype=np.float32)
            yield step, lp

    fed = [np.full(rows, cfg.eos, dtype=np.int64)]  # the token each step is given
    chosen, sure, finite = [], [], []
    with tempfile.TemporaryFile(prefix="deltalm-steps-") as spill:
        shape: tuple[int, ...] | None = None
        for step, lp in run(reference, lambda step, _: fed[step]):
            shape = lp.shape
            spill.write(lp.tobytes())
            ruled = apply_rules(lp, rules_at(step), cfg.pad, cfg.unk, cfg.eos)
            top = ruled.argmax(axis=1)
            finite.append(np.isfinite(ruled.max(axis=1)))
            if ruled.shape[1] > 1:
                top2 = np.partition(ruled, [-2, -1], axis=1)[:, -2:]  # [second, best]
                with np.errstate(invalid="ignore"):
                    lead = top2[:, 1] - top2[:, 0]
            else:
                lead = np.full(rows, np.inf)
            sure.append(finite[-1] & (np.nan_to_num(lead, nan=0.0, posinf=np.inf) >= DECISIVE_MARGIN))
            chosen.append(top)
            fed.append(top.astype(np.int64))
        spill.seek(0)
        same = total = decisive_same = decisive = 0
        worst = 0.0
        for step, lp_b in run(candidate, lambda step, _: fed[step]):
            assert shape is not None  # the reference ran this step too and set it
            lp_a = np.frombuffer(spill.read(4 * int(np.prod(shape))), dtype=np.float32).reshape(shape)
            worst = max(worst, compare_arrays(lp_b, lp_a)["max_abs"])
            top_b = apply_rules(lp_b, rules_at(step), cfg.pad, cfg.unk, cfg.eos).argmax(axis=1)
            agree = top_b == chosen[step]
            same += int(np.sum(agree & finite[step]))
            total += int(finite[step].sum())
            decisive += int(sure[step].sum())
            decisive_same += int(np.sum(agree & sure[step]))
    return {
        "rows": rows,
        "steps": steps + 1,
        "top1_agreement": same / max(total, 1),
        "decisive_rows": decisive,
        "decisive_top1_agreement": decisive_same / decisive if decisive else 1.0,
        "log_probs_max_abs": worst,
    }


def compare_translations(
    reference, candidate, sources: list[np.ndarray], beams=(1, 5), max_len_b: int = 16
) -> list[dict]:
    """Full searches with both backends over ``sources`` (a list of left-padded [batch, src_len]
    batches), one row per beam size: ``sentences``, ``identical_ids`` (fraction of sentences whose
    best hypotheses have the same ids), ``max_score_diff`` (over those identical sentences)."""
    from .options import TranslateOptions
    from .search import generate

    rows = []
    for beam in beams:
        opts = TranslateOptions(beam=beam, nbest=1, max_len_b=max_len_b)
        same = total = 0
        worst = 0.0
        for src in sources:
            for ha, hb in zip(generate(reference, src, opts), generate(candidate, src, opts)):
                total += 1
                if ha[0].tokens == hb[0].tokens:
                    same += 1
                    worst = max(worst, abs(ha[0].score - hb[0].score))
        rows.append({"beam": beam, "sentences": total, "identical_ids": same / max(total, 1), "max_score_diff": worst})
    return rows


@dataclass(frozen=True)
class Thresholds:
    """What counts as agreement. fp32 is held to ``max_abs`` on float outputs; reduced precisions
    (fp16, int8) cannot be, so they are held to top-1 agreement and to the share of sentences
    translated identically instead. Top-1 agreement counts the decisive rows only (the
    reference's best token leads by >= DECISIVE_MARGIN nats: a near-tie may flip under any
    rounding without the model being wrong; a decisive choice must not)."""

    max_abs: float | None = 1e-4  # float outputs (fp32); None: not enforced
    min_top1: float | None = None  # top-1 agreement of teacher-forced steps / top-k ids
    min_identical: float | None = None  # share of sentences with identical ids (end to end)
    min_graph_top1: float | None = None  # top-1 of a graph's top-k ids, pooled over the graph cases

    @classmethod
    def for_precision(cls, precision: str, tolerance: float | None = None) -> Thresholds:
        """The export's verdict, on the check's realistic sentences (text sampled from the model's
        sentencepiece model, or the user's ``--parity-corpus``; ``deltalm.export.parity``).

        fp32: ``tolerance`` (default 1e-4) on every float output, identical translations, and
        every decisive top-1 the same. fp16: decisive top-1 of teacher-forced decoding >= 0.99 and
        >= 50% of the sentences translated identically. int8: decisive top-1 of teacher-forced
        decoding >= 0.97; its sentence identity is reported, not enforced (one flipped near-tie
        changes the rest of a sentence). Both: each graph's top-k top-1, pooled over the graph
        cases (whose step inputs are random: few decisive rows), >= 0.8, a floor against a broken
        graph (the shortlist step is checked only there). ``tolerance`` applies to fp32 only."""
        if precision == "fp32":
            return cls(
                max_abs=1e-4 if tolerance is None else tolerance, min_top1=1.0, min_identical=1.0, min_graph_top1=1.0
            )
        if precision == "fp16":
            return cls(max_abs=None, min_top1=0.99, min_identical=0.5, min_graph_top1=0.8)
        return cls(max_abs=None, min_top1=0.97, min_identical=None, min_graph_top1=0.8)

    def failures(self, what: str, result: dict) -> list[str]:
        """One line per threshold that ``result`` (from one of the compare functions) misses."""
        out = []
        if not result.get("shape_ok", True):
            return [f"{what}: shape {result.get('got_shape')} != {result.get('want_shape')}"]
        if self.max_abs is not None and "max_abs" in result and result["max_abs"] > self.max_abs:
            out.append(f"{what}: max abs error {result['max_abs']:.2e} > {self.max_abs:.0e}")
        top1 = result.get("decisive_top1_agreement", result.get("top1_agreement"))
        if self.min_top1 is not None and top1 is not None and top1 < self.min_top1:
            kind = "decisive top-1" if "decisive_top1_agreement" in result else "top-1"
            out.append(f"{what}: {kind} agreement {top1:.3f} < {self.min_top1}")
        if (
            self.min_identical is not None
            and "identical_ids" in result
            and result["identical_ids"] < self.min_identical
        ):
            out.append(f"{what}: identical sentences {result['identical_ids']:.0%} < {self.min_identical:.0%}")
        return out
