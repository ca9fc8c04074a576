"""The command line as people use it: interactive input, what the help and the README promise, and
the errors a new user meets first. Each test runs the real command."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time

import pytest
from cli_support import DELTALM, ENV, FAST, assert_one_line_error, run_cli

SENTENCES = ["Die Katze sieht den roten Apfel.", "Der Hund schläft."]


def read_line(proc: subprocess.Popen, timeout: float = 120.0) -> bytes:
    """One line of the process's stdout, or a failure after ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no answer within {timeout}s (got {buf!r})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            assert chunk, f"stdout closed early ({proc.stderr.read()!r})"
            buf += chunk
    return buf


def test_a_line_written_to_an_open_pipe_is_answered_before_the_next_is_sent(tiny):
    expected = run_cli(["translate", tiny.artifact, *FAST], stdin="\n".join(SENTENCES).encode() + b"\n").lines
    proc = subprocess.Popen(
        [str(DELTALM), "translate", str(tiny.artifact), *FAST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    try:
        answers = []
        for sentence in SENTENCES:
            proc.stdin.write(sentence.encode() + b"\n")
            proc.stdin.flush()  # the pipe stays open: no end of input
            answers.append(read_line(proc).decode().rstrip("\n"))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert answers == expected


def test_buffer_size_translates_n_lines_at_a_time(tiny):
    res = run_cli(
        ["translate", tiny.artifact, *FAST, "--buffer-size", "2"], stdin="\n".join(SENTENCES * 2).encode() + b"\n"
    )
    assert res.rc == 0, res.err
    assert len(res.lines) == 4 and res.lines[:2] == res.lines[2:]


def test_backend_torch_on_an_artifact_directory_runs_the_checkpoint_its_manifest_names(tiny):
    line = (SENTENCES[0] + "\n").encode()
    ort = run_cli(["translate", tiny.artifact, *FAST, "--format", "jsonl"], stdin=line)
    torch = run_cli(["translate", tiny.artifact, "--backend", "torch", *FAST, "--format", "jsonl"], stdin=line)
    assert ort.rc == 0 and torch.rc == 0, torch.err
    a, b = json.loads(ort.lines[0])["nbest"][0], json.loads(torch.lines[0])["nbest"][0]
    assert a["tokens"] == b["tokens"]
    assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_a_checkpoint_file_given_as_the_artifact_says_how_to_translate_it(tiny):
    res = run_cli(["translate", tiny.checkpoint])
    assert_one_line_error(
        res, f"{tiny.checkpoint} is a file, not an artifact directory", "--checkpoint", "deltalm export"
    )


def test_inspect_describes_an_artifact(tiny):
    res = run_cli(["inspect", tiny.artifact])
    assert res.rc == 0, res.err
    text = res.out.decode()
    for fragment in (
        "precision: fp32",
        "topk: 10",
        "parity: passed",
        "decoder_step: decoder_step.onnx",
        "engines: none",
    ):
        assert fragment in text, (fragment, text)


def test_inspect_a_preset(tiny):
    res = run_cli(["inspect", "--config", "deltalm-base", "--json"])
    assert res.rc == 0
    assert json.loads(res.out)["config"]["embed_dim"] == 768


def test_a_beam_beyond_the_in_graph_topk_says_so_once(tiny):
    res = run_cli(
        ["translate", tiny.artifact, "--beam", "6", "--max-len-b", "4", "--threads", "1"],
        stdin="\n".join(SENTENCES * 3).encode() + b"\n",
    )
    assert res.rc == 0, res.err
    notes = [line for line in res.err.splitlines() if "in-graph top-k" in line]
    assert len(notes) == 1 and "--beam 6" in notes[0] and "--topk 12" in notes[0]
    quiet = run_cli(
        ["translate", tiny.artifact, "--beam", "5", "--max-len-b", "4", "--threads", "1"],
        stdin=SENTENCES[0].encode() + b"\n",
    )
    assert "in-graph top-k" not in quiet.err


def test_export_checks_its_destination_before_loading_anything(tiny, tmp_path):
    res = run_cli(
        ["export", tmp_path / "no-such-checkpoint.pt", "--spm", tiny.spm, "--dict", tiny.dict, "--out", tiny.artifact]
    )
    assert_one_line_error(res, f"{tiny.artifact} already exists", "--force")


def test_tolerance_is_refused_for_reduced_precisions(tiny, tmp_path):
    res = run_cli(
        [
            "export",
            tiny.checkpoint,
            "--spm",
            tiny.spm,
            "--dict",
            tiny.dict,
            "--out",
            tmp_path / "q",
            "--precision",
            "int8",
            "--tolerance",
            "1e-9",
        ]
    )
    assert_one_line_error(res, "--tolerance applies to fp32", "int8 has its own verdict")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "config file not found"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"embed_dim": ', "not valid JSON"),
        ('{"embed_dim": "wide"}', "config field embed_dim must be a int"),
    ],
)
def test_a_bad_config_file_is_one_line(tiny, tmp_path, content, fragment):
    path = tmp_path / "cfg.json"
    if content is not None:
        path.write_text(content)
    for argv in (
        ["inspect", "--config", path],
        [
            "export",
            tiny.checkpoint,
            "--spm",
            tiny.spm,
            "--dict",
            tiny.dict,
            "--out",
            tmp_path / "out",
            "--config",
            path,
        ],
    ):
        assert_one_line_error(run_cli(argv), str(path), fragment)


