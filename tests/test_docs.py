"""The documentation builds strictly, its links resolve, the README fits on a few screens, the docs
describe the product rather than its history, and the code passes its linters and type checker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TIMEOUT_S = 600

# Development history has no place in user docs: the tracker's numbers, work sessions, the
# project's stages. (An export's stages, an ONNX Runtime session are product words and stay.)
HISTORY = re.compile(
    r"\bissues?\s*#?\d+|\bissue's\b|\bthe issue\b|\b(?:this|that|previous|next|earlier|later|other|measuring)\s+sessions?\b"
    r"|\bsessions? (?:share|ran)\b|\bstage[- ]\d|\b(?:this|previous|next|earlier|later) stage\b",
    flags=re.I,
)


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run make venv")
    return str(path)


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250: the rest belongs in docs/)"
    head = "\n".join(lines[:40])
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_the_docs_tell_no_development_history(doc):
    text = doc.read_text(encoding="utf-8")
    found = [(text.count("\n", 0, m.start()) + 1, m[0]) for m in HISTORY.finditer(text)]
    assert not found, f"{doc.relative_to(ROOT)}: history in user docs (line, words): {found}"


def test_every_relative_link_of_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'(?:src|href)="([^"]+)"', text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert local, "no relative links found: the pattern is broken"
    missing = [link for link in local if link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict: a broken link, a page missing from the nav's files, an API reference to a
    moved or renamed object fail the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    res = subprocess.run(
        [tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index.html", "translate/index.html", "serve/index.html", "reference/translator/index.html"):
        assert (site / page).is_file(), page
    reference = (site / "reference/translator/index.html").read_text(encoding="utf-8")
    assert "translate_batch" in reference and "score_batch" in reference  # generated from the docstrings


def test_ruff_finds_nothing():
    res = subprocess.run(
        [tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_the_code_is_formatted():
    res = subprocess.run(
        [tool("ruff"), "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert res.returncode == 0, "run: ruff format .\n" + res.stdout[-6000:] + res.stderr[-2000:]


def test_the_library_type_checks(tmp_path):
    """mypy on the package deltalm (runtime/), as installed (strict editable: a plain package)."""
    res = subprocess.run(
        [tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "Success" in res.stdout


def test_the_version_is_the_changelogs():
    import deltalm

    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert released and released[0] == deltalm.__version__
    cli = subprocess.run([str(BIN / "deltalm"), "--version"], capture_output=True, text=True, timeout=120)
    assert cli.stdout.strip() == f"deltalm {released[0]}"
    assert (ROOT / "CONTRIBUTING.md").is_file()


def test_mkdocs_is_pinned_where_make_venv_installs_it():
    lock = (ROOT / "requirements.lock").read_text()
    for name in ("mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "ruff", "mypy"):
        assert re.search(rf"^{re.escape(name)}==\d", lock, flags=re.M), name
    assert shutil.which("mkdocs", path=str(BIN))
