"""Wall time and peak RSS of each stage of an export (load, graphs, fusions, parity).

Peaks come from the kernel's own high-water mark (``VmHWM`` in /proc/self/status), so a spike of a
few milliseconds counts. By default the mark is never reset: a stage's peak is the process's peak
*so far* (the stage that raised it shows it first), and tools that read the mark afterwards
(``/usr/bin/time``, a parent's ``wait4``) still see the process's true peak. With
``exact_stages`` (``DELTALM_STAGE_PEAKS=1`` for ``deltalm export``) the mark is reset when each
stage starts (``5`` into /proc/self/clear_refs), so every stage gets its own peak; the meter then
keeps the process's peak itself (``peak_mb``: the largest mark it read, the one before its first
reset included), because the kernel's mark no longer holds it. Stages nest; a stage's peak
includes its children's. Where the kernel refuses the reset, stages fall back to peaks so far
(``exact`` False). Linux only for the figures; elsewhere they are NaN and everything else works.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """This process's resident set now (MB), file-backed mapped pages included."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak RSS (MB) since its exec or the last ``reset_peak_rss`` (VmHWM;
    ru_maxrss also holds the parent's at fork)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS (Linux: ``5`` into
    /proc/self/clear_refs), so that a later ``peak_rss_mb`` is the peak of what came after.
    False where the kernel does not allow it (the peak then includes what came before)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    peak_mb: float = float("nan")  # the stage's peak RSS (its children's included)
    rss_before_mb: float = float("nan")
    rss_after_mb: float = float("nan")
    depth: int = 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_mb),
            "rss_before_mb": round(self.rss_before_mb),
            "rss_after_mb": round(self.rss_after_mb),
            "depth": self.depth,
        }


@dataclass
class StageMeter:
    """``with meter.stage("export"): ...`` records the block's wall time and peak RSS (its own with
    ``exact_stages``, else the process's so far); ``stages`` in the order they started,
    ``peak_mb`` the process's peak (before the meter was made included)."""

    exact_stages: bool = False
    stages: list[Stage] = field(default_factory=list)
    peak_mb: float = float("nan")
    exact: bool = False  # True while every stage's peak is its own (resets allowed and asked for)
    _open: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.peak_mb = peak_rss_mb()
        self.exact = self.exact_stages

    def _mark(self) -> None:
        """Fold the kernel's mark into every open stage and the process peak, then reset it."""
        hwm = peak_rss_mb()
        if hwm == hwm:  # not NaN
            self.peak_mb = hwm if self.peak_mb != self.peak_mb else max(self.peak_mb, hwm)
            for s in self._open:
                s.peak_mb = hwm if s.peak_mb != s.peak_mb else max(s.peak_mb, hwm)
        if self.exact and not reset_peak_rss():
            self.exact = False  # peaks so far from here on

    @contextlib.contextmanager
    def stage(self, name: str):
        self._mark()
        s = Stage(name, rss_before_mb=rss_mb(), depth=len(self._open))
        s.peak_mb = s.rss_before_mb
        self.stages.append(s)
        self._open.append(s)
        t0 = time.perf_counter()
        try:
            yield s
        finally:
            s.seconds = time.perf_counter() - t0
            self._mark()
            s.rss_after_mb = rss_mb()
            self._open.pop()

    @contextlib.contextmanager
    def active(self):
        """Make this the meter that ``stage()`` (the module function) records into, for the block:
        code deep in the export marks its own stages without being handed the meter."""
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = previous

    def report(self) -> dict:
        """What parity.json records under ``memory``."""
        return {
            "peak_rss_mb": round(self.peak_mb),
            "stage_peaks": "own" if self.exact else "so far",
            "stages": [s.to_dict() for s in self.stages],
        }

    def table(self) -> str:
        """One line per stage: time, peak RSS, RSS after (children indented)."""
        lines = [f"{'stage':<32} {'time s':>8} {'peak RSS MB':>12} {'RSS after MB':>13}"]
        for s in self.stages:
            lines.append(f"{'  ' * s.depth + s.name:<32} {s.seconds:>8.1f} {s.peak_mb:>12.0f} {s.rss_after_mb:>13.0f}")
        lines.append(f"{'process peak':<32} {'':>8} {self.peak_mb:>12.0f}")
        return "\n".join(lines)


_ACTIVE: StageMeter | None = None


def stage(name: str):
    """A stage of the active meter (``StageMeter.active``), or nothing where none is active."""
    return _ACTIVE.stage(name) if _ACTIVE is not None else contextlib.nullcontext()


__all__ = ["StageMeter", "Stage", "rss_mb", "stage"]
