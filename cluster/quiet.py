"""What Ray prints while ``translate_corpus`` runs: a normal run shows only our summary, a failed
one only our error line.

Three sources, each quieted the way it allows:

- the ``ray`` logger of the driver (token authentication notes, "Started a local Ray instance"):
  ``ray.init(logging_level=...)``, see ``RAY_INIT_QUIET``; worker output stays in the session's
  log files (``log_to_driver=False``);
- Ray Data's console handler (INFO chatter about plans and execution, a warning that progress
  bars are off, and an ERROR report of an exception raised in a task, which reaches our code
  anyway and is reported there): ``ray_data_console_filtered``, a filter on that handler only,
  so Ray Data's own log file keeps everything and its other warnings still show;
- one ERROR line of Ray's C++ core about actors with restarts whose constructor arguments are in
  the object store (ray-project/ray#53727). Every Ray Data actor pool has them (Ray Data passes its
  map transformer by reference and restarts actors), there is no option to mute one C++ line, and
  the warning does not apply here: the driver holds that reference until the run ends, so a
  restarted actor finds it. ``native_stderr_without`` drops that line from the driver's fd 2 while
  the pipeline runs and copies every other byte.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator

RAY_INIT_QUIET = {"log_to_driver": False, "logging_level": logging.ERROR}

# the C++ core's line (ray-project/ray#53727), the one line native_stderr_without drops
ACTOR_ARGUMENTS_NOTE = b"has constructor arguments in the object store and max_restarts > 0"


class _RayDataConsole(logging.Filter):
    """Ray Data's console during a run: its warnings, except the note that progress bars are off
    (the caller turned them off); not its INFO lines, nor its report of a task's exception (the
    exception itself reaches the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return False
        return "Progress bars disabled" not in record.getMessage()


@contextlib.contextmanager
def ray_data_console_filtered() -> Iterator[None]:
    """``_RayDataConsole`` on the console handlers of the ``ray.data`` logger (not its file
    handlers) while the block runs."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    quiet = _RayDataConsole()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def native_stderr_without(fragment: bytes = ACTOR_ARGUMENTS_NOTE) -> Iterator[None]:
    """While the block runs, this process's fd 2 is the writing end of a pipe (a pseudo-terminal
    when stderr is a terminal, so progress bars still see one); a thread copies what arrives to
    the real stderr at once, minus the complete lines that contain ``fragment``. Processes this
    one starts meanwhile inherit the pipe: start none inside the block. A no-op where fd 2 cannot
    be duplicated."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    if os.isatty(real):
        read_end, write_end = _raw_pty_like(real)
    else:
        read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        try:
            while block := os.read(read_end, 1 << 16):
                # a C++ log line arrives in one write; anything else (progress bars) goes on at once
                lines = block.split(b"\n")
                kept = [line for line in lines[:-1] if fragment not in line]
                _write_all(real, b"".join(line + b"\n" for line in kept) + lines[-1])
        except OSError:  # the pseudo-terminal reports its end as an error
            pass

    thread = threading.Thread(target=pump, name="deltalm-native-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(real, 2)  # the last writing end closes: the pump drains and ends
        thread.join(timeout=10)
        os.close(read_end)
        os.close(real)


def _raw_pty_like(terminal: int) -> tuple[int, int]:
    """(reading end, writing end) of a pseudo-terminal of the size of ``terminal``, passing bytes
    unchanged (no output processing)."""
    import fcntl
    import termios
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    with contextlib.suppress(OSError):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8))
    return master, slave
