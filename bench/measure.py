"""Measurement, in the child process of one backend: load it (seconds, RSS), then every workload
as forced-length generations (encoder and per-step times, tokens/s, peak RSS while translating);
and two checks run from the parent: the memory of ``deltalm translate``, and the agreement of
reduced precisions with fp32 through the one comparator (deltalm.compare)."""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .children import PeakMeter, current_rss_mb, machine_busy_s, peak_rss_mb, reset_peak_rss, run_cli, wait_for_quiet
from .models import graph_bytes, loaded_files_bytes
from .progress import log
from .workloads import Workload, forced_length_options, make_sources, plan_cell, time_stats

CONTENDED = 0.10  # a cell during which other processes took more of the CPU than this is marked


class TimedBackend:
    """Wraps a backend and records the wall time of every ``encode`` and ``run_step`` call. The
    backends return host arrays, so a call's wall time includes its device work."""

    def __init__(self, inner):
        self.inner = inner
        self.cfg = inner.cfg
        self.topk = inner.topk
        self.step_spec = inner.step_spec
        self.float_dtype = inner.float_dtype
        self.limits = inner.limits
        self.encode_s: list[float] = []
        self.step_s: list[float] = []

    def reset(self) -> None:
        self.encode_s, self.step_s = [], []

    def encode(self, src_tokens):
        t0 = time.perf_counter()
        state = self.inner.encode(src_tokens)
        self.encode_s.append(time.perf_counter() - t0)
        return state

    def run_step(self, feeds):
        t0 = time.perf_counter()
        out = self.inner.run_step(feeds)
        self.step_s.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.inner.close()


def generate_timed(timed: TimedBackend, src: np.ndarray, beam: int, n: int) -> dict:
    """One forced-length generation: total, encode and per-step times (seconds)."""
    from deltalm.search import generate

    timed.reset()
    t0 = time.perf_counter()
    hyps = generate(timed, src, forced_length_options(beam, n))
    total = time.perf_counter() - t0
    lengths = {len(h[0].tokens) for h in hyps}
    if lengths != {n + 1}:
        raise RuntimeError(f"forced length {n} + </s> not respected: lengths {sorted(lengths)}")
    return {"total_s": total, "encode_s": timed.encode_s[0], "step_s": list(timed.step_s)}


def measure_cell(
    timed: TimedBackend,
    wl: Workload,
    src: np.ndarray,
    n_target: int,
    budget_s: float,
    max_reps: int,
    min_reps: int = 3,
    meter: PeakMeter | None = None,
) -> dict:
    """Warm-up, then repeated forced-length generations of one workload. Figures are medians
    over the repetitions; step latencies pool the steps of every repetition. With ``meter``, the
    cell's own peak RSS (warm-up included) and the RSS before and after it."""
    meter = meter or PeakMeter()
    rss_before = meter.start()
    busy0, cpu0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    warm = generate_timed(timed, src, wl.beam, min(n_target, 2))  # shapes, allocations, caches
    warm_step = float(np.median(warm["step_s"][1:] or warm["step_s"]))
    steps, reps = plan_cell(n_target, warm["encode_s"], warm_step, budget_s, max_reps, min_reps)
    runs = [generate_timed(timed, src, wl.beam, steps) for _ in range(reps)]
    wall = time.perf_counter() - t0
    peak = meter.stop()
    others = max(0.0, machine_busy_s() - busy0 - (time.process_time() - cpu0)) / (wall * (os.cpu_count() or 1))
    extrapolated = steps < n_target
    # per run, the time of the whole loop beyond the encoder, spread over its steps (search and
    # host work between steps included), scaled to n_target + 1 steps when fewer were measured
    totals = [r["encode_s"] + (r["total_s"] - r["encode_s"]) * (n_target + 1) / (steps + 1) for r in runs]
    total = float(np.median(totals))
    all_steps = [s for r in runs for s in r["step_s"]]
    enc = time_stats(r["encode_s"] for r in runs)
    steps_stats = time_stats(all_steps)
    first = float(np.median([r["encode_s"] + r["step_s"][0] for r in runs]))
    tokens = wl.batch * (n_target + 1)  # every sentence's output: n tokens and </s>
    return {
        "workload": wl.key,
        "name": wl.name,
        "beam": wl.beam,
        "batch": wl.batch,
        "src_len": wl.src_len,
        "src_width": int(src.shape[1]),
        "n_target": n_target,
        "steps_measured": steps + 1,
        "reps": reps,
        "extrapolated": extrapolated,
        "total_s": total,
        "tokens_per_s": tokens / total,
        "sentences_per_s": wl.batch / total,
        "encoder": enc,
        "step": steps_stats,
        "first_step_ms": float(np.median([r["step_s"][0] for r in runs]) * 1e3),
        "time_to_first_token_ms": first * 1e3,
        "loop_overhead_ms_per_step": float(
            np.median([(r["total_s"] - r["encode_s"] - sum(r["step_s"])) / (steps + 1) for r in runs]) * 1e3
        ),
        "rss_before_cell_mb": round(rss_before),
        "peak_rss_cell_mb": round(peak),
        "rss_after_cell_mb": round(current_rss_mb()),
        "others_cpu_share": round(others, 3),  # CPU other processes took meanwhile (/ wall x cores)
    }


