"""Engines side by side, interleaved in one run: our runtime and CTranslate2 (``deltalm bench
--compare ctranslate2``), or our runtime with and without a vocabulary shortlist (``--compare
shortlist``). Each engine (ours: ort at one precision; CTranslate2 at the same precision) lives
in a process of its own for the whole comparison, so that its load time, RSS after load and peak
RSS while translating are its own; the parent sends both the same workloads turn by turn (the
order alternating each repetition), so that a change in the machine's load slows both alike.

Protocol of an engine process (``python -m deltalm.bench engine SPEC.json``): one JSON line on
stdout when loaded (its load figures), then one JSON line per command read from stdin:
``{"op": "run", "beam", "batch", "src_len", "n", "seed"}`` -> ``{"total_s"}``;
``{"op": "cell_start"}`` -> ``{"rss_mb"}`` (the peak RSS of a cell is measured from here);
``{"op": "cell_stop"}`` -> ``{"peak_rss_mb", "rss_mb"}`` (the cell's peak, the RSS after it);
``{"op": "finish"}`` -> its peak RSS figures, and the process exits."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from .children import PeakMeter, bench_child_command, current_rss_mb, peak_rss_mb, reset_peak_rss, wait_for_quiet
from .measure import load_figures, translating_peak
from .progress import log
from .workloads import Workload, forced_length_options, make_sources

# --- inside an engine process ----------------------------------------------------------------------


def cell_seed(wl: Workload) -> int:
    """The seed of a cell's sources: every engine translates the same sentences."""
    return 1000 * wl.batch + wl.src_len


class OursEngine:
    """Our ort backend on an artifact (with ``spec["shortlist"]``: over that vocabulary shortlist);
    one forced-length generation per ``run``."""

    def __init__(self, spec: dict):
        self.shortlist = None
        if spec.get("shortlist"):
            from deltalm.shortlist import Shortlist

            self.shortlist = Shortlist.load(spec["shortlist"])
        self.backend, self.figures = load_figures(
            f"ort-{spec['precision']}", spec["path"], spec["threads"], shortlist=self.shortlist is not None
        )
        self.cfg = self.backend.cfg

    def run(self, beam: int, batch: int, src_len: int, n: int, seed: int) -> float:
        from deltalm.search import generate

        cfg = self.cfg
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed)
        t0 = time.perf_counter()
        hyps = generate(self.backend, src, forced_length_options(beam, n), shortlist=self.shortlist)
        total = time.perf_counter() - t0
        if {len(h[0].tokens) for h in hyps} != {n + 1}:
            raise RuntimeError(f"ours: forced length {n} + </s> not respected")
        return total


class Ct2Engine:
    """A CTranslate2 Translator on a model directory written by ``ct2_model.build_ct2_model``.
    Forced length: ``min_decoding_length = max_decoding_length = n + 1`` tokens, the same
    n + 1 decoder steps as ours (n tokens and </s>)."""

    def __init__(self, spec: dict):
        import ctranslate2

        from .ct2_model import COMPUTE_TYPES, ct2_vocabulary

        cfg_path = Path(spec["path"]) / "bench_record.json"
        record = json.loads(cfg_path.read_text())
        self.vocab_size, self.pad, self.eos = (
            record["config"]["vocab_size"],
            record["config"]["pad"],
            record["config"]["eos"],
        )
        self.vocab = ct2_vocabulary(self.vocab_size)
        rss0 = current_rss_mb()
        t0 = time.perf_counter()
        self.translator = ctranslate2.Translator(
            spec["path"],
            device="cpu",
            compute_type=COMPUTE_TYPES[spec["precision"]],
            inter_threads=1,
            intra_threads=spec["threads"],
        )
        load_s = time.perf_counter() - t0
        files = [p for p in Path(spec["path"]).iterdir() if p.is_file() and p.name != "bench_record.json"]
        self.figures = {
            "load_s": load_s,
            "rss_before_load_mb": rss0,
            "rss_after_load_mb": current_rss_mb(),
            "peak_rss_load_mb": peak_rss_mb(),
            "model_files_mb": sum(p.stat().st_size for p in files) / 2**20,
            "peak_reset": reset_peak_rss(),
        }

    def run(self, beam: int, batch: int, src_len: int, n: int, seed: int) -> float:
        src = make_sources(self.vocab_size, self.eos, self.pad, batch, src_len, seed)
        tokens = [[self.vocab[i] for i in row if i != self.pad] for row in src]
        t0 = time.perf_counter()
        out = self.translator.translate_batch(
            tokens,
            beam_size=beam,
            num_hypotheses=1,
            max_decoding_length=n + 1,
            min_decoding_length=n + 1,
            return_scores=False,
        )
        total = time.perf_counter() - t0
        if {len(r.hypotheses[0]) for r in out} != {n + 1}:
            raise RuntimeError(f"ctranslate2: forced length {n + 1} not respected")
        return total


