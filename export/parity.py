"""Numerical parity of exported graphs against the PyTorch model, on shapes different from the
trace shapes, and end-to-end token agreement of ``--backend ort`` with ``--backend torch``.

Errors reported per output: ``max_abs`` = max |ort - torch|; ``max_rel`` = max |ort - torch| /
|torch| over elements with |torch| >= 1e-3 (smaller values make relative error meaningless).
For top-k outputs: the fraction of equal ids, and of rows whose top-1 id agrees.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltalm.compare import Thresholds, compare_arrays, compare_translations, decisive_top1
from deltalm.graphs import RULES_MARGIN, SHORTLIST_STEP, GraphSpec, cache_names, cross_names, per_layer

from .graphs import DecoderStepGraph, EncoderGraph


@dataclass(frozen=True)
class EncoderCase:
    lengths: tuple[int, ...]  # real tokens per row (</s> included); rows are left-padded

    @property
    def name(self) -> str:
        return f"batch={len(self.lengths)} lengths={list(self.lengths)}"


@dataclass(frozen=True)
class StepCase:
    lengths: tuple[int, ...]  # source lengths of the step's sentences
    group: int  # hypotheses per sentence
    cache_len: int  # cache capacity; each row is at a random position up to it
    new_len: int = 1  # tokens fed per row

    @property
    def name(self) -> str:
        return f"src={list(self.lengths)} group={self.group} cache={self.cache_len} new={self.new_len}"


def default_cases(cfg) -> tuple[list[EncoderCase], list[StepCase]]:
    near_max = max(cfg.max_positions - 4, 8)
    enc = [EncoderCase((1,)), EncoderCase((7,)), EncoderCase((7, 3, 1)), EncoderCase((near_max, 5, 1))]
    step = [
        StepCase((1,), 1, 0),
        StepCase((7,), 5, 1),
        StepCase((7, 3, 1), 2, 17),
        StepCase((9, 4), 1, 0, new_len=6),  # scoring: a whole target at once
        StepCase((near_max, 2, 5), 1, 3),
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
    return {"output": name} | compare_arrays(got, want)


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
        k = artifact.topk
        for graph in [g for g in ("decoder_step", SHORTLIST_STEP) if g in artifact.manifest.graphs]:
            rows += _step_parity(model, encoder, artifact, graph, k, step_cases, rng)
    return rows


def step_case_feeds(cfg, case: StepCase, cross: list[np.ndarray], padding: np.ndarray, k: int, rng,
                    candidates: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds of the step graph for ``case``: rows at random positions over a random cache, a
    forced token, banned and only-eos rows, unk penalties, scored ids and the full log-probs (as
    float32; an fp16 graph's caller casts its float inputs)."""
    n = len(case.lengths) * case.group
    positions = rng.integers(0, case.cache_len + 1, size=n).astype(np.int64)
    forced = np.full(n, -1, dtype=np.int64)
    forced[-1] = 5 % cfg.vocab_size
    feeds = {
        "tokens": rng.integers(4, cfg.vocab_size, size=(n, case.new_len)).astype(np.int64),
        "positions": positions,
        "src_padding": padding,
        "forced_tokens": forced,
        "ban_eos": np.arange(n) % 3 == 1,
        "only_eos": (np.arange(n) % 4 == 2) & (forced < 0),
        "unk_penalty": (np.arange(n) % 2 * 0.5).astype(np.float32),
        "score_ids": rng.integers(0, cfg.vocab_size, size=(n, case.new_len, 3)).astype(np.int64),
        "want_log_probs": np.array(True),
    }
    for i in range(cfg.decoder_layers):
        for name in cache_names(i):
            feeds[name] = rng.standard_normal((n, cfg.heads, case.cache_len, cfg.head_dim)).astype(np.float32)
    feeds |= dict(zip(per_layer(cfg, cross_names), cross, strict=True))
    if candidates is not None:
        feeds["candidates"] = candidates
    return feeds


