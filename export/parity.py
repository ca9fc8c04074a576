"""Numerical parity of exported graphs against the PyTorch model, on shapes different from the
trace shapes, and end-to-end token agreement of ``--backend ort`` with ``--backend torch``.

Errors reported per output: ``max_abs`` = max |ort - torch|; ``max_rel`` = max |ort - torch| /
|torch| over elements with |torch| >= 1e-3 (smaller values make relative error meaningless).
For top-k outputs: the fraction of equal ids, and of rows whose top-1 id agrees.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from deltalm.compare import Thresholds, compare_arrays, compare_translations, decisive_top1
from deltalm.graphs import SHORTLIST_STEP, GraphSpec, cross_names, past_names

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
    return {"output": name} | compare_arrays(got, want)


# The check runs ONNX Runtime with its weight prepacking and its memory arena off, because it
# holds the PyTorch model at the same time. A prepacked session copies every MatMul weight into a
# layout of its own while it is built (the step of deltalm-base: 0.7 GB more while it builds,
# 1.4 GB of anonymous memory after, instead of mapping weights.data); the arena keeps the largest
# activations of any case (the encoder at 508 tokens: 0.6 GB). Neither changes a graph or a weight;
# prepacking moves results by about 1e-6 (measured on base's step log-probs: 2.9e-6), far under
# every threshold of the verdict.
PREPACKING_OFF = ("session.disable_prepacking", "1")


def without_prepacking(session_options):
    """``session_options`` (a function of ``threads``) with ONNX Runtime's prepacking and memory
    arena turned off (see PREPACKING_OFF)."""

    def options(threads: int | None = None):
        so = session_options(threads)
        so.add_session_config_entry(*PREPACKING_OFF)
        so.enable_cpu_mem_arena = False
        return so

    return options


def _ort_session(path):
    import onnxruntime as ort

    from deltalm.backends.ort import session_options

    return ort.InferenceSession(str(path), without_prepacking(session_options)(), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _backend_sessions_without_prepacking():
    """``OrtBackend`` builds its sessions from ``deltalm.backends.ort.session_options``; inside the
    block, with prepacking off (see PREPACKING_OFF)."""
    import deltalm.backends.ort as ort_backend

    real = ort_backend.session_options
    ort_backend.session_options = without_prepacking(real)
    try:
        yield
    finally:
        ort_backend.session_options = real


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
        del enc_sess  # its mapped weights: the step's check does not need them
        k = artifact.graph_spec("decoder_step").outputs[0].shape[1]
        for graph in [g for g in ("decoder_step", SHORTLIST_STEP) if g in artifact.manifest.graphs]:
            rows += _step_parity(model, encoder, artifact, graph, k, step_cases, rng)
    return rows


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
            n = case.sents * case.group
            past_rows = n + 1
            feeds = {
                "tokens": rng.integers(4, cfg.vocab_size, size=n).astype(np.int64),
                "step": np.array(case.past_len, dtype=np.int64),
                "reorder": rng.integers(0, past_rows, size=n).astype(np.int64),
                "sent_index": np.arange(case.sents, dtype=np.int64)[::-1].copy(),
                "src_padding": src == cfg.pad,
            }
            for i in range(cfg.decoder_layers):
                for name in past_names(i):
                    feeds[name] = rng.standard_normal((past_rows, cfg.heads, case.past_len, cfg.head_dim)).astype(np.float32)
            feeds |= dict(zip([name for i in range(cfg.decoder_layers) for name in cross_names(i)], cross, strict=True))
            forced = np.full(n, -1, dtype=np.int64)
            forced[-1] = 5 % cfg.vocab_size
            feeds |= {"forced_tokens": forced, "ban_eos": np.array(False), "only_eos": np.array(False),
                      "unk_penalty": np.array(0.5, dtype=np.float32)}
            if shortlist and artifact.precision == "fp32":
                third = rng.choice(cfg.vocab_size, size=max(k + 3, cfg.vocab_size // 3), replace=False)
                feeds["candidates"] = np.union1d(third, [cfg.eos, cfg.unk, forced[-1]]).astype(np.int64)
            elif shortlist:
                feeds["candidates"] = np.arange(cfg.vocab_size, dtype=np.int64)
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
                        row |= decisive_top1(g, w, want[0])
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
    ref = TorchBackend(model, topk=artifact.graph_spec("decoder_step").outputs[0].shape[1])
    with _backend_sessions_without_prepacking():
        candidate = OrtBackend(artifact)
    return compare_translations(ref, candidate, sources, beams=(1, 5), max_len_b=16)


FLOAT_OUTPUTS = ("log_probs", "topk_scores", "encoder_out", "mlm_logits")


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
    lines = [f"{'graph':<22} {'output':<22} {'case':<48} {'max_abs':>10} {'max_rel':>10} {'ids/top1':>10}"]
    for r in folded.values():
        if not r.get("shape_ok", False):
            tail = "SHAPE MISMATCH"
        elif "max_abs" in r:
            tail = f"{r['max_abs']:>10.2e} {r['max_rel']:>10.2e}"
        else:
            tail = f"{'':>10} {'':>10} {r['agreement']:>4.2f}/{r['top1_agreement']:.2f}"
        lines.append(f"{r['graph']:<22} {r['output']:<22} {r['case'][:48]:<48} {tail}")
    return "\n".join(lines)
