"""``deltalm bench-serve``: the real server (``deltalm serve`` in a child process, once with
``--batching inflight`` and once with ``--batching request``, both up for the whole run) under a
closed-loop HTTP load of 1, 8, 32 and 64 concurrent clients, one sentence a request, the two
servers' cells interleaved (same client count back to back) so that they see the same machine.

Workloads (every generation forced to its length, ``min_len = max_len_b``, so that a random-weight
model does the same work for every sentence):

- ``uniform``: every sentence a corpus line, ``length`` target tokens;
- ``mixed``: most requests short (a corpus line, 5-10 target tokens), a share ``long_share`` long
  (about ``long_tokens`` source tokens, ``long_tokens`` target tokens); clients start at staggered
  moments and think a little between requests.

The reference is ``deltalm translate`` answering one line at a time through a pipe (a warm
process: the cost of a line, not of loading the model). Writes bench.json, bench.md, bench.png.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .loadgen import Call, LoadResult, run_load


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


MODES = ("inflight", "request")
WORKLOADS = ("uniform", "mixed")


@dataclass(frozen=True)
class BenchPlan:
    clients: tuple[int, ...] = (1, 8, 32, 64)
    beam: int = 5
    length: int = 20  # uniform: target tokens forced per sentence (+ </s>)
    duration_s: float = 10.0  # per cell, then the requests in flight finish
    threads: int = 2
    cli_lines: int = 10  # lines timed through the `deltalm translate` pipe
    max_batch_rows: int = 160
    max_wait_ms: float = 10.0  # request mode
    modes: tuple[str, ...] = MODES
    workloads: tuple[str, ...] = WORKLOADS
    long_share: float = 0.1  # mixed: share of long requests
    long_tokens: int = 100  # mixed: source and target tokens of a long request
    short_tokens: tuple[int, int] = (5, 10)  # mixed: target tokens of a short request (drawn uniformly)
    think_ms: float = 100.0  # mixed: a client waits U(0, think_ms) before each request
    stagger_s: float = 2.0  # mixed: a client's first request waits U(0, stagger_s)
    rounds: int = 3  # a cell's duration is split into rounds, the modes taking turns


def sentences() -> list[str]:
    from deltalm.export.toy_data import toy_corpus

    return toy_corpus()


def long_sources(artifact: Path, tokens: int, count: int = 16) -> tuple[list[str], float]:
    """``count`` sources of about ``tokens`` source tokens (corpus lines joined), and their mean
    length in tokens (with </s>)."""
    from deltalm.tokenizer import Tokenizer

    tok = Tokenizer(artifact / "spm.model", artifact / "dict.txt")
    lines, out, lengths = sentences(), [], []
    for k in range(count):
        text, i = "", k * 11
        while len(tok.encode(text)) < tokens:
            text = f"{text} {lines[i % len(lines)]}".strip()
            i += 1
        out.append(text)
        lengths.append(len(tok.encode(text)))
    return out, sum(lengths) / len(lengths)


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
        subprocess.run([deltalm_command(), *files.export_args(artifact, "fp32")], check=True)
    return artifact


# --- the reference: deltalm translate, one line at a time -------------------------------------


def time_cli_lines(artifact: Path, plan: BenchPlan) -> dict:
    """Per-line latency of a warm ``deltalm translate`` answering a pipe line by line (the uniform
    workload's sentences)."""
    cmd = [
        deltalm_command(),
        "translate",
        str(artifact),
        "--beam",
        str(plan.beam),
        "--min-len",
        str(plan.length),
        "--max-len-b",
        str(plan.length),
        "--threads",
        str(plan.threads),
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=child_env(plan.threads),
    )
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
    return {
        "lines": len(times),
        "p50_ms": round(1000 * times[len(times) // 2], 1),
        "mean_ms": round(1000 * sum(times) / len(times), 1),
        "min_ms": round(1000 * times[0], 1),
    }


# --- the servers ---------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, artifact: Path, plan: BenchPlan, batching: str) -> None:
        cmd = [
            deltalm_command(),
            "serve",
            str(artifact),
            "--port",
            "0",
            "--threads",
            str(plan.threads),
            "--batching",
            batching,
            "--max-batch-rows",
            str(plan.max_batch_rows),
            "--max-wait-ms",
            str(plan.max_wait_ms),
            "--max-queue-sentences",
            "100000",
            "--timeout-s",
            "3600",
        ]
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


def make_calls(workload: str, plan: BenchPlan, long_texts: list[str]):
    """``(client, k) -> Call`` of a workload (deterministic: the same for both servers)."""
    lines = sentences()
    uniform = {"beam": plan.beam, "min_len": plan.length, "max_len_b": plan.length}

    def call(c: int, k: int) -> Call:
        if workload == "uniform":
            return Call({"text": [lines[(c * 13 + k * 7) % len(lines)]], **uniform})
        rng = random.Random(c * 100003 + k)
        delay = rng.uniform(0, plan.stagger_s) if k == 0 else rng.uniform(0, plan.think_ms / 1000)
        if rng.random() < plan.long_share:
            n = plan.long_tokens
            return Call(
                {"text": [long_texts[rng.randrange(len(long_texts))]], "beam": plan.beam, "min_len": n, "max_len_b": n},
                "long",
                delay,
            )
        n = rng.randint(*plan.short_tokens)
        return Call(
            {"text": [lines[rng.randrange(len(lines))]], "beam": plan.beam, "min_len": n, "max_len_b": n},
            "short",
            delay,
        )

    return call


@dataclass
class _Cell:
    """What the rounds of one (workload, clients, mode) cell add up to."""

    result: LoadResult
    steps: float = 0.0
    rows: float = 0.0
    step_s: float = 0.0
    loads: list = None


def measure_round(server: ServerProcess, cell: _Cell, clients: int, duration_s: float, calls) -> None:
    before = server.metrics()
    cell.loads.append(round(os.getloadavg()[0], 2))
    res = run_load(server.url, calls, clients, duration_s)
    after = server.metrics()
    cell.loads.append(round(os.getloadavg()[0], 2))
    cell.result.add(res)
    cell.steps += after["deltalm_serve_step_rows_count"] - before["deltalm_serve_step_rows_count"]
    cell.rows += after["deltalm_serve_step_rows_sum"] - before["deltalm_serve_step_rows_sum"]
    cell.step_s += after["deltalm_serve_step_seconds_sum"] - before["deltalm_serve_step_seconds_sum"]


def summarize(mode: str, workload: str, cell: _Cell) -> dict:
    steps = cell.steps
    out = {
        "mode": mode,
        "workload": workload,
        **cell.result.summary(),
        "mean_rows_per_step": round(cell.rows / steps, 2) if steps else None,
        "mean_step_ms": round(1000 * cell.step_s / steps, 1) if steps else None,
        "loadavg_1m": [min(cell.loads), max(cell.loads)],
    }
    log_cell(out)
    return out


def log_cell(cell: dict) -> None:
    clients, mode, workload = cell["clients"], cell["mode"], cell["workload"]
    kinds = cell.get("by_kind", {})
    lat = (
        " ".join(f"{k} p50/p99 {v['latency_ms']['p50']}/{v['latency_ms']['p99']} ms" for k, v in kinds.items())
        or f"p50/p99 {cell.get('latency_ms', {}).get('p50')}/{cell.get('latency_ms', {}).get('p99')} ms"
    )
    _log(
        f"  {workload:7s} {mode:8s} {clients:3d} clients: {cell.get('sentences_per_s')} sent/s, "
        f"{cell.get('tokens_per_s')} tok/s, {lat}, rows/step {cell['mean_rows_per_step']}, load {cell['loadavg_1m']}"
    )


# --- report --------------------------------------------------------------------------------------


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _lat(cell: dict, kind: str | None = None) -> str:
    src = cell.get("by_kind", {}).get(kind, {}) if kind else cell
    return f"{src['latency_ms']['p50']} / {src['latency_ms']['p99']}" if "latency_ms" in src else "-"


def targets(report: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) of the serving targets, from what this run measured."""
    cells = {(c["workload"], c["mode"], c["clients"]): c for c in report["cells"]}
    out = []
    inf, req = cells.get(("mixed", "inflight", 32)), cells.get(("mixed", "request", 32))
    if inf and req and inf.get("tokens_per_s") and req.get("tokens_per_s"):
        r_tok, r_sent = inf["tokens_per_s"] / req["tokens_per_s"], inf["sentences_per_s"] / req["sentences_per_s"]
        out.append(
            (
                "mixed, 32 clients: in-flight throughput >= 1.5x request-level",
                f"{r_tok:.2f}x target tokens/s ({r_sent:.2f}x sentences/s)",
                r_tok >= 1.5,
            )
        )
    ratios = []
    for n in report["plan"]["clients"]:
        a, b = cells.get(("uniform", "inflight", n)), cells.get(("uniform", "request", n))
        if a and b and a.get("sentences_per_s") and b.get("sentences_per_s"):
            ratios.append((n, a["sentences_per_s"] / b["sentences_per_s"]))
    if ratios:
        out.append(
            (
                "uniform: in-flight >= 0.95x request-level at every client count",
                ", ".join(f"{n}: {r:.2f}x" for n, r in ratios),
                min(r for _, r in ratios) >= 0.95,
            )
        )
    for n in (32, 64):
        a, b = cells.get(("mixed", "inflight", n)), cells.get(("mixed", "request", n))
        sa, sb = (c.get("by_kind", {}).get("short") if c else None for c in (a, b))
        if sa and sb:
            r = sa["latency_ms"]["p99"] / sb["latency_ms"]["p99"]
            out.append(
                (
                    f"mixed, {n} clients: short-request p99 <= 1/3 of request-level's",
                    f"{sa['latency_ms']['p99']} / {sb['latency_ms']['p99']} ms = {r:.2f}",
                    r <= 1 / 3,
                )
            )
    one = cells.get(("uniform", "inflight", 1))
    if one and "latency_ms" in one:
        r = one["latency_ms"]["p50"] / report["cli_line"]["p50_ms"]
        out.append(
            (
                "1 client: latency within 10% of `deltalm translate` on one line",
                f"p50 {one['latency_ms']['p50']} / {report['cli_line']['p50_ms']} ms = {r:.3f}",
                r <= 1.10,
            )
        )
    return out


def format_markdown(report: dict) -> str:
    plan = report["plan"]
    cells = {(c["workload"], c["mode"], c["clients"]): c for c in report["cells"]}
    cli = report["cli_line"]
    out = [
        f"# deltalm bench-serve: {report['model']}",
        "",
        f"{report['machine']}. Servers: `deltalm serve --threads {plan['threads']} --max-batch-rows "
        f"{plan['max_batch_rows']}`, `--batching inflight` and `--batching request --max-wait-ms "
        f"{plan['max_wait_ms']:g}`, both up for the whole run, their cells interleaved. Each client sends one "
        f"sentence a request, the next once answered, for {plan['duration_s']:g} s a cell in {plan['rounds']} rounds, "
        f"the two servers taking turns (after each round the requests in flight finish); beam {plan['beam']}. Load generator: threads in one process on the same machine. "
        f"Load average (1 min) at the start {report['loadavg_1m_start']}, at the end {report.get('loadavg_1m_end')}.",
        "",
        f"Reference, `deltalm translate` answering one line at a time through a pipe (warm process, "
        f"{cli['lines']} lines of the uniform workload): p50 {cli['p50_ms']} ms, mean {cli['mean_ms']} ms.",
        "",
    ]
    if "uniform" in plan["workloads"]:
        out += [
            f"## uniform: every output forced to {plan['length']} tokens + </s>",
            "",
            "| clients | in-flight sent/s | request sent/s | ratio | in-flight p50 / p99 ms | request p50 / p99 ms "
            "| rows per step (in-flight / request) | load avg (1 min) |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for n in plan["clients"]:
            a, b = cells.get(("uniform", "inflight", n), {}), cells.get(("uniform", "request", n), {})
            out.append(
                f"| {n} | {a.get('sentences_per_s', '-')} | {b.get('sentences_per_s', '-')} | "
                f"{_ratio(a.get('sentences_per_s'), b.get('sentences_per_s'))} | {_lat(a)} | {_lat(b)} | "
                f"{a.get('mean_rows_per_step', '-')} / {b.get('mean_rows_per_step', '-')} | "
                f"{a.get('loadavg_1m', '-')} / {b.get('loadavg_1m', '-')} |"
            )
        out.append("")
    if "mixed" in plan["workloads"]:
        lo, hi = plan["short_tokens"]
        out += [
            f"## mixed: {100 * (1 - plan['long_share']):g}% short (a corpus line, {lo}-{hi} target tokens), "
            f"{100 * plan['long_share']:g}% long ({report.get('long_source_tokens', '?')} source tokens on average, "
            f"{plan['long_tokens']} target tokens); staggered starts (U(0, {plan['stagger_s']:g} s)), "
            f"think time U(0, {plan['think_ms']:g} ms)",
            "",
            "| clients | target tok/s in-flight / request | ratio | sent/s in-flight / request | ratio | "
            "short p50 / p99 ms in-flight | short p50 / p99 ms request | long p50 / p99 ms in-flight | "
            "long p50 / p99 ms request | rows per step (in-flight / request) | load avg (1 min) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for n in plan["clients"]:
            a, b = cells.get(("mixed", "inflight", n), {}), cells.get(("mixed", "request", n), {})
            out.append(
                f"| {n} | {a.get('tokens_per_s', '-')} / {b.get('tokens_per_s', '-')} | "
                f"{_ratio(a.get('tokens_per_s'), b.get('tokens_per_s'))} | {a.get('sentences_per_s', '-')} / "
                f"{b.get('sentences_per_s', '-')} | {_ratio(a.get('sentences_per_s'), b.get('sentences_per_s'))} | "
                f"{_lat(a, 'short')} | {_lat(b, 'short')} | {_lat(a, 'long')} | {_lat(b, 'long')} | "
                f"{a.get('mean_rows_per_step', '-')} / {b.get('mean_rows_per_step', '-')} | "
                f"{a.get('loadavg_1m', '-')} / {b.get('loadavg_1m', '-')} |"
            )
        out.append("")
    rows = targets(report)
    if rows:
        out += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if w in report["plan"]["workloads"]]
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 4 * len(workloads)), squeeze=False)
    styles = {"inflight": "o-", "request": "s--"}
    for row, workload in zip(axes, workloads):
        ax1, ax2 = row
        for mode in report["plan"]["modes"]:
            cells = [
                c for c in report["cells"] if c["workload"] == workload and c["mode"] == mode and "latency_ms" in c
            ]
            xs = [c["clients"] for c in cells]
            if workload == "uniform":
                ax1.plot(xs, [c["sentences_per_s"] for c in cells], styles[mode], label=mode)
                ax2.plot(xs, [c["latency_ms"]["p50"] for c in cells], styles[mode], label=f"{mode} p50")
                ax2.plot(xs, [c["latency_ms"]["p99"] for c in cells], styles[mode], alpha=0.5, label=f"{mode} p99")
            else:
                ax1.plot(xs, [c["tokens_per_s"] for c in cells], styles[mode], label=mode)
                for kind, alpha in (("short", 1.0), ("long", 0.5)):
                    pts = [
                        (c["clients"], c["by_kind"][kind]["latency_ms"]["p99"])
                        for c in cells
                        if kind in c.get("by_kind", {})
                    ]
                    if pts:
                        ax2.plot(*zip(*pts), styles[mode], alpha=alpha, label=f"{mode} {kind} p99")
        if workload == "uniform":
            ax2.axhline(report["cli_line"]["p50_ms"], color="gray", lw=1, label="deltalm translate, one line")
        ax1.set_ylabel("sentences / s" if workload == "uniform" else "target tokens / s")
        ax2.set_ylabel("latency ms")
        ax2.set_yscale("log")
        ax1.set_title(f"{workload}: throughput")
        ax2.set_title(f"{workload}: latency")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(report["plan"]["clients"], [str(c) for c in report["plan"]["clients"]])
            ax.set_xlabel("concurrent clients (one sentence a request)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(
        f"deltalm serve, {report['model']}, beam {report['plan']['beam']}: in-flight vs request-level batching"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.1f} GB, "
        f"python {platform.python_version()}, measured {time.strftime('%Y-%m-%d', time.gmtime())} (UTC)"
    )


def run_bench(artifact: Path, model_name: str, out: Path, plan: BenchPlan) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model_name,
        "artifact": str(artifact),
        "machine": machine(),
        "plan": asdict(plan),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
        "cells": [],
    }
    long_texts, report["long_source_tokens"] = long_sources(artifact, plan.long_tokens)
    report["long_source_tokens"] = round(report["long_source_tokens"], 1)
    _log(f"bench-serve {model_name}: deltalm translate, one line at a time")
    report["cli_line"] = time_cli_lines(artifact, plan)
    _log(f"  deltalm translate line: {report['cli_line']}")
    servers = {mode: ServerProcess(artifact, plan, mode) for mode in plan.modes}
    try:
        for workload in plan.workloads:
            calls = make_calls(workload, plan, long_texts)
            for clients in plan.clients:
                # the modes take turns, round by round, so that a change of the machine's load
                # falls on both
                cells = {mode: _Cell(LoadResult(clients), loads=[]) for mode in plan.modes}
                for _ in range(plan.rounds):
                    for mode in plan.modes:
                        measure_round(servers[mode], cells[mode], clients, plan.duration_s / plan.rounds, calls)
                report["cells"] += [summarize(mode, workload, cells[mode]) for mode in plan.modes]
                (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        codes = {mode: server.stop() for mode, server in servers.items()}
    if any(codes.values()):
        raise RuntimeError(f"deltalm serve exited {codes} after SIGTERM")
    report["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(format_markdown(report))
    plot(report, out / "bench.png")
    _log(f"wrote {out}/bench.json, bench.md, bench.png")
    return report
