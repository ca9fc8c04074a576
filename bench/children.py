"""Child processes of the benchmark: each backend, export and check runs in a process of its
own, so that its wall time, CPU time and peak RSS are its own. Also this machine's load (other
processes share it) and this process's peak RSS per measured section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deltalm.export.stage_meter import peak_rss_mb, reset_peak_rss
from deltalm.export.stage_meter import rss_mb as current_rss_mb

from .progress import log


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    cpu_s: float = 0.0  # the child's user + system CPU time
    others_cpu_share: float = 0.0  # CPU used by every other process meanwhile / (wall x cores)
    stdout: str = ""
    stderr: str = ""


# --- this process's memory: read from /proc as the export's stage meter reads it ------------------


class PeakMeter:
    """Peak RSS of measured sections of this process (a cell of the benchmark): ``start`` resets
    the kernel's high-water mark (VmHWM), ``stop`` reads the section's peak. ``overall`` is the
    peak over every section and whatever ran between them, so that one process can report both
    its peak per cell and its peak while translating. Where the mark cannot be reset, a section's
    peak is the process's peak so far (``resettable`` False)."""

    def __init__(self) -> None:
        self.resettable = True
        self._overall = peak_rss_mb()

    def start(self) -> float:
        """Begin a section: returns the RSS (MB) it starts from."""
        self._overall = max(self._overall, peak_rss_mb())
        self.resettable = reset_peak_rss() and self.resettable
        return current_rss_mb()

    def stop(self) -> float:
        """The peak RSS (MB) since ``start``."""
        peak = peak_rss_mb()
        self._overall = max(self._overall, peak)
        return peak

    @property
    def overall(self) -> float:
        return max(self._overall, peak_rss_mb())


# --- the machine's load ---------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat), 0 if unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10, sample_s: float = 1.0) -> dict:
    """Wait (at most ``max_wait_s``) until the machine's busy share over ``sample_s`` is at most
    ``threshold`` (call it while this process is idle: its own share counts as busy). Other
    sessions share this machine; a cell measured while they run is slower by their load."""
    t0 = time.perf_counter()
    while True:
        b0 = machine_busy_s()
        time.sleep(sample_s)
        share = (machine_busy_s() - b0) / (sample_s * (os.cpu_count() or 1))
        waited = time.perf_counter() - t0
        if share <= threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "busy_share": round(share, 3), "quiet": share <= threshold}


# --- running children -----------------------------------------------------------------------------


def bench_child_command(*args: str) -> list[str]:
    """The command line of a benchmark child: ``python -m deltalm.bench ARGS`` (see __main__)."""
    return [sys.executable, "-m", "deltalm.bench", *args]


def run_child(cmd: list[str], stdin: str | None = None, echo: bool = False, env: dict | None = None) -> ChildResult:
    """Run ``cmd`` and return its exit code, wall time, CPU time and the share of the machine other
    processes used meanwhile. ``echo``: copy the child's stderr lines to our log as they come.
    ``env``: variables set for the child on top of ours.

    Peak RSS is not taken from here: Linux folds the parent's high-water mark into a
    (v)forked child's ru_maxrss at exec, so the children report their own ``VmHWM``."""
    t0 = time.perf_counter()
    busy0 = machine_busy_s()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    # threads drain the pipes; the child is reaped by wait4 below, not by Popen
    out_chunks, err_chunks = [], []

    def drain(stream, sink, tee):
        for line in stream:
            sink.append(line)
            if tee:
                log(line.rstrip("\n"))

    threads = [
        threading.Thread(target=drain, args=(proc.stdout, out_chunks, False), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, err_chunks, echo), daemon=True),
    ]
    for t in threads:
        t.start()
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, machine_busy_s() - busy0 - cpu) / (wall * (os.cpu_count() or 1))
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    return ChildResult(proc.returncode, wall, cpu, others, "".join(out_chunks), "".join(err_chunks))


def run_cli(
    cli_args: list[str], record: Path, stdin: str | None = None, env: dict | None = None
) -> tuple[float, ChildResult]:
    """``deltalm CLI_ARGS`` in a child that reports its own peak RSS (MB) into ``record``."""
    record.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    res = run_child(bench_child_command("cli", str(record), *cli_args), stdin=stdin, env=env)
    peak = json.loads(record.read_text())["peak_rss_mb"] if record.exists() else float("nan")
    record.unlink(missing_ok=True)
    return peak, res


def run_task(task: str, spec: dict, work: Path, tag: str, echo: bool = True) -> tuple[dict | None, ChildResult]:
    """``python -m deltalm.bench TASK SPEC.json OUT.json`` in a child; its result, or None."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    res = run_child(bench_child_command(task, str(spec_path), str(out_path)), echo=echo)
    if res.returncode != 0 or not out_path.exists():
        return None, res
    return json.loads(out_path.read_text()), res
