"""The wheel, as a user installs it: built from this checkout, installed into a fresh virtual
environment outside it, and run from another directory.

The fresh environment gets the wheel alone (``--no-deps``); its dependencies are made visible from
this test environment's site-packages through a ``.pth`` file, because nothing can be downloaded
here. What the wheel itself must bring (every module, the presets, the command) is therefore
tested for real; what it declares as dependencies is checked in its metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from cli_support import ENV, FAST

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (whl,) = out.glob("deltalm_deploy-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    # the dependencies (numpy, onnxruntime, torch...) from this environment, after the wheel's own files
    Path(site, "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run(bin_dir: Path, *args, cwd: Path, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(bin_dir / "deltalm"), *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_wheel_has_one_top_level_package_and_the_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"deltalm"}
    for preset in ("deltalm-base", "deltalm-large", "tiny"):
        assert f"deltalm/configs/{preset}.json" in names
    assert "deltalm/export/pipeline.py" in names and "deltalm/backends/ort.py" in names
    for page in ("index.html", "page.js", "page.css"):  # deltalm serve's page
        assert f"deltalm/serve/static/{page}" in names


def test_the_wheel_declares_what_each_command_needs(wheel):
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert {r.split("==")[0] for r in runtime} >= {"numpy", "onnxruntime", "sentencepiece"}
    assert not any(r.startswith("torch") for r in runtime)  # translating needs no torch
    export = [r for r in requires if 'extra == "export"' in r]
    assert {r.split("==")[0] for r in export} >= {"torch", "onnx", "safetensors"}


def test_installed_command_works_outside_the_checkout(installed, tiny, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run(installed, "--version", cwd=elsewhere)
    assert res.returncode == 0 and res.stdout.startswith("deltalm ")
    res = run(installed, "inspect", "--config", "deltalm-base", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert "embed_dim: 768" in res.stdout and "vocab_size: 250001" in res.stdout
    res = run(installed, "translate", tiny.artifact, *FAST, cwd=elsewhere, stdin="Die Katze sieht den Apfel.\n")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1
    # the module is the installed one, not this checkout
    py = installed / "python"
    where = subprocess.run(
        [str(py), "-c", "import deltalm; print(deltalm.__file__)"],
        cwd=elsewhere,
        text=True,
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    assert not where.startswith(str(ROOT))


@pytest.mark.slow
def test_installed_bench_quick_runs_outside_the_checkout(installed, tmp_path):
    res = run(installed, "bench", "--quick", "--out", tmp_path / "bench", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "bench" / "bench.json").is_file()
    # the console gets the rates and verdicts; bench.md every figure
    assert len(res.stdout.splitlines()) < 25 and "## Every figure" in (tmp_path / "bench" / "bench.md").read_text()
    assert "Targets" not in res.stdout and "the floor" not in res.stdout


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    """``deltalm export`` where torch cannot be imported: one line naming the extra, exit 2."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import importlib.util; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'torch' else real(n, *a)\n"
        "from deltalm.cli import main\n"
        "sys.exit(main(['export', 'x.pt', '--out', 'o']))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ}
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "deltalm: error: `deltalm export` needs torch: pip install '.[export]' in the deltalm-deploy checkout"
    ]
