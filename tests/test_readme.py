"""The README's Python example runs as written (model files under the names it uses)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from cli_support import ENV

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_python_api_example_runs_as_written(tiny, tmp_path):
    export_block, translate_block = python_blocks("Python API")
    for name, target in (("checkpoint_best.pt", tiny.checkpoint), ("spm.model", tiny.spm), ("dict.txt", tiny.dict)):
        (tmp_path / name).symlink_to(target)
    (tmp_path / "input.txt").write_text("Der Hund schläft.\n\nDie Katze sieht den roten Apfel.\n", encoding="utf-8")
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 600, "env": ENV}
    res = subprocess.run([sys.executable, "-c", export_block], **run)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["fp32", "10", str(json.loads((tmp_path / "model_dir" / "manifest.json").read_text())
                                                     ["model"]["embed_dim"]), "True"]
    res = subprocess.run([sys.executable, "-c", translate_block], **run)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("0 ") and lines[3] == "1 ''"  # two hypotheses for the sentence, none for ""
    records = [json.loads(line) for line in lines[4:]]  # the JSON lines to_json() gives
    assert [r["id"] for r in records] == [0, 1, 2] and records[1]["nbest"] == []
    assert all(h["tokens"][-1] == 2 for r in records for h in r["nbest"])