# --- one backend's child process -------------------------------------------------------------------

_BACKEND_MODULES = {"torch": ("torch", "deltalm.export.torch_backend"), "trt": ("deltalm.backends.trt",)}


def import_backend(kind: str) -> None:
    """Import what a backend needs before its load is timed: load time is open artifact -> ready
    to translate, not Python's import of onnxruntime or torch."""
    for name in _BACKEND_MODULES.get(kind, ("onnxruntime", "deltalm.backends.ort")):
        importlib.import_module(name)


def load_bench_backend(kind: str, artifact: str, threads: int, shortlist: bool = False):
    """kind: torch | ort-fp32 | ort-fp16 | ort-int8 | ort-cuda | trt. ``shortlist``: ort with the
    shortlist step graph."""
    from deltalm.backends import load_backend

    if kind == "torch":
        return load_backend("torch", artifact, threads=threads)
    if kind == "trt":
        return load_backend("trt", artifact)
    device = "cuda" if kind == "ort-cuda" else "cpu"
    return load_backend("ort", artifact, device=device, threads=threads, shortlist=shortlist)


def load_figures(kind: str, artifact: str, threads: int, shortlist: bool = False):
    """(backend, figures): the backend loaded, with load seconds, RSS before and after, the peak
    RSS of the load and the megabytes of the files it loads. Resets the peak RSS afterwards, so
    that the process's next peak is the peak while translating."""
    import_backend(kind)
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    backend = load_bench_backend(kind, artifact, threads, shortlist)
    load_s = time.perf_counter() - t0
    figures = {
        "load_s": load_s,
        "rss_before_load_mb": rss0,
        "rss_after_load_mb": current_rss_mb(),
        "peak_rss_load_mb": peak_rss_mb(),
        "model_files_mb": loaded_files_bytes(Path(artifact), kind) / 2**20,
        "peak_reset": reset_peak_rss(),
    }
    return backend, figures


def translating_peak(figures: dict, meter: PeakMeter) -> dict:
    """The peak RSS while translating (since the load), and of the whole process."""
    now = meter.overall
    whole = max(now, figures["peak_rss_load_mb"])
    return {"peak_rss_translating_mb": now if figures["peak_reset"] else None, "peak_rss_mb": whole}


def worker(spec: dict) -> dict:
    """Every workload of one backend: spec {kind, artifact, n, workloads [[beam, batch, src]],
    budget_s, max_reps, min_reps, seed, threads}."""
    backend, figures = load_figures(spec["kind"], spec["artifact"], spec["threads"])
    timed = TimedBackend(backend)
    meter = PeakMeter()
    cfg = backend.cfg
    if spec["workloads"]:  # the process's first generation pays one-time costs (thread pools, first pages)
        beam, batch, src_len = spec["workloads"][0]
        generate_timed(timed, make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=1), beam, 2)
    cells = []
    for beam, batch, src_len in spec["workloads"]:
        wl = Workload(beam, batch, src_len)
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=spec["seed"] + 1000 * batch + src_len)
        budget = (
            spec["budget_s"].get(wl.key, spec["budget_s"]["default"])
            if isinstance(spec["budget_s"], dict)
            else spec["budget_s"]
        )
        quiet_wait = spec.get("quiet_wait_s", 0.0)
        cell = None
        for attempt in range(2 if quiet_wait else 1):  # one retry when other processes got busy meanwhile
            quiet = wait_for_quiet(quiet_wait) if quiet_wait else None
            t1 = time.perf_counter()
            again = measure_cell(timed, wl, src, spec["n"], budget, spec["max_reps"], spec.get("min_reps", 3), meter)
            again |= {"cell_wall_s": round(time.perf_counter() - t1, 1), "quiet_gate": quiet, "attempt": attempt + 1}
            if cell is None or again["others_cpu_share"] < cell["others_cpu_share"]:
                cell = again
            if cell["others_cpu_share"] <= CONTENDED:
                break
        cells.append(cell)
        log(
            f"  {spec['kind']:<9} {wl.name:<30} {cell['tokens_per_s']:9.1f} tok/s  step p50 "
            f"{cell['step']['p50_ms']:8.2f} ms  peak RSS {cell['peak_rss_cell_mb']} MB"
            f"{'  (extrapolated)' if cell['extrapolated'] else ''}  [{cell['cell_wall_s']}s]"
        )
    return {"kind": spec["kind"], **figures, **translating_peak(figures, meter), "cells": cells}


# --- checks run from the parent --------------------------------------------------------------------


