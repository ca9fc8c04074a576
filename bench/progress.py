"""What the benchmark says while it runs: log lines on stderr, and a progress bar over its stages
only when stderr is a terminal (tqdm), so that logs and pipes get plain lines."""

from __future__ import annotations

import os
import sys

_active = None  # the bar on screen, if any: log lines are written above it


def log(msg: str) -> None:
    """One line on stderr (above the progress bar when one is shown)."""
    if _active is not None:
        _active.write(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """Stages done out of ``total`` on ``stream`` (default: stderr), with the current stage's
    name and elapsed time / ETA. Shows nothing unless ``stream`` is a terminal."""

    def __init__(self, total: int, desc: str = "bench", stream=None):
        global _active
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.stream = stream
        if hasattr(stream, "isatty") and stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the bench extra is not installed: log lines only
                return
            try:
                size = os.get_terminal_size(stream.fileno())
            except (OSError, ValueError, AttributeError):
                size = os.terminal_size((0, 0))
            # a terminal that reports no size (0 x 0) gets 80 x 24: tqdm would draw nothing there
            self.bar = tqdm(
                total=total,
                desc=desc,
                file=stream,
                unit="stage",
                ncols=size.columns or 80,
                nrows=size.lines or 24,
                leave=True,
                bar_format="{desc}: {n}/{total} stages |{bar}| {elapsed}<{remaining}{postfix}",
            )
            _active = self

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def stage(self, name: str) -> None:
        """Name the stage now running."""
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def add(self, n: int) -> None:
        """More stages than planned (e.g. one per backend found available)."""
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def write(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg, file=self.stream)

    def close(self) -> None:
        global _active
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if _active is self:
            _active = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
