"""``deltalm translate-corpus`` as a user runs it: a process of its own that starts its own Ray.
A normal run prints our summary and nothing of Ray's; a failed one prints our one line and
nothing else; wildcard inputs are expanded, local paths and URIs alike."""

from __future__ import annotations

import subprocess

import pytest
from cli_support import DELTALM, ENV, FAST

from deltalm.cluster.shards import expand_inputs
from deltalm.errors import InputError

WAIT_S = 300  # a local Ray starts in seconds; a loaded machine is slow, never this slow


def test_wildcards_are_expanded_for_local_paths_and_uris(tmp_path):
    for name in ("part-2.txt", "part-1.txt", "other.txt"):
        (tmp_path / name).write_text("Hallo\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part-3.txt").write_text("Hallo\n")  # one level deeper: not matched by part-*.txt
    want = [str(tmp_path / "part-1.txt"), str(tmp_path / "part-2.txt")]
    assert expand_inputs([str(tmp_path / "part-*.txt")]) == want
    assert expand_inputs([f"file://{tmp_path}/part-*.txt"]) == [f"file://{p}" for p in want]
    assert expand_inputs([f"{tmp_path}/*/part-?.txt"]) == [str(tmp_path / "sub" / "part-3.txt")]
    assert expand_inputs([str(tmp_path / "other.txt")]) == [str(tmp_path / "other.txt")]  # no pattern: as given
    with pytest.raises(InputError, match=r"--input file://.*/nothing-\*\.txt matches no file"):
        expand_inputs([f"file://{tmp_path}/nothing-*.txt"])


def run(*argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(DELTALM), *map(str, argv)], capture_output=True, text=True, env=env, timeout=WAIT_S)


def test_a_run_prints_only_our_summary_and_a_failed_one_only_our_error(tiny, tmp_path):
    pytest.importorskip("ray")
    corpus = tmp_path / "mono"
    corpus.mkdir()
    (corpus / "part-1.txt").write_text("Die Katze sieht den roten Apfel.\n\nDer Hund schläft.\n")
    (corpus / "part-2.txt").write_text("Guten Morgen.\n")
    (corpus / "bad.txt").write_bytes(b"Hallo\n\xc3\x28 kaputt\n")
    out = tmp_path / "out"

    done = run(
        "translate-corpus",
        tiny.artifact,
        "--input",
        f"file://{corpus}/part-*.txt",
        "--output",
        out,
        *FAST[:4],
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith("translate-corpus: 2 files written, 0 already complete; 4 lines, "), done.stderr
    assert lines[1].startswith("  ray: init ") and all(line.startswith("  actor ") for line in lines[2:]), done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["corpus-manifest.json", "part-1.txt", "part-2.txt"]
    assert (out / "part-1.txt").read_text().count("\n") == 3

    done = run(
        "translate-corpus", tiny.artifact, "--input", corpus / "bad.txt", "--output", out, *FAST[:4], "--no-progress"
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"deltalm: error: {corpus / 'bad.txt'} line 2 is not valid UTF-8 (byte 0xc3 at byte 1); "
        "pass --errors replace to translate it with U+FFFD for bad bytes\n"
    )
