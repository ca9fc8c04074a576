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

Every command that writes checks where it writes first, before any model is loaded:
``check_output_file`` (``--output FILE``), ``check_output_directory`` (a directory written into,
e.g. ``translate-corpus --output``, ``bench --out``) and ``check_artifact_destination`` (a
directory replaced whole, ``export --out``). ``--force`` only ever replaces a directory that is
an artifact of ours (``foreign_entries``); anything else is refused, untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import InputError

log = logging.getLogger(__name__)


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
    # stale_work_dirs returns only names that _WORK_DIR matches
    old = [p for p in stale_work_dirs(out) if (m := _WORK_DIR.match(p.name)) and m["kind"] == "old"]
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


# --- where a command writes: checked before anything slow -----------------------------------------

_MANIFEST = "manifest.json"  # deltalm.manifest.MANIFEST (which imports this module)


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its ancestors that exists (as a file or a directory)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, flag: str, given: str | Path) -> None:
    """Files can be created in ``directory`` (an existing directory) or, when it does not exist
    yet, in the closest ancestor it would be created in. Tried for real: a hidden file is created
    and removed at once (permissions, read-only file systems and /proc answer differently)."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise InputError(f"{flag} {given}: {existing} is a file, not a directory")
    probe = existing / f".deltalm-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise InputError(
            f"cannot write {flag} {given}: no file can be created in {existing} ({e.strerror or e})"
        ) from None
    probe.unlink(missing_ok=True)


def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """``path`` can be written by ``atomic_output``: not a directory, in an existing directory in
    which this process can create files (a device or a pipe such as /dev/null is written in
    place). Raises ``InputError`` naming ``flag``; meant to run before any model is loaded."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not path.is_file():
        return  # /dev/stdout, a named pipe: written in place, nothing replaced
    target = Path(os.path.realpath(path)) if path.is_symlink() else path.absolute()
    if not target.parent.is_dir():
        blocker = _nearest_existing(target.parent)
        if not blocker.is_dir():
            raise InputError(f"{flag} {path}: {blocker} is a file, not a directory")
        raise InputError(f"directory of {flag} {path} does not exist ({target.parent})")
    _check_can_create_in(target.parent, flag, path)


def check_output_directory(path: str | Path, flag: str = "--out") -> None:
    """``path`` is a directory this process can create files in, or one it can create. Raises
    ``InputError`` naming ``flag``; meant to run before any model is loaded."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a directory")
    _check_can_create_in(path, flag, path)


def _work_file(name: str) -> bool:
    """A name our own crash-safe writes use inside a directory (temporary files, work folders)."""
    return name.endswith(".tmp") or _WORK_DIR.match(name) is not None


def foreign_entries(directory: str | Path) -> list[str] | None:
    """The entries of ``directory`` that are not part of the deltalm artifact it holds (the files
    its manifest lists, the manifest, the engines folder, work files of our own writes), sorted;
    None when it holds no manifest.json of ours."""
    directory = Path(directory)
    try:
        data = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "format_version" not in data or not isinstance(data.get("files"), dict):
        return None
    known = {_MANIFEST, "parity.json", "engines"} | {PurePosixPath(str(n)).parts[0] for n in data["files"] if n}
    return sorted(p.name for p in directory.iterdir() if p.name not in known and not _work_file(p.name))


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_artifact_destination(out: str | Path, force: bool, flag: str = "--out") -> None:
    """``out`` can receive an artifact directory: a new directory (its parents are created), an
    empty one, or, with ``force``, an artifact of ours that holds nothing else. A file, a
    directory of anything else, or an artifact next to other files is refused with one line and
    left untouched, ``force`` or not. Meant to run before any model is loaded."""
    out = Path(out)
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise InputError(
                f"{flag} {out} is a file, not an artifact directory: give the path of a new directory"
                + (" (--force replaces artifact directories only)" if force else "")
            )
        foreign = foreign_entries(out)
        entries = sorted(p.name for p in out.iterdir())
        if foreign is None and entries:
            raise InputError(
                f"{flag} {out} is not an artifact directory (it holds {_shown(entries)} and no "
                f"{_MANIFEST} of deltalm); nothing was changed: give a new or empty directory"
                + (" (--force replaces artifact directories only)" if force else "")
            )
        if foreign:
            raise InputError(
                f"{flag} {out} holds files that are not part of its artifact ({_shown(foreign)}); "
                "nothing was changed: move them away or give another directory"
                + (" (--force replaces artifact directories only)" if force else "")
            )
        if foreign is not None and not force:
            raise InputError(f"{out} already exists (use --force to replace it)")
    _check_can_create_in(out.absolute().parent, flag, out)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only complete: written to a temporary file in the
    same directory, fsynced, then renamed over ``path``. On any failure (Ctrl-C included) the
    temporary file is removed and ``path`` is left as it was; the hidden temporary file of a
    killed run is removed by the next run writing ``path``. A symbolic link is followed (the file
    it points to is replaced, the link stays); a device or a pipe (/dev/null, /dev/stdout) is
    written in place, since there is nothing to replace."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        try:
            f = open(path, "wb")
        except OSError as e:
            raise InputError(f"cannot write --output {path}: {e.strerror or e}") from None
        with f:
            yield f
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
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
def atomic_directory(out: Path, force: bool, *, artifact: bool = True):
    """Yield a hidden sibling directory to write into; on success it replaces ``out`` in one
    rename, on any failure (Ctrl-C included) it is deleted. A killed process leaves only a hidden
    ``.NAME.partial-PID`` directory, never something that looks like a complete artifact.
    ``artifact``: ``out`` is an artifact directory, so an existing one is replaced only as
    ``check_artifact_destination`` allows (False: a folder of our own inside one, such as
    ``engines/``)."""
    out = Path(out).resolve()
    if out.parent.exists():
        for line in clean_stale_work_dirs(out):
            log.info(line)
    if artifact:
        check_artifact_destination(out, force)
    elif out.exists() and not force:
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
