"""Numerical parity of exported graphs against the PyTorch model, on shapes different from the
trace shapes, and end-to-end token agreement of ``--backend ort`` with ``--backend torch``.

Errors reported per output: ``max_abs`` = max |ort - torch|; ``max_rel`` = max |ort - torch| /
|torch| over elements with |torch| >= 1e-3 (smaller values make relative error meaningless).
For top-k outputs: the fraction of equal ids, and of rows whose top-1 id agrees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from deltalm.graphs import GraphSpec

from .graphs import DecoderStepGraph, EncoderGraph


@dataclass(frozen=True)
class EncoderCase:
    lengths: tuple[int, ...]  # real tokens per row (</s> included); rows are left-padded

    @property
    def name(self) -> str:
        return f"batch={len(self.lengths)} lengths={list(self.lengths)}"


@dataclass(frozen=True)
class StepCase:
    lengths: tuple[int, ...]  # source lengths of the encoder batch
    sents: int  # live sentences (the first `sents` rows of the batch, in reverse order)
    group: int  # hypotheses per sentence
    past_len: int

    @property
    def name(self) -> str:
        return f"src={list(self.lengths)} sents={self.sents} group={self.group} past_len={self.past_len}"


def default_cases(cfg) -> tuple[list[EncoderCase], list[StepCase]]:
    near_max = max(cfg.max_positions - 4, 8)
    enc = [EncoderCase((1,)), EncoderCase((7,)), EncoderCase((7, 3, 1)), EncoderCase((near_max, 5, 1))]
    step = [
        StepCase((1,), 1, 1, 0),
        StepCase((7,), 1, 5, 1),
        StepCase((7, 3, 1), 3, 2, 17),
        StepCase((9, 4, 6), 2, 1, 0),
        StepCase((near_max, 2, 5), 3, 1, 1),
    ]
    return enc, step


def make_sources(cfg, lengths, rng) -> np.ndarray:
    width = max(lengths)
    src = np.full((len(lengths), width), cfg.pad, dtype=np.int64)
    for r, n in enumerate(lengths):
        body = rng.integers(4, cfg.vocab_size, size=n - 1) if n > 1 else np.zeros(0, dtype=np.int64)
        src[r, width - n :] = np.concatenate([body, [cfg.eos]])
    return src


def compare(name: str, got: np.ndarray, want: np.ndarray) -> dict:
    if got.shape != want.shape:
        return {"output": name, "shape_ok": False, "got_shape": list(got.shape), "want_shape": list(want.shape)}
    if np.issubdtype(want.dtype, np.integer):
        agree = float(np.mean(got == want)) if want.size else 1.0
        top1 = float(np.mean(got[:, 0] == want[:, 0])) if want.ndim == 2 and want.size else agree
        return {"output": name, "shape_ok": True, "agreement": agree, "top1_agreement": top1}
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    with np.errstate(invalid="ignore"):
        diff = np.where(both_inf, 0.0, np.abs(got - want))
    diff = np.nan_to_num(diff, nan=np.inf)
    big = np.abs(want) >= 1e-3
    return {
        "output": name,
        "shape_ok": True,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff[big] / np.abs(want[big])).max()) if big.any() else 0.0,
    }


def _ort_session(path):
    import onnxruntime as ort

    from deltalm.backends.ort import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def graph_parity(model, artifact, seed: int = 0) -> list[dict]:
    """Every output of every graph, ORT (CPU) against the PyTorch graphs, per case."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    enc_cases, step_cases = default_cases(cfg)
    encoder = EncoderGraph(model).eval()
    enc_spec: GraphSpec = artifact.graph_spec("encoder")
    enc_sess = _ort_session(artifact.graph_path("encoder"))
    rows = []
    with torch.no_grad():
        for case in enc_cases:
            src = make_sources(cfg, case.lengths, rng)
            want = [t.numpy() for t in encoder(torch.from_numpy(src))]
            got = enc_sess.run(enc_spec.output_names, {"src_tokens": src})
            for name, g, w in zip(enc_spec.output_names, got, want):
                rows.append({"graph": "encoder", "case": case.name} | compare(name, g, w))
        if not cfg.is_encoder_decoder:
            return rows
        step = DecoderStepGraph(model, artifact.graph_spec("decoder_step").outputs[0].shape[1]).eval()
        spec: GraphSpec = artifact.graph_spec("decoder_step")
        step_sess = _ort_session(artifact.graph_path("decoder_step"))
        float_dtype = np.dtype(spec.outputs[-1].dtype)
        for case in step_cases:
            src = make_sources(cfg, case.lengths, rng)
            cross = [t.numpy() for t in encoder(torch.from_numpy(src))[1:]]
            n = case.sents * case.group
            past_rows = n + 1
            past = [rng.standard_normal((past_rows, cfg.heads, case.past_len, cfg.head_dim)).astype(np.float32)
                    for _ in range(2 * cfg.decoder_layers)]
            forced = np.full(n, -1, dtype=np.int64)
            forced[-1] = 5 % cfg.vocab_size
            inputs = [
                rng.integers(4, cfg.vocab_size, size=n).astype(np.int64),
                np.array(case.past_len, dtype=np.int64),
                rng.integers(0, past_rows, size=n).astype(np.int64),
                np.arange(case.sents, dtype=np.int64)[::-1].copy(),
                src == cfg.pad,
                *past,
                *cross,
                forced,
                np.array(False),
                np.array(False),
                np.array(0.5, dtype=np.float32),
            ]
            want = [t.numpy() for t in step(*[torch.from_numpy(np.asarray(a)) for a in inputs])]
            feeds = {}
            for tspec, a in zip(spec.inputs, inputs):
                feeds[tspec.name] = a.astype(float_dtype) if tspec.dtype == "float16" else a
            got = step_sess.run(spec.output_names, feeds)
            finite = np.isfinite(want[0])  # ids of -inf scores (banned tokens) are arbitrary ties
            for name, g, w in zip(spec.output_names, got, want):
                if name == "topk_ids":
                    g, w = np.where(finite, g, -1), np.where(finite, w, -1)
                rows.append({"graph": "decoder_step", "case": case.name} | compare(name, g, w))
    return rows


