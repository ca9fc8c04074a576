"""``deltalm bench-serve``: the real server (``deltalm serve`` in a child process) under a
closed-loop HTTP load of 1, 8, 32 and 64 concurrent clients, each sending one sentence a request,
with dynamic batching on and with ``--max-batch-sentences 1`` (no batching); the reference is
``deltalm translate`` answering one line at a time through a pipe (a warm process: the cost of a
line, not of loading the model). Every generation is forced to ``length`` tokens (``min_len =
max_len_b``) so that a random-weight model does the same work for every sentence.

Writes bench.json, bench.md and bench.png (sentences/s and latency against clients).
"""
from __future__ import annotations

import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .loadgen import run_load


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchPlan:
    clients: tuple[int, ...] = (1, 8, 32, 64)
    beam: int = 5
    length: int = 20  # target tokens forced per sentence (+ </s>)
    duration_s: float = 10.0  # per cell, then the requests in flight finish
    threads: int = 2
    cli_lines: int = 10  # lines timed through the `deltalm translate` pipe
    max_batch_sentences: int = 32
    max_wait_ms: float = 10.0
    modes: tuple[str, ...] = ("batched", "unbatched")


def sentences() -> list[str]:
    from deltalm.export.toy_data import toy_corpus

    return toy_corpus()


def options(plan: BenchPlan) -> dict:
    return {"beam": plan.beam, "min_len": plan.length, "max_len_b": plan.length}


def deltalm_command() -> str:
    return str(Path(sys.executable).parent / "deltalm")


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def prepare_artifact(model: str, out: Path) -> Path:
    """The fp32 artifact of ``deltalm bench``'s tiny or base model under ``out`` (built and
    exported once; base needs ~7 GB of memory: run it under the machine's big-job lock)."""
    from deltalm.bench.models import prepare_base, prepare_tiny

    files = (prepare_tiny if model == "tiny" else prepare_base)(out / "model")
    artifact = out / "artifact"
    if not (artifact / "manifest.json").exists():
        _log(f"exporting {model} -> {artifact}")
        subprocess.run([deltalm_command(), "export", str(files.checkpoint), "--spm", str(files.spm), "--dict",
                        str(files.dict), "--out", str(artifact), "--precision", "fp32", "--force"], check=True)
    return artifact


# --- the reference: deltalm translate, one line at a time -------------------------------------