def _step_parity(model, encoder, artifact, graph: str, k: int, step_cases, rng) -> list[dict]:
    """One step graph, ORT against the PyTorch step, per case. The shortlist step gets a random
    third of the vocabulary as candidates (eos, unk and the forced token among them) in fp32,
    where every output must match; in fp16 / int8 it gets the whole vocabulary, so that its
    top-1 verdict is taken on the same distributions as the full step's (on a third of a random
    model's near-flat vocabulary, a handful of rows decide the share)."""
    cfg = model.cfg
    shortlist = graph == SHORTLIST_STEP
    step = DecoderStepGraph(model, k, shortlist=shortlist).eval()
    spec: GraphSpec = artifact.graph_spec(graph)
    step_sess = _ort_session(artifact.graph_path(graph))
    float_dtype = np.dtype(spec.outputs[-1].dtype)
    rows = []
    with torch.no_grad():
        for case in step_cases:
            src = make_sources(cfg, case.lengths, rng)
            cross = [t.numpy() for t in encoder(torch.from_numpy(src))[1:]]
            candidates = None
            if shortlist and artifact.precision == "fp32":
                third = rng.choice(cfg.vocab_size, size=max(k + RULES_MARGIN, cfg.vocab_size // 3), replace=False)
                candidates = np.union1d(third, [cfg.eos, cfg.unk, 5 % cfg.vocab_size]).astype(np.int64)
            elif shortlist:
                candidates = np.arange(cfg.vocab_size, dtype=np.int64)
            feeds = step_case_feeds(cfg, case, cross, src == cfg.pad, k, rng, candidates)
            want = [t.numpy() for t in step(*step.inputs({k: torch.from_numpy(np.asarray(a)) for k, a in feeds.items()}))]
            for tspec in spec.inputs:
                if tspec.dtype == "float16":
                    feeds[tspec.name] = feeds[tspec.name].astype(float_dtype)
            got = step_sess.run(spec.output_names, feeds)
            finite = np.isfinite(want[0])  # ids of -inf scores (banned tokens) are arbitrary ties
            for name, g, w in zip(spec.output_names, got, want):
                row = compare(name, g, w)
                if name == "topk_ids":
                    row = compare(name, np.where(finite, g, -1), np.where(finite, w, -1))
                    if row.get("shape_ok"):
                        row |= decisive_top1(g.reshape(-1, g.shape[-1]), w.reshape(-1, w.shape[-1]),
                                             want[0].reshape(-1, want[0].shape[-1]))
                rows.append({"graph": graph, "case": case.name} | row)
    return rows


def end_to_end(model, artifact, sources: list[np.ndarray] | None = None, seed: int = 0) -> list[dict]:
    """Translate the same sources with --backend torch and --backend ort (greedy and beam 5):
    fraction of sentences with identical ids, and the largest score difference."""
    from deltalm.backends.ort import OrtBackend

    from .torch_backend import TorchBackend

    cfg = model.cfg
    rng = np.random.default_rng(seed)
    if sources is None:
        # a few sentences of varied lengths, left-padded; kept small because the PyTorch reference
        # is slow on full-size models (it is the baseline, after all)
        sources = [make_sources(cfg, lengths, rng) for lengths in [(5, 9, 3), (12,)]]
    ref = TorchBackend(model, topk=artifact.topk)
    return compare_translations(ref, OrtBackend(artifact), sources, beams=(1, 5), max_len_b=16)


FLOAT_OUTPUTS = ("log_probs", "topk_scores", "token_scores", "encoder_out", "mlm_logits")


def summarize(rows: list[dict], precision: str, tolerance: float | None, end_to_end_rows: list[dict] = ()) -> tuple[bool, list[str]]:
    """The verdict (``deltalm.compare.Thresholds.for_precision``). Every shape must be right.
    fp32: every float output within ``tolerance`` (max abs) and identical end-to-end ids.
    fp16 / int8: top-1 agreement of the in-graph top-k ids and the share of identical
    end-to-end sentences, at the thresholds stated there."""
    limits = Thresholds.for_precision(precision, tolerance)
    failures = []
    for r in rows:
        what = f"{r['graph']} {r['output']} [{r['case']}]"
        if not r.get("shape_ok", False):
            failures += limits.failures(what, r)
        elif (r["output"] in FLOAT_OUTPUTS and "max_abs" in r) or r["output"] == "topk_ids":
            failures += limits.failures(what, r)
    for r in end_to_end_rows:
        failures += limits.failures(f"end to end, beam {r['beam']}", r)
    return not failures, failures


TABLE_LEGEND = (
    "  max_abs / max_rel: largest absolute / relative difference between ONNX Runtime and PyTorch. The verdict",
    "  reads max_abs of the float outputs (log_probs, topk_scores, encoder_out, mlm_logits) against the tolerance;",
    "  max_rel is for information (large where values are near 0), and so are the K/V rows (worst layer).",
    "  ids/top1: the share of the in-graph top-k ids equal to PyTorch's / of rows whose best id agrees.",
)


def format_summary(rows: list[dict], report: Path | None, verbose: bool) -> str:
    """One line: how much was compared and the largest differences; where the table is."""
    checked = [r for r in rows if r.get("shape_ok", False)]
    floats = [r for r in checked if r["output"] in FLOAT_OUTPUTS and "max_abs" in r]
    ids = [r for r in checked if "agreement" in r]
    parts = [f"{len(rows)} outputs compared over {len({(r['graph'], r['case']) for r in rows})} graph cases"]
    if floats:
        worst = max(floats, key=lambda r: r["max_abs"])
        parts.append(f"largest difference {worst['max_abs']:.1e} ({worst['graph']} {worst['output']})")
    if ids:
        parts.append(f"top-k ids equal >= {min(r['agreement'] for r in ids):.0%}, best id agrees >= "
                     f"{min(r['top1_agreement'] for r in ids):.0%}")
    if not verbose:
        parts.append(f"every output and case in {report} (--verbose prints the table)" if report is not None
                     else "--verbose prints every output and case")
    return "parity summary: " + "; ".join(parts)


def format_table(rows: list[dict]) -> str:
    """One line per graph output and case; the K/V outputs of all layers are folded into one line
    (their worst error). parity.json keeps every output."""
    folded: dict[tuple, dict] = {}
    for r in rows:
        out = r["output"]
        for prefix in ("new_", "cross_"):
            if out.startswith(prefix):
                out = prefix + "kv (all layers)"
        key = (r["graph"], r["case"], out)
        if key in folded and "max_abs" in r and "max_abs" in folded[key]:
            prev = folded[key]
            folded[key] = prev | {"max_abs": max(prev["max_abs"], r["max_abs"]), "max_rel": max(prev["max_rel"], r["max_rel"])}
        elif key not in folded or not r.get("shape_ok", False):
            folded[key] = r | {"output": out}
    lines = [f"{'graph':<22} {'output':<22} {'case':<48} {'max_abs':>10} {'max_rel':>10} {'ids/top1':>10}",
             *TABLE_LEGEND]
    for r in folded.values():
        if not r.get("shape_ok", False):
            tail = "SHAPE MISMATCH"
        elif "max_abs" in r:
            tail = f"{r['max_abs']:>10.2e} {r['max_rel']:>10.2e}"
        else:
            tail = f"{'':>10} {'':>10} {r['agreement']:>4.2f}/{r['top1_agreement']:.2f}"
        lines.append(f"{r['graph']:<22} {r['output']:<22} {r['case'][:48]:<48} {tail}")
    return "\n".join(lines)