def end_to_end(model, artifact, sources: list[np.ndarray] | None = None, seed: int = 0) -> list[dict]:
    """Translate the same sources with --backend torch and --backend ort (greedy and beam 5):
    fraction of sentences with identical ids, and the largest score difference."""
    from deltalm.backends.ort import OrtBackend
    from deltalm.search import SearchOptions, generate

    from .torch_backend import TorchBackend

    cfg = model.cfg
    rng = np.random.default_rng(seed)
    if sources is None:
        # a few sentences of varied lengths, left-padded; kept small because the PyTorch reference
        # is slow on full-size models (it is the baseline, after all)
        sources = [make_sources(cfg, lengths, rng) for lengths in [(5, 9, 3), (12,)]]
    ref = TorchBackend(model, topk=artifact.graph_spec("decoder_step").outputs[0].shape[1])
    ort_backend = OrtBackend(artifact)
    results = []
    for beam in (1, 5):
        opts = SearchOptions(beam=beam, nbest=1, max_len_b=16)
        same = total = 0
        worst = 0.0
        t_ref = t_ort = 0.0
        for src in sources:
            t0 = time.perf_counter()
            a = generate(ref, src, opts)
            t1 = time.perf_counter()
            b = generate(ort_backend, src, opts)
            t_ort += time.perf_counter() - t1
            t_ref += t1 - t0
            for ha, hb in zip(a, b):
                total += 1
                if ha[0].tokens == hb[0].tokens:
                    same += 1
                    worst = max(worst, abs(ha[0].score - hb[0].score))
        results.append({"beam": beam, "sentences": total, "identical_ids": same / total,
                        "max_score_diff": worst, "torch_s": round(t_ref, 3), "ort_s": round(t_ort, 3)})
    return results


def summarize(rows: list[dict], precision: str, tolerance: float) -> tuple[bool, list[str]]:
    """fp32: every float output within ``tolerance`` (max abs) and every shape right.
    fp16 / int8: shapes right; errors and top-1 agreement reported, not enforced."""
    failures = []
    for r in rows:
        if not r.get("shape_ok", False):
            failures.append(f"{r['graph']} {r['output']} [{r['case']}]: shape {r.get('got_shape')} != {r.get('want_shape')}")
        elif precision == "fp32" and "max_abs" in r and r["output"] in ("log_probs", "topk_scores", "encoder_out", "mlm_logits") and r["max_abs"] > tolerance:
            failures.append(f"{r['graph']} {r['output']} [{r['case']}]: max abs error {r['max_abs']:.2e} > {tolerance:.0e}")
    return not failures, failures


def format_table(rows: list[dict]) -> str:
    """One line per graph output and case; the K/V outputs of all layers are folded into one line
    (their worst error). parity.json keeps every output."""
    folded: dict[tuple, dict] = {}
    for r in rows:
        out = r["output"]
        for prefix in ("present_", "cross_"):
            if out.startswith(prefix):
                out = prefix + "kv (all layers)"
        key = (r["graph"], r["case"], out)
        if key in folded and "max_abs" in r and "max_abs" in folded[key]:
            prev = folded[key]
            folded[key] = prev | {"max_abs": max(prev["max_abs"], r["max_abs"]), "max_rel": max(prev["max_rel"], r["max_rel"])}
        elif key not in folded or not r.get("shape_ok", False):
            folded[key] = r | {"output": out}
    lines = [f"{'graph':<13} {'output':<22} {'case':<48} {'max_abs':>10} {'max_rel':>10} {'ids/top1':>10}"]
    for r in folded.values():
        if not r.get("shape_ok", False):
            tail = "SHAPE MISMATCH"
        elif "max_abs" in r:
            tail = f"{r['max_abs']:>10.2e} {r['max_rel']:>10.2e}"
        else:
            tail = f"{'':>10} {'':>10} {r['agreement']:>4.2f}/{r['top1_agreement']:.2f}"
        lines.append(f"{r['graph']:<13} {r['output']:<22} {r['case'][:48]:<48} {tail}")
    return "\n".join(lines)
