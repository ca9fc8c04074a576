"""The README's and the docs' examples run as written.

How to write an example in README.md or docs/**/*.md so that this test runs it:

- Every fenced code block names its language (a block without one fails the test, so that no
  shell example goes unchecked by accident).
- ```bash blocks (also ```sh, ```shell) are run: each with ``bash -euo pipefail``, in the order
  of the file, all in one scratch directory, so a block may use what an earlier one of the same
  file wrote (``model_dir`` after the export). That directory holds the files a user would have,
  under the names the examples use: ``checkpoint_best.pt``, ``spm.model``, ``dict.txt`` (a tiny
  fairseq DeltaLM and its tokenizer), ``input.txt``, ``train.de`` / ``train.en`` (a small parallel
  corpus), ``corpus/*.txt``; ``deltalm`` and ``.venv/bin/deltalm`` are this checkout's. A block
  passes when it exits 0 and prints no traceback. Keep them small: they run in ``make test``.
- A block whose first command is ``deltalm serve ...`` (or ``.venv/bin/deltalm serve``): the server starts in the background, the
  rest of the block runs once its ready line is out, then the server gets SIGTERM and must exit
  0. Port 8000 in such a block is replaced by a free port.
- ```console and ```text blocks are shown, not run: commands that need what a test cannot have
  (a Ray cluster, a GPU, the base-sized model, the test suite itself), usage synopses, diagrams,
  output. Use them for nothing a reader is meant to paste as it is and expect to work here.
- ```python blocks of the README's "Python API" section are run as written by the test below.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_support import ENV

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = ("bash", "sh", "shell")
SHOWN = ("console", "text", "python", "json", "yaml", "toml")
WAIT_S = 300  # per block and for a server's ready line: a loaded machine is slow, never this slow
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.M | re.S)


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line number of the opening fence) of every fenced block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_code_block_names_its_language(doc):
    unnamed = [line for lang, _, line in code_blocks(doc) if lang not in RUN + SHOWN]
    assert not unnamed, f"{doc.name}: code blocks at lines {unnamed} name no known language (see this test's docstring)"


def workspace(tiny, root: Path) -> dict:
    """The files the examples name, and the environment they run in (this checkout's deltalm)."""
    from deltalm.export.toy_data import toy_corpus

    for name, target in (("checkpoint_best.pt", tiny.checkpoint), ("spm.model", tiny.spm), ("dict.txt", tiny.dict)):
        (root / name).symlink_to(target)
    venv = Path(sys.executable).parent.parent
    (root / ".venv").symlink_to(venv)
    corpus = toy_corpus()
    (root / "input.txt").write_text("Die Katze sieht den roten Apfel.\n\nDer Hund schläft.\n", encoding="utf-8")
    (root / "train.de").write_text("\n".join(corpus[:40]) + "\n", encoding="utf-8")
    (root / "train.en").write_text("\n".join(corpus[:40]) + "\n", encoding="utf-8")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(corpus[:3]) + "\n", encoding="utf-8")
    (root / "corpus" / "b.txt").write_text("\n".join(corpus[3:5]) + "\n", encoding="utf-8")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_block(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    lines = code.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    bash = ["bash", "-euo", "pipefail", "-c"]
    if first is None or not lines[first].startswith(("deltalm serve ", ".venv/bin/deltalm serve ")):
        return subprocess.run([*bash, code], cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    lines = code.replace("8000", str(free_port())).splitlines()
    server = subprocess.Popen(
        ["bash", "-c", "exec " + lines[first]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ready.put(server.stdout.readline()), daemon=True).start()
    try:
        try:
            line = ready.get(timeout=WAIT_S)
        except queue.Empty:
            line = ""
        assert line.startswith("deltalm serve: ready on "), (line, server.stderr.read() if server.poll() else "")
        rest = "\n".join(lines[first + 1 :])
        res = subprocess.run([*bash, rest], cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    finally:
        server.terminate()
        try:
            server.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=WAIT_S)
    assert server.returncode == 0, server.stderr.read()
    return res


def shell_blocks(doc: Path) -> list[tuple[str, int]]:
    return [(code, line) for lang, code, line in code_blocks(doc) if lang in RUN]


@pytest.mark.parametrize("doc", [d for d in DOCS if shell_blocks(d)], ids=lambda d: str(d.relative_to(ROOT)))
def test_the_shell_examples_run_as_written(tiny, tmp_path, doc):
    env = workspace(tiny, tmp_path)
    for code, line in shell_blocks(doc):
        res = run_block(code, tmp_path, env)
        where = f"{doc.name}, the block at line {line}"
        assert res.returncode == 0, f"{where} failed (exit {res.returncode}):\n{code}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, f"{where}:\n{res.stderr[-3000:]}"
        if "curl" in code:  # the service answered with results, not an error
            assert "results" in json.loads(res.stdout.splitlines()[-1]), res.stdout


def test_the_python_api_example_runs_as_written(tiny, tmp_path):
    export_block, translate_block = python_blocks("Python API")
    for name, target in (("checkpoint_best.pt", tiny.checkpoint), ("spm.model", tiny.spm), ("dict.txt", tiny.dict)):
        (tmp_path / name).symlink_to(target)
    (tmp_path / "input.txt").write_text("Der Hund schläft.\n\nDie Katze sieht den roten Apfel.\n", encoding="utf-8")
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 600, "env": ENV}
    res = subprocess.run([sys.executable, "-c", export_block], **run)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [
        "fp32",
        "10",
        str(json.loads((tmp_path / "model_dir" / "manifest.json").read_text())["model"]["embed_dim"]),
        "True",
    ]
    assert res.stderr == ""  # the library is silent unless logging is configured
    res = subprocess.run([sys.executable, "-c", translate_block], **run)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("0 ") and lines[3] == "1 ''"  # two hypotheses for the sentence, none for ""
    records = [json.loads(line) for line in lines[4:]]  # the JSON lines to_json() gives
    assert [r["id"] for r in records] == [0, 1, 2] and records[1]["nbest"] == []
    assert all(h["tokens"][-1] == 2 for r in records for h in r["nbest"])


def test_make_translate_after_make_demo_uses_the_demos_artifact():
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "translate", "INPUT=in.txt", "OUT=/nonexistent/export"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert ".venv/bin/deltalm translate demo/artifact " in done.stdout
