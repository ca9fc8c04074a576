"""Where the commands write: checked before any model is loaded, one line when it cannot be
written, and ``--force`` replaces nothing but an artifact directory of ours (a user's files are
never deleted). Every command that writes is covered: export --out, translate --output,
shortlist --out, translate-corpus --output, bench --out, bench-serve --out."""

from __future__ import annotations

import os
import threading

import pytest
from cli_support import FAST, assert_one_line_error, run_cli

from deltalm.atomic import check_artifact_destination, check_output_directory, check_output_file, foreign_entries
from deltalm.errors import InputError


def export_argv(tiny, out, *extra):
    return ["export", tiny.checkpoint, "--spm", tiny.spm, "--dict", tiny.dict, "--out", out, "--no-optimize", *extra]


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_force_refuses_a_directory_of_the_users_files_and_leaves_it_untouched(tiny, tmp_path):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "data.txt").write_text("my data\n")
    before = siblings(mine)
    res = run_cli(export_argv(tiny, mine, "--force"))
    assert_one_line_error(
        res,
        f"--out {mine} is not an artifact directory",
        "data.txt",
        "nothing was changed",
        "--force replaces artifact directories only",
    )
    assert (mine / "data.txt").read_text() == "my data\n"
    assert sorted(p.name for p in mine.iterdir()) == ["data.txt"]
    assert siblings(mine) == before  # no hidden work directory left beside it


def test_force_refuses_a_regular_file_and_leaves_no_hidden_copy(tiny, tmp_path):
    mine = tmp_path / "file.txt"
    mine.write_text("keep me\n")
    res = run_cli(export_argv(tiny, mine, "--force"))
    assert_one_line_error(res, f"--out {mine} is a file, not an artifact directory")
    assert mine.read_text() == "keep me\n"
    assert siblings(mine) == ["file.txt"]


def test_force_refuses_an_artifact_that_holds_the_users_files_too(tiny, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny.artifact, art)
    (art / "notes.md").write_text("mine\n")
    res = run_cli(export_argv(tiny, art, "--force"))
    assert_one_line_error(res, "holds files that are not part of its artifact (notes.md)")
    assert (art / "notes.md").read_text() == "mine\n" and (art / "manifest.json").is_file()


def test_what_counts_as_an_artifact_of_ours(tiny, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny.artifact, art)
    assert foreign_entries(art) == []
    (art / "manifest.json.tmp").write_text("{}")  # a write of our own, interrupted
    assert foreign_entries(art) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert foreign_entries(empty) is None
    check_artifact_destination(empty, force=False)  # nothing to lose: no --force needed
    check_artifact_destination(art, force=True)
    check_artifact_destination(tmp_path / "new" / "deeper", force=False)
    with pytest.raises(InputError, match="already exists"):
        check_artifact_destination(art, force=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "a web app"}')
    with pytest.raises(InputError, match="not an artifact directory"):
        check_artifact_destination(tmp_path / "other", force=True)


def bad_destinations(tmp_path):
    """(path, fragment of the message): under /proc nothing can be created; under a file, no
    directory can exist."""
    (tmp_path / "in.txt").write_text("Hallo Welt\n")
    return [
        (f"/proc/deltalm-test-{os.getpid()}", "no file can be created in /proc"),
        (tmp_path / "in.txt" / "sub", f"{tmp_path / 'in.txt'} is a file, not a directory"),
    ]


def test_a_bad_out_path_is_one_line_before_anything_is_loaded(tiny, tmp_path):
    # the model arguments point nowhere: an error about them would mean the model came first
    nowhere = tmp_path / "no-such-model"
    for dest, fragment in bad_destinations(tmp_path):
        for argv in (
            ["export", nowhere, "--spm", tiny.spm, "--dict", tiny.dict, "--out", dest],
            ["export", nowhere, "--spm", tiny.spm, "--dict", tiny.dict, "--out", dest, "--force"],
            ["translate", nowhere, "--input", tmp_path / "in.txt", "--output", dest],
            ["shortlist", nowhere, "--source", tmp_path / "in.txt", "--out", dest],
            ["translate-corpus", nowhere, "--input", tmp_path / "in.txt", "--output", dest],
            ["bench", "--model", nowhere, "--out", dest],
            ["bench-serve", "--model", nowhere, "--out", dest],
        ):
            assert_one_line_error(run_cli(argv), str(dest), fragment)


def test_translate_output_that_is_a_pipe_is_written_in_place(tiny, tmp_path):
    fifo = tmp_path / "answers"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    res = run_cli(["translate", tiny.artifact, *FAST, "--output", fifo], stdin=b"Hallo Welt\n")
    reader.join(timeout=60)
    assert res.rc == 0, res.err
    assert fifo.is_fifo()  # not replaced by a regular file
    assert got and got[0].count(b"\n") == 1


def test_translate_output_through_a_link_replaces_the_file_and_keeps_the_link(tiny, tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    res = run_cli(["translate", tiny.artifact, *FAST, "--output", link], stdin=b"Hallo Welt\n")
    assert res.rc == 0, res.err
    assert link.is_symlink() and target.read_text() != "old\n" and target.read_text().count("\n") == 1


def test_the_checks_as_functions(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output_file(tmp_path / "new.txt")
    check_output_directory(tmp_path / "a" / "b")
    with pytest.raises(InputError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(InputError, match="directory of --output .* does not exist"):
        check_output_file(tmp_path / "missing" / "out.txt")
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_output_directory(tmp_path / "f", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probes left nothing


def test_translate_corpus_never_replaces_a_file_it_did_not_write(tiny, tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "a.txt").write_text("Hallo Welt\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("the user's own a.txt\n")
    res = run_cli(["translate-corpus", tiny.artifact, "--input", tmp_path / "a.txt", "--output", out])
    assert_one_line_error(res, "a.txt exists and was not written by translate-corpus", "nothing was changed")
    assert (out / "a.txt").read_text() == "the user's own a.txt\n"
