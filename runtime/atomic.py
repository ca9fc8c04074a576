"""Crash-safe writes: a file or a directory appears complete or not at all.

Everything the project writes for a user goes through here: ``atomic_output`` (one file, e.g.
``translate --output``), ``atomic_directory`` (an artifact directory, an engines directory) and
``write_json_atomic`` (a manifest). The protocol is the same each time: write into a hidden
sibling named after the writing process (``.NAME.partial-PID`` / ``.NAME.PID.HEX.tmp``), fsync,
then one rename. Replacing a directory sets the old one aside as ``.NAME.old-PID`` for the moment
of the swap. A process killed mid-way can leave such *work* names behind; they are recognised by
the pid of a process that is gone, refused as artifacts (``artifact.read_manifest``) and tidied by
the next writer (``clean_stale_work_dirs``, which also restores a set-aside artifact whose
replacement never arrived).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import InputError


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- work directories of an export ---------------------------------------------------------------

_WORK_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def work_dir_name(out: Path, kind: str, pid: int | None = None) -> Path:
    """The hidden sibling an export of ``out`` writes into (``kind="partial"``) or sets the
    previous artifact aside in (``kind="old"``)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def _stale_work_dir(path: Path) -> tuple[str, str, int] | None:
    """(artifact name, "partial" | "old", pid) when ``path`` is a work directory of a process that
    no longer runs, else None."""
    m = _WORK_DIR.match(path.name)
    if not m or pid_alive(int(m["pid"])):
        return None
    return m["name"], m["kind"], int(m["pid"])


def stale_work_dirs(out: str | Path) -> list[Path]:
    """Work directories of ``out`` (``.NAME.partial-PID`` / ``.NAME.old-PID``) left by exports
    that are no longer running, oldest first."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        stale = _stale_work_dir(p)
        if stale and stale[0] == out.name and p.is_dir():
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def previous_artifact_of(out: str | Path) -> Path | None:
    """The complete artifact an interrupted replace of ``out`` set aside (``.NAME.old-PID``), when
    ``out`` itself is missing; else None."""
    out = Path(out).absolute()
    if out.exists():
        return None
    old = [p for p in stale_work_dirs(out) if _WORK_DIR.match(p.name)["kind"] == "old"]
    return old[-1] if old else None


def clean_stale_work_dirs(out: str | Path) -> list[str]:
    """Tidy up after exports of ``out`` that were killed: a set-aside previous artifact goes back
    to ``out`` when ``out`` is missing (its replacement never arrived), every other stale work
    directory is deleted. Returns one line per action, for the log."""
    out = Path(out).absolute()
    done = []
    restore = previous_artifact_of(out)
    if restore is not None:
        os.rename(restore, out)
        done.append(f"restored {out} from {restore.name}, left by an interrupted export")
    for p in stale_work_dirs(out):
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted export")
    return done


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only complete: written to a temporary file in the
    same directory, fsynced, then renamed over ``path``. On any failure (Ctrl-C included) the
    temporary file is removed and ``path`` is left as it was; the hidden temporary file of a
    killed run is removed by the next run writing ``path``."""
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    except OSError as e:
        raise InputError(f"cannot write --output {path}: {e.strerror or e}") from None
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by translations that were killed (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp$")
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m and not pid_alive(int(m[1])):
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool):
    """Yield a hidden sibling directory to write into; on success it replaces ``out`` in one
    rename, on any failure (Ctrl-C included) it is deleted. A killed process leaves only a hidden
    ``.NAME.partial-PID`` directory, never something that looks like a complete artifact."""
    out = out.resolve()
    if out.parent.exists():
        for line in clean_stale_work_dirs(out):
            print(line, file=sys.stderr, flush=True)
    if out.exists() and not force:
        raise InputError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_dir_name(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # SIGTERM becomes KeyboardInterrupt so the cleanup below runs
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if _main_thread() else None
    try:
        yield tmp
        if out.exists():
            # set the previous artifact aside, move the new one in; a kill between the two renames
            # leaves .NAME.old-PID, which the next export (or open_artifact's message) restores
            old = work_dir_name(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
