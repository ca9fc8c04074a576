"""This process's resident pages of memory-mapped files, and giving them back.

The parity check holds two copies of the model's weights, each memory-mapped from a file: the
PyTorch model's from the checkpoint (``torch.load(mmap=True)``) and ONNX Runtime's from the
artifact's weights.data. A page of such a mapping counts in RSS once touched, and stays counted
while it is mapped, although it is the file's own page: giving it back (``madvise(MADV_DONTNEED)``)
costs nothing but a page fault when it is read again, served from the page cache. ``TakeTurns``
uses that so the two models' weights are not resident at the same time.

Only mappings whose every page is still the file's own are given back (``/proc/self/smaps``:
``Anonymous: 0 kB``): a private mapping with a page written to (copy on write) would lose the
write, so such a mapping is left alone. Linux only; elsewhere nothing is given back.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            _libc = False
    return _libc.madvise if _libc else None


def _mappings(with_anonymous: bool = False) -> list[tuple[int, int, str, int]]:
    """(start, end, path, anonymous kB) of every file mapping of this process (anonymous kB
    only with ``with_anonymous``, from smaps; else 0)."""
    out: list[list] = []
    try:
        lines = Path("/proc/self/smaps" if with_anonymous else "/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append([start, end, parts[5] if len(parts) == 6 else "", 0])
        elif with_anonymous and parts and parts[0] == "Anonymous:" and out:
            out[-1][3] = int(parts[1])
    return [tuple(m) for m in out if m[2].startswith("/")]


def mapped_files(addresses: Iterable[int]) -> set[str]:
    """The files whose mappings hold these addresses (tensors' ``data_ptr()``); anonymous
    memory holds none."""
    maps = sorted(_mappings())
    starts = [m[0] for m in maps]
    found = set()
    for a in addresses:
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and maps[i][0] <= a < maps[i][1]:
            found.add(maps[i][2])
    return found


def release(paths: Iterable[str | os.PathLike]) -> int:
    """Give back this process's pages of every clean mapping of these files (see the module
    docstring); they come back from the page cache when next read. Returns the bytes of address
    space advised (0 where nothing could be)."""
    madvise = _madvise()
    targets = {os.path.realpath(p) for p in paths}
    if madvise is None or not targets:
        return 0
    done = 0
    for start, end, path, anonymous_kb in _mappings(with_anonymous=True):
        if path in targets and anonymous_kb == 0:
            if madvise(start, end - start, _MADV_DONTNEED) == 0:
                done += end - start
            else:
                log.debug("madvise(%s) failed: errno %d", path, ctypes.get_errno())
    return done


class TakeTurns:
    """Two computations compared with each other, each over weights mapped from files of its own
    (``files``: side name -> paths). ``turn(side)`` before a side runs gives back the other
    sides' pages, once per change of side, so that one side's weights are resident at a time."""

    def __init__(self, files: dict[str, Iterable[str | os.PathLike]]):
        self.files = {side: [str(p) for p in paths] for side, paths in files.items()}
        self.current: str | None = None
        self.switches = 0

    def turn(self, side: str) -> None:
        if side == self.current:
            return
        release(p for other, paths in self.files.items() if other != side for p in paths)
        self.current = side
        self.switches += 1


__all__ = ["mapped_files", "release", "TakeTurns"]
