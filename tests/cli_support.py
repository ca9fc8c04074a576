"""The real ``deltalm`` command in tests: ``run_cli`` calls ``deltalm.cli.main`` in-process with its
own stdin / stdout / stderr; ``DELTALM`` is the installed command for tests that need a process of
their own (to kill it). ``tiny_model`` builds the one small model (checkpoint, tokenizer files and
an exported artifact) that every reliability test shares, once per test session."""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DELTALM = Path(sys.executable).parent / "deltalm"

# Short outputs: the tiny model is barely fitted, and a test needs answers, not good ones. One
# thread: on a busy machine, threads that wait for each other make a tiny model ten times slower.
FAST = ["--beam", "1", "--max-len-b", "4", "--threads", "1"]

# For ``DELTALM`` processes: one thread, for the same reason.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Result:
    rc: int
    out: bytes
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.decode("utf-8").splitlines()


def run_cli(argv: list[str], stdin: bytes | io.IOBase = b"") -> Result:
    """``deltalm ARGV`` in this process; ``stdin`` is bytes or a binary stream read lazily."""
    from deltalm.cli import main

    raw = io.BytesIO(stdin) if isinstance(stdin, bytes) else stdin
    out = io.BytesIO()
    err = io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.TextIOWrapper(raw, encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = err
    try:
        rc = main([str(a) for a in argv])
        sys.stdout.flush()
        return Result(rc, out.getvalue(), err.getvalue())
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved


def assert_one_line_error(res: Result, *fragments: str) -> str:
    """The run failed with exit code 2, printed nothing on stdout and exactly one line on stderr,
    ``deltalm: error: ...`` holding every fragment; returns the message."""
    assert res.rc == 2, (res.rc, res.err)
    assert res.out == b""
    assert "Traceback" not in res.err
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltalm: error: "), res.err
    message = lines[0].removeprefix("deltalm: error: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@dataclass(frozen=True)
class TinyModel:
    checkpoint: Path
    spm: Path
    dict: Path
    artifact: Path


_BUILT: dict[str, TinyModel] = {}


def tiny_model(root: Path) -> TinyModel:
    """The demo model (fairseq checkpoint, spm.model, dict.txt), fitted for a few steps only, and
    its artifact exported with ``deltalm export``; built under ``root`` the first time."""
    if "model" not in _BUILT:
        import torch

        from deltalm.export.toy_model import build_demo_checkpoint

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see FAST
        try:
            spm, dict_path, ckpt = build_demo_checkpoint(root / "model", steps=30)
            artifact = root / "artifact"
            res = run_cli(["export", ckpt, "--spm", spm, "--dict", dict_path, "--out", artifact, "--no-optimize"])
        finally:
            torch.set_num_threads(threads)
        assert res.rc == 0, res.err
        _BUILT["model"] = TinyModel(ckpt, spm, dict_path, artifact)
    return _BUILT["model"]