def memory_check(artifact_dir: Path, lines: int, n: int, threads: int, work: Path) -> dict:
    """``deltalm translate`` (ort, beam 5, batch 32) of ``lines`` corpus sentences forced to n
    tokens, in a child (its record under ``work``): its peak RSS against the bytes of the graphs
    it loads."""
    from deltalm.export.toy_data import toy_corpus

    text = "\n".join(toy_corpus()[:lines]) + "\n"
    cmd = [
        "translate",
        str(artifact_dir),
        "--backend",
        "ort",
        "--beam",
        "5",
        "--batch-size",
        "32",
        "--max-len-b",
        str(n),
        "--min-len",
        str(n),
        "--no-progress",
        "--threads",
        str(threads),
    ]
    peak, res = run_cli(cmd, work / "memory-check.json", stdin=text)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    weights = graph_bytes(artifact_dir)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    cfg = manifest["model"]
    precision = manifest.get("precision", "fp32")
    # the model's own parameters once (fp32): what the graphs would hold without the second
    # copy of the embedding table (the encoder and the step graph each carry one)
    table = cfg["vocab_size"] * cfg["embed_dim"] * 4
    unique = max(weights - table, 1)
    out = {
        "lines": lines,
        "beam": 5,
        "batch_size": 32,
        "tokens": n,
        "precision": precision,
        "wall_s": round(res.wall_s, 1),
        "peak_rss_mb": peak,
        "graph_files_mb": weights / 2**20,
        "unique_weights_mb": unique / 2**20,
        "ratio_to_graph_files": peak * 2**20 / weights,
        "ratio_to_unique_weights": peak * 2**20 / unique,
    }
    head = f"`deltalm translate` of {lines} sentences (ort {precision}, beam 5, batch 32, {n} tokens forced): peak RSS "
    if weights < 64 * 2**20:  # the interpreter and libraries dominate: a ratio to the weights says nothing
        out["summary"] = (
            f"{head}{out['peak_rss_mb']:.0f} MB, mostly Python and its libraries (the graphs it loads "
            f"are {out['graph_files_mb']:.1f} MB)."
        )
        return out
    out["summary"] = (
        f"{head}{out['peak_rss_mb']:.0f} MB = {out['ratio_to_graph_files']:.2f}x the {out['graph_files_mb']:.0f} MB of "
        f"graphs it loads (encoder + decoder_step), {out['ratio_to_unique_weights']:.2f}x the "
        f"{out['unique_weights_mb']:.0f} MB of distinct weights (the embedding table counted once)."
    )
    return out


def measure_agreement(artifacts: dict, spm: Path, dict_path: Path, threads: int) -> dict:
    """int8 / fp16 against fp32 on corpus sentences, through deltalm.compare: top-1 agreement of
    teacher-forced greedy steps (``compare_steps``, 20 tokens) and the share of sentences
    translated identically (``compare_translations``, greedy and beam 5). Meaningful for the
    demo model only: a random model's distributions are nearly flat."""
    from deltalm.backends.ort import OrtBackend
    from deltalm.compare import compare_steps, compare_translations
    from deltalm.export.toy_data import toy_corpus
    from deltalm.tokenizer import Tokenizer

    tok = Tokenizer(str(spm), str(dict_path))
    sentences = [tok.encode(s) for s in toy_corpus()[::7][:48]]
    src = tok.collate(sentences)
    batches = [tok.collate(sentences[i : i + 16]) for i in range(0, len(sentences), 16)]
    ref = OrtBackend.from_artifact(artifacts["fp32"], threads=threads)
    out = {}
    for p in ("int8", "fp16"):
        if p in artifacts:
            other = OrtBackend.from_artifact(artifacts[p], threads=threads)
            out[p] = compare_steps(ref, other, src, 20)
            out[p]["translations"] = compare_translations(ref, other, batches, beams=(1, 5), max_len_b=20)
    return out


def shortlist_agreement(artifact: Path, threads: int):
    """(shortlist, agreement) on the demo model: a shortlist built from the model's own beam-5
    translations of half the toy corpus (``shortlist_from_corpus``), applied to the other half;
    per beam (1, 5), the share of sentences whose ids are those of the full vocabulary, and the
    largest score difference among them."""
    from deltalm.export.toy_data import toy_corpus
    from deltalm.shortlist import shortlist_from_corpus
    from deltalm.translator import Translator

    corpus = toy_corpus()
    train, test = corpus[::2], corpus[1::2]
    agreement = {"sentences": len(test), "built_from_sentences": len(train)}
    with Translator(artifact, threads=threads) as full:
        shortlist = shortlist_from_corpus(full, train, options={"beam": 5})
        with Translator(artifact, threads=threads, shortlist=shortlist) as short:
            for beam in (1, 5):
                want, got = full.translate_batch(test, beam=beam), short.translate_batch(test, beam=beam)
                same = [a.hypotheses[0].tokens == b.hypotheses[0].tokens for a, b in zip(want, got, strict=True)]
                diffs = [abs(a.hypotheses[0].score - b.hypotheses[0].score) for a, b, s in zip(want, got, same) if s]
                agreement[f"beam{beam}"] = {
                    "identical": float(np.mean(same)),
                    "max_score_diff_identical": float(max(diffs, default=0.0)),
                }
    return shortlist, agreement