def test_a_misspelled_option_gets_the_subcommands_usage_and_the_option_meant(tiny):
    done = subprocess.run(
        [str(DELTALM), "translate", str(tiny.artifact), "--beams", "5"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith("usage: deltalm translate ")
    assert lines[-1] == "deltalm translate: error: unrecognized arguments: --beams 5; did you mean --beam?"


def test_a_misspelled_subcommand_gets_the_one_meant():
    done = subprocess.run([str(DELTALM), "translat", "dir"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("; did you mean 'translate'?")


def test_an_artifact_given_to_export_as_the_checkpoint_says_what_it_is(tiny, tmp_path):
    res = run_cli(["export", tiny.artifact, "--out", tmp_path / "again"])
    assert_one_line_error(
        res,
        f"{tiny.artifact} is an artifact directory (exported already), not a checkpoint",
        f"`deltalm translate {tiny.artifact}`",
        f"give the checkpoint it was exported from ({tiny.checkpoint.resolve()})",
    )


@pytest.mark.parametrize(
    "command, extra",
    [
        ("serve", []),
        ("shortlist", ["--source", "in.txt", "--out", "sl.npz"]),
        ("translate-corpus", ["--input", "in.txt", "--output", "out"]),
    ],
)
def test_a_checkpoint_given_where_an_artifact_belongs_says_to_export_it_first(tiny, tmp_path, command, extra):
    res = run_cli([command, tiny.checkpoint, *[tmp_path / a if "." in a or a == "out" else a for a in extra]])
    assert_one_line_error(
        res,
        f"{tiny.checkpoint} is a file (a checkpoint?), not an artifact directory",
        f"`deltalm export {tiny.checkpoint} --spm SPM --dict DICT --out DIR`",
        f"`deltalm {command} DIR`",
    )


def test_the_demo_explains_its_rows_and_ends_with_the_artifact_and_commands_that_work(tiny, tmp_path):
    import shutil
    import sys
    from pathlib import Path

    work = tmp_path / "demo"
    work.mkdir()
    for f in (tiny.checkpoint, tiny.spm, tiny.dict):  # the demo builds no model when one is there
        shutil.copy(f, work / Path(f).name)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "demo.py"), "--workdir", str(work)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert "to copy its input, so a good answer is the source itself;" in done.stdout
    assert "a row marked * differs from it: a mistake of this barely trained model" in done.stdout
    header = next(i for i, line in enumerate(out) if line.split() == ["source", "|", "ort", "(beam", "5)"])
    rows = out[header + 1 : header + 7]
    assert len(rows) == 6 and all(
        line[0] == ("*" if line[2:].split(" | ")[0].rstrip() != line.split(" | ")[1] else " ") for line in rows
    ), rows
    assert out[-4] == f"Your artifact is in {work / 'artifact'}; try:"
    commands = [line.strip().split("     # ")[0] for line in out[-3:]]
    assert commands[0].startswith("echo ") and " translate " in commands[0] and " inspect " in commands[1]
    assert " serve " in commands[2]
    for command in commands[:2]:  # the serve one would not end; test_serve covers it
        ran = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300
        )
        assert ran.returncode == 0 and ran.stdout.strip(), (command, ran.stderr)
