"""``deltalm translate-corpus`` on a real local Ray runtime (one per module: Ray starts slowly):
the output of every file is byte for byte what ``deltalm translate`` writes for it, a rerun redoes
only the shards an interrupted run left, and an actor killed by its pid loses and duplicates
nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_support import FAST, assert_one_line_error, run_cli

# every file a shard; together: empty lines, blank lines, CRLF, a byte order mark at the start of
# a file (not text) and in the middle of one (text), a last line without newline, an empty file
FILES = {
    "a.txt": "Die Katze sieht den roten Apfel.\n\nDer Hund schläft.\n   \n\ufeffHallo Welt\nein Haus\n",
    "b.txt": "\ufeffGuten Morgen.\r\nwie geht es dir\n\n\nDas ist gut.",
    "c.txt": "",
    "d.txt": "".join(f"Satz Nummer {i} ist hier.\n" if i % 5 else "\n" for i in range(23)),
}
SEARCH = ["--beam", "2", "--max-len-b", "4"]
CHUNK = ["--chunk-lines", "3"]  # several chunks (actor calls) per file; the reference reads the same chunks


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid``."""
    parents, cmdlines = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdlines[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found[child] = cmdlines.get(child, "")
                frontier.append(child)
    return found


def _actor_pids() -> set[int]:
    return {pid for pid, cmd in _descendants(os.getpid()).items() if "TranslateActor" in cmd}


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 60
        while (
            left := {p: c for p, c in _descendants(os.getpid()).items() if "ray" in c}
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes left after shutdown: {left}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name, text in FILES.items():
        (d / name).write_bytes(text.encode("utf-8"))
    return d


def reference(tiny, path: Path, fmt: str, *extra) -> bytes:
    res = run_cli(
        ["translate", tiny.artifact, "--input", path, "--format", fmt, "--no-progress", *FAST, *SEARCH, *CHUNK, *extra]
    )
    assert res.rc == 0, res.err
    return res.out


def corpus_args(tiny, corpus: Path, out: Path, *extra) -> list:
    return [
        "translate-corpus",
        tiny.artifact,
        "--input",
        *sorted(corpus.iterdir()),
        "--output",
        out,
        "--actors",
        "2",
        "--threads-per-actor",
        "1",
        "--no-progress",
        *CHUNK,
        *SEARCH,
        *extra,
    ]


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_every_file_is_what_deltalm_translate_writes(ray_runtime, tiny, corpus, tmp_path, fmt):
    res = run_cli(corpus_args(tiny, corpus, tmp_path / "out", "--format", fmt))
    assert res.rc == 0, res.err
    suffix = ".txt" if fmt == "text" else ".jsonl"
    for name in FILES:
        out = (tmp_path / "out" / name).with_suffix(suffix).read_bytes()
        assert out == reference(tiny, corpus / name, fmt), name
    assert (tmp_path / "out" / "d.txt").with_suffix(suffix).read_bytes().count(b"\n") == 23
    assert "4 files written" in res.err


def _translate(tiny, corpus: Path, out: Path, on_commit=None):
    from deltalm import TranslateOptions
    from deltalm.cluster import ClusterOptions, CorpusJob, translate_corpus

    job = CorpusJob(str(tiny.artifact), chunk_lines=3, options=TranslateOptions(beam=2, max_len_b=4))
    return translate_corpus(
        job,
        [str(p) for p in sorted(corpus.iterdir())],
        out,
        progress=False,
        cluster=ClusterOptions(actors=2),
        log=lambda line: None,
        on_commit=on_commit,
    )


def test_a_rerun_after_an_interrupted_run_redoes_only_the_unfinished_shards(ray_runtime, tiny, corpus, tmp_path):
    out = tmp_path / "out"
    committed = []

    def interrupt(name):  # as Ctrl-C right after the first shard is committed
        committed.append(name)
        if len(committed) == 2:  # c.txt (empty, no Ray) and one translated shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _translate(tiny, corpus, out, on_commit=interrupt)
    done = {name: (out / name).stat() for name in committed}
    assert sorted(p.name for p in out.iterdir()) == sorted([*committed, "corpus-manifest.json"])  # nothing partial

    summary = _translate(tiny, corpus, out)
    assert sorted(summary.skipped) == sorted(committed)
    assert sorted(summary.written) == sorted(set(FILES) - set(committed))
    for name, st in done.items():  # untouched
        assert (out / name).stat().st_ino == st.st_ino and (out / name).stat().st_mtime_ns == st.st_mtime_ns
    for name in FILES:
        assert (out / name).read_bytes() == reference(tiny, corpus / name, "text"), name


def test_a_rerun_redoes_shards_whose_output_was_changed_or_removed(ray_runtime, tiny, corpus, tmp_path):
    out = tmp_path / "out"
    _translate(tiny, corpus, out)
    (out / "a.txt").unlink()
    with open(out / "d.txt", "ab") as f:
        f.write(b"one line too many\n")
    kept = (out / "b.txt").stat()
    summary = _translate(tiny, corpus, out)
    assert sorted(summary.written) == ["a.txt", "d.txt"]
    assert sorted(summary.skipped) == ["b.txt", "c.txt"]
    assert (out / "b.txt").stat().st_ino == kept.st_ino
    for name in FILES:
        assert (out / name).read_bytes() == reference(tiny, corpus / name, "text"), name
    # other search options: nothing is complete any more
    res = run_cli(corpus_args(tiny, corpus, out, "--lenpen", "0.5"))
    assert res.rc == 0, res.err
    assert "4 files written, 0 already complete" in res.err


def test_an_actor_killed_mid_run_loses_and_duplicates_no_line(ray_runtime, tiny, tmp_path):
    corpus = tmp_path / "big"
    corpus.mkdir()
    (corpus / "first.txt").write_text("Hallo Welt\n")
    for k in range(3):
        (corpus / f"part{k}.txt").write_text("".join(f"Teil {k} Satz {i} ist hier.\n" for i in range(60)))
    before_kill: set[int] = set()
    first_commit = threading.Event()
    result: dict = {}

    def work():
        try:
            result["summary"] = _translate(tiny, corpus, tmp_path / "out", on_commit=lambda name: first_commit.set())
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            result["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert first_commit.wait(timeout=240), "no shard was committed"
    before_kill |= _actor_pids()
    assert before_kill, "no actor process found"
    victim = min(before_kill)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "translate_corpus did not finish after the actor was killed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    for path in sorted(corpus.iterdir()):
        out = (tmp_path / "out" / path.name).read_bytes()
        assert out == reference(tiny, path, "text"), path.name
    assert summary.lines == 181  # each line delivered once (a repeat would count in summary.duplicates)
    # the killed actor's batches were retried on its restarted process (a new pid)
    restarted = {name for name in summary.actors if int(name.rsplit(":", 1)[1]) not in before_kill}
    assert restarted and all(summary.actors[name].lines > 0 for name in restarted)


def test_without_ray_the_command_names_the_extra_in_one_line(tiny, corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import ray raises ImportError
    res = run_cli(["translate-corpus", tiny.artifact, "--input", corpus / "a.txt", "--output", tmp_path / "out"])
    assert_one_line_error(res, "pip install '.[ray]' in the deltalm-deploy checkout")


def test_the_cli_and_the_runtime_do_not_import_ray():
    code = "import sys, deltalm, deltalm.cli, deltalm.cluster; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_line_the_model_cannot_take_is_one_error_naming_its_file_and_line(ray_runtime, tiny, tmp_path):
    (tmp_path / "long.txt").write_text("kurz\n" + "sehr " * 600 + "\n")
    res = run_cli(
        [
            "translate-corpus",
            tiny.artifact,
            "--input",
            tmp_path / "long.txt",
            "--output",
            tmp_path / "out",
            "--no-progress",
            *SEARCH,
        ]
    )
    assert res.rc == 2
    last = res.err.splitlines()[-1]
    assert last.startswith("deltalm: error: ") and "long.txt line 2 has" in last and "--truncate" in last, res.err
    assert not (tmp_path / "out" / "long.txt").exists()


# --- with a vocabulary shortlist -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shortlists(tiny, corpus, tmp_path_factory) -> tuple[Path, Path]:
    """Two different small shortlists of the tiny model, from the corpus's own lines (a parallel
    corpus of the lines with themselves: tokenizing only)."""
    from deltalm import Translator, shortlist_from_corpus

    d = tmp_path_factory.mktemp("shortlists")
    lines = [line for text in FILES.values() for line in text.replace("\ufeff", "").splitlines() if line.strip()]
    with Translator(tiny.artifact, threads=1) as translator:
        shortlist_from_corpus(translator, lines, lines, frequent=4, per_source=2).save(d / "a.npz")
        shortlist_from_corpus(translator, lines, lines[::-1], frequent=12, per_source=6).save(d / "b.npz")
    return d / "a.npz", d / "b.npz"


def test_with_a_shortlist_every_file_is_what_translate_writes_with_it_and_reruns_follow_the_file(
    ray_runtime, tiny, corpus, shortlists, tmp_path
):
    a, b = shortlists
    out = tmp_path / "out"
    res = run_cli(corpus_args(tiny, corpus, out, "--shortlist", a))
    assert res.rc == 0, res.err
    assert "4 files written, 0 already complete" in res.err
    for name in FILES:
        assert (out / name).read_bytes() == reference(tiny, corpus / name, "text", "--shortlist", a), name
    # the shortlist changed some line (else this test could not tell it was used)
    assert any((out / name).read_bytes() != reference(tiny, corpus / name, "text") for name in FILES)

    # the fingerprint holds the bytes of the file: the same bytes elsewhere are the same shortlist
    copy = tmp_path / "elsewhere.npz"
    copy.write_bytes(a.read_bytes())
    res = run_cli(corpus_args(tiny, corpus, out, "--shortlist", copy))
    assert res.rc == 0, res.err
    assert "0 files written, 4 already complete" in res.err
    # another shortlist, then none: every shard redone, each time as translate writes it
    for extra in (["--shortlist", b], []):
        res = run_cli(corpus_args(tiny, corpus, out, *extra))
        assert res.rc == 0, res.err
        assert "4 files written, 0 already complete" in res.err, extra
        for name in FILES:
            assert (out / name).read_bytes() == reference(tiny, corpus / name, "text", *extra), (name, extra)


def test_the_fingerprint_holds_the_shortlist_and_its_batching(tiny, shortlists):
    from deltalm.cluster import CorpusJob
    from deltalm.cluster.shards import fingerprint

    a, b = shortlists

    def config(shortlist, batch_size=32):
        job = CorpusJob(str(tiny.artifact), batch_size=batch_size, shortlist=str(shortlist) if shortlist else None)
        return fingerprint(job.checked().settings())

    plain = config(None)
    assert len({plain, config(a), config(b)}) == 3
    assert config(None, batch_size=8) == plain  # beam search without a shortlist: batching changes nothing
    assert config(a, batch_size=8) != config(a)  # with one, a batch's candidates are its sentences'


@pytest.mark.parametrize(
    "make, extra, fragment",
    [
        (lambda p: p.write_text("not a shortlist\n"), [], "not a shortlist file"),
        (lambda p: __import__("deltalm").build_shortlist([([5], [6])], 7).save(p), [], "vocabulary of 7"),
        (None, ["--backend", "torch"], "--shortlist runs with --backend ort"),
    ],
    ids=["not-a-shortlist", "other-vocabulary", "torch-backend"],
)
def test_a_bad_shortlist_is_one_line_before_ray_starts(tiny, corpus, shortlists, tmp_path, make, extra, fragment):
    path = shortlists[0]
    if make is not None:
        path = tmp_path / "bad.npz"
        make(path)
    res = run_cli(
        [
            "translate-corpus",
            tiny.artifact,
            "--input",
            corpus / "a.txt",
            "--output",
            tmp_path / "out",
            "--shortlist",
            path,
            *extra,
        ]
    )
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_actor_refuses_a_shortlist_that_is_not_the_runs(tiny, shortlists):
    from deltalm.cluster.actor import TranslateActor
    from deltalm.errors import InputError

    a, b = shortlists
    from deltalm.cluster import CorpusJob

    def actor(shortlist, digest):
        job = CorpusJob(str(tiny.artifact), shortlist=shortlist, shortlist_sha256=digest)
        return TranslateActor(job, threads=1, device=None, shard_names={})

    with pytest.raises(InputError, match="not the file the run started with"):
        actor(str(b), hashlib.sha256(a.read_bytes()).hexdigest())
    with pytest.raises(InputError, match="cannot read the shortlist"):
        actor(str(a) + ".gone", "0" * 64)


def test_the_read_stage_takes_no_cpu_on_the_pinned_ray(ray_runtime, tiny, corpus):
    """The repartition's tasks must reserve no CPU (the actors may hold them all): set on Ray
    Data's logical operator, an attribute of Ray's own; this breaks loudly if Ray moves it."""
    import ray

    from deltalm.cluster.runner import NO_CPU, _dataset
    from deltalm.cluster.shards import resolve_shards

    shards = resolve_shards([str(corpus / "a.txt")], "text", corpus.parent / "unused")
    op = _dataset(ray, shards, chunk_lines=2)._logical_plan.dag
    assert op.ray_remote_args["num_cpus"] == NO_CPU["num_cpus"] == 0