def time_cli_lines(artifact: Path, plan: BenchPlan) -> dict:
    """Per-line latency of a warm ``deltalm translate`` answering a pipe line by line."""
    cmd = [deltalm_command(), "translate", str(artifact), "--beam", str(plan.beam), "--min-len", str(plan.length),
           "--max-len-b", str(plan.length), "--threads", str(plan.threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, bufsize=1, env=child_env(plan.threads))
    lines = sentences()
    times = []
    try:
        for k in range(plan.cli_lines + 2):  # two warm-up lines
            t0 = time.perf_counter()
            proc.stdin.write(lines[k * 7 % len(lines)] + "\n")
            proc.stdin.flush()
            if not proc.stdout.readline():
                raise RuntimeError("deltalm translate ended early")
            if k >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    times.sort()
    return {"lines": len(times), "p50_ms": round(1000 * times[len(times) // 2], 1),
            "mean_ms": round(1000 * sum(times) / len(times), 1), "min_ms": round(1000 * times[0], 1)}


# --- the server --------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, artifact: Path, plan: BenchPlan, batched: bool) -> None:
        cmd = [deltalm_command(), "serve", str(artifact), "--port", "0", "--threads", str(plan.threads),
               "--max-batch-sentences", str(plan.max_batch_sentences if batched else 1),
               "--max-wait-ms", str(plan.max_wait_ms), "--max-queue-sentences", "100000", "--timeout-s", "3600"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env(plan.threads))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=900)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("deltalm serve did not get ready in 900 s") from None
        self.url = line.split()[-1]

    def metrics(self) -> dict:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.url + "/metrics", timeout=60).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def measure_mode(artifact: Path, plan: BenchPlan, batched: bool) -> list[dict]:
    server = ServerProcess(artifact, plan, batched)
    lines = sentences()
    opts = options(plan)
    cells = []
    try:
        for clients in plan.clients:
            # warm-up: every client once, not counted
            run_load(server.url, lambda c, k: {"text": [lines[(c * 13 + k) % len(lines)]], **opts}, clients, 0.0)
            before = server.metrics()
            load0 = os.getloadavg()[0]
            res = run_load(server.url, lambda c, k: {"text": [lines[(c * 13 + k * 7) % len(lines)]], **opts},
                           clients, plan.duration_s)
            after = server.metrics()
            batches = after["deltalm_serve_batch_sentences_count"] - before["deltalm_serve_batch_sentences_count"]
            decoded = after["deltalm_serve_batch_sentences_sum"] - before["deltalm_serve_batch_sentences_sum"]
            cell = {"mode": "batched" if batched else "unbatched", **res.summary(),
                    "mean_batch_sentences": round(decoded / batches, 2) if batches else None,
                    "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            _log(f"  {cell['mode']:9s} {clients:3d} clients: {cell.get('sentences_per_s')} sent/s, "
                 f"p50 {cell.get('latency_ms', {}).get('p50')} ms, p99 {cell.get('latency_ms', {}).get('p99')} ms, "
                 f"batch {cell['mean_batch_sentences']}, load {cell['loadavg_1m']}")
            cells.append(cell)
    finally:
        rc = server.stop()
    if rc != 0:
        raise RuntimeError(f"deltalm serve exited {rc} after SIGTERM")
    return cells


# --- report --------------------------------------------------------------------------------------


def format_markdown(report: dict) -> str:
    plan = report["plan"]
    cells = {(c["mode"], c["clients"]): c for c in report["cells"]}
    cli = report["cli_line"]
    out = [f"# deltalm bench-serve: {report['model']}", "",
           f"{report['machine']}. Server: `deltalm serve --threads {plan['threads']}` (batched: "
           f"`--max-batch-sentences {plan['max_batch_sentences']} --max-wait-ms {plan['max_wait_ms']:g}`; unbatched: "
           f"`--max-batch-sentences 1`). Each client sends one sentence a request, the next once answered, for "
           f"{plan['duration_s']:g} s; beam {plan['beam']}, every output forced to {plan['length']} tokens + </s>. "
           f"Load generator: threads in one process on the same machine.", "",
           f"Reference, `deltalm translate` answering one line at a time through a pipe (warm process, "
           f"{cli['lines']} lines): p50 {cli['p50_ms']} ms, mean {cli['mean_ms']} ms.", "",
           "| clients | batched sent/s | unbatched sent/s | speed-up | batched p50 / p99 ms | unbatched p50 / p99 ms | mean batch | load avg (1 min) |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in plan["clients"]:
        b, u = cells.get(("batched", n), {}), cells.get(("unbatched", n), {})
        bs, us = b.get("sentences_per_s"), u.get("sentences_per_s")
        speed = f"{bs / us:.2f}x" if bs and us else "-"
        lat = lambda c: f"{c['latency_ms']['p50']} / {c['latency_ms']['p99']}" if "latency_ms" in c else "-"  # noqa: E731
        show = lambda x: "not run" if x is None else x  # noqa: E731
        out.append(f"| {n} | {show(bs)} | {show(us)} | {speed} | {lat(b)} | {lat(u)} | "
                   f"{show(b.get('mean_batch_sentences'))} | {show(b.get('loadavg_1m'))} / {show(u.get('loadavg_1m'))} |")
    one = cells.get(("batched", 1), {})
    if "latency_ms" in one:
        ratio = one["latency_ms"]["p50"] / cli["p50_ms"]
        out += ["", f"1 client, batched server p50 / `deltalm translate` line p50: {ratio:.3f} "
                    f"({'+' if ratio >= 1 else ''}{100 * (ratio - 1):.1f}%)."]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("batched", "o-"), ("unbatched", "s--")):
        cells = [c for c in report["cells"] if c["mode"] == mode and "latency_ms" in c]
        xs = [c["clients"] for c in cells]
        ax1.plot(xs, [c["sentences_per_s"] for c in cells], style, label=mode)
        ax2.plot(xs, [c["latency_ms"]["p50"] for c in cells], style, label=f"{mode} p50")
        ax2.plot(xs, [c["latency_ms"]["p99"] for c in cells], style, alpha=0.5, label=f"{mode} p99")
    ax2.axhline(report["cli_line"]["p50_ms"], color="gray", lw=1, label="deltalm translate, one line")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["plan"]["clients"], [str(c) for c in report["plan"]["clients"]])
        ax.set_xlabel("concurrent clients (one sentence a request)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax1.set_ylabel("sentences / s")
    ax2.set_ylabel("latency ms")
    ax2.set_yscale("log")
    fig.suptitle(f"deltalm serve, {report['model']}, beam {report['plan']['beam']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.1f} GB, python {platform.python_version()}"


def run_bench(artifact: Path, model_name: str, out: Path, plan: BenchPlan) -> dict:
    from dataclasses import asdict

    out.mkdir(parents=True, exist_ok=True)
    _log(f"bench-serve {model_name}: deltalm translate, one line at a time")
    report = {"model": model_name, "artifact": str(artifact), "machine": machine(), "plan": asdict(plan),
              "loadavg_1m_start": round(os.getloadavg()[0], 2), "cli_line": time_cli_lines(artifact, plan), "cells": []}
    _log(f"  deltalm translate line: {report['cli_line']}")
    for batched in [mode == "batched" for mode in plan.modes]:
        _log(f"bench-serve {model_name}: {'batched' if batched else 'unbatched'} server")
        report["cells"] += measure_mode(artifact, plan, batched)
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    report["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(format_markdown(report))
    plot(report, out / "bench.png")
    _log(f"wrote {out}/bench.json, bench.md, bench.png")
    return report