def serve_engine(spec: dict, stdin, stdout) -> int:
    """The engine process: load, report, then answer commands until ``finish`` or end of input."""
    import_first = {"ctranslate2": "ctranslate2", "ours": "onnxruntime"}[spec["engine"]]
    __import__(import_first)
    engine = (Ct2Engine if spec["engine"] == "ctranslate2" else OursEngine)(spec)

    def say(obj):
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    say(engine.figures)
    meter = PeakMeter()
    for line in stdin:
        cmd = json.loads(line)
        if cmd["op"] == "finish":
            say(translating_peak(engine.figures, meter))
            return 0
        if cmd["op"] == "cell_start":
            say({"rss_mb": meter.start()})
            continue
        if cmd["op"] == "cell_stop":
            say({"peak_rss_mb": meter.stop(), "rss_mb": current_rss_mb()})
            continue
        say({"total_s": engine.run(cmd["beam"], cmd["batch"], cmd["src_len"], cmd["n"], cmd["seed"])})
    return 0


# --- the parent ------------------------------------------------------------------------------------


class EngineProcess:
    """An engine process seen from the parent."""

    def __init__(self, label: str, spec: dict, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        spec_path = work / f"engine-{label.replace(' ', '-')}.spec.json"
        spec_path.write_text(json.dumps(spec))
        self.label = label
        self.proc = subprocess.Popen(
            bench_child_command("engine", str(spec_path)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.figures = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(
                f"{self.label}: the engine process ended (exit {self.proc.returncode}); see its stderr above"
            )
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def finish(self) -> dict:
        out = self.ask(op="finish")
        self.proc.stdin.close()
        self.proc.wait()
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def compare_side_by_side(
    pairs: dict,
    cells: list[Workload],
    n: int,
    reps: int,
    threads: int,
    work: Path,
    quiet_wait_s: float = 0.0,
    progress=None,
) -> dict:
    """``pairs``: {precision: {label: {"engine": "ours" | "ctranslate2", "path": model or artifact
    dir, "shortlist": file (ours, optional)}}}. Per precision, the engines are loaded (one after
    the other, so their loads do not overlap), then every cell is
    run: a short warm-up each, then ``reps`` interleaved repetitions of n forced tokens. Returns
    {"engines": {label: figures + cells}, ...}; a cell's ``tokens_per_s`` is batch x (n + 1)
    over the median total time."""
    engines: dict[str, dict] = {}
    for precision, dirs in pairs.items():
        procs = []
        try:
            for name, spec in dirs.items():
                label = f"{name} {precision}"
                log(f"compare: loading {label}")
                procs.append(
                    EngineProcess(
                        label, {k: str(v) for k, v in spec.items()} | {"precision": precision, "threads": threads}, work
                    )
                )
            results = {
                p.label: {"engine": p.label.split()[0], "precision": precision, **p.figures, "cells": []} for p in procs
            }
            for wl in cells:
                if progress is not None:
                    progress.stage(f"{wl.name} ({precision})")
                quiet = wait_for_quiet(quiet_wait_s) if quiet_wait_s else None
                seed = cell_seed(wl)
                before = {p.label: p.ask(op="cell_start")["rss_mb"] for p in procs}
                for p in procs:  # warm-up: shapes, allocations, thread pools
                    p.ask(op="run", beam=wl.beam, batch=wl.batch, src_len=wl.src_len, n=min(n, 2), seed=seed)
                times = {p.label: [] for p in procs}
                for r in range(reps):
                    for p in procs if r % 2 == 0 else procs[::-1]:
                        times[p.label].append(
                            p.ask(op="run", beam=wl.beam, batch=wl.batch, src_len=wl.src_len, n=n, seed=seed)["total_s"]
                        )
                after = {p.label: p.ask(op="cell_stop") for p in procs}
                line = []
                for p in procs:
                    total = float(np.median(times[p.label]))
                    tps = wl.batch * (n + 1) / total
                    results[p.label]["cells"].append(
                        {
                            "workload": wl.key,
                            "name": wl.name,
                            "beam": wl.beam,
                            "batch": wl.batch,
                            "src_len": wl.src_len,
                            "n": n,
                            "reps": reps,
                            "runs_s": times[p.label],
                            "total_s": total,
                            "tokens_per_s": tps,
                            "quiet_gate": quiet,
                            "rss_before_cell_mb": round(before[p.label]),
                            "peak_rss_cell_mb": round(after[p.label]["peak_rss_mb"]),
                            "rss_after_cell_mb": round(after[p.label]["rss_mb"]),
                        }
                    )
                    line.append(f"{p.label} {tps:.1f} (peak {after[p.label]['peak_rss_mb']:.0f} MB)")
                log(f"  compare {wl.name:<30} tok/s: " + ", ".join(line))
                if progress is not None:
                    progress.done()
            for p in procs:
                results[p.label] |= p.finish()
        finally:
            for p in procs:
                p.kill()
        engines |= results
    return {
        "engines": engines,
        "n": n,
        "reps": reps,
        "threads": threads,
        "workloads": [[w.beam, w.batch, w.src_len] for w in cells],
    }
