"""``deltalm translate``: streaming, batching, order, output formats, errors and options, with a
copying fake backend and the toy tokenizer (no model files)."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deltalm import translator as translator_module
from deltalm.cli import _as_command_line
from deltalm.commands.translate import add_arguments as add_translate_arguments
from deltalm.commands.translate import open_translator
from deltalm.commands.translate import run as run_translate
from deltalm.config import ModelConfig
from deltalm.errors import DeltaLMError, InputError
from deltalm.export.toy_data import build_toy_tokenizer, toy_corpus
from deltalm.tokenizer import Tokenizer
from deltalm.translator import Translator, format_translation

EOS, PAD = 2, 1


class CopyBackend:
    """A model that translates by copying: at step t the likely token (log-prob ~0, every other
    token -10) is source token t - tgt_skip after the first src_skip source tokens, then </s>.
    So the best hypothesis of a line decodes to the line itself, which makes order mix-ups show.
    Keeps each sentence's source in its "cross K/V" (as a real encoder keeps what the step reads);
    records the source batch of every ``encode``; can fail on the n-th encode or step."""

    def __init__(
        self,
        vocab_size,
        max_positions=512,
        src_skip=0,
        tgt_skip=0,
        fail_on_batch=None,
        on_encode=None,
        fail_on_step=None,
    ):
        from deltalm.backends import BatchLimits
        from deltalm.graphs import decoder_step_spec

        self.cfg = ModelConfig(
            kind="deltalm",
            embed_dim=2,
            ffn_dim=2,
            encoder_layers=1,
            decoder_layers=1,
            heads=2,
            vocab_size=vocab_size,
            max_positions=max_positions,
        )
        self.topk = 0  # candidates always come from the full log-probs
        self.step_spec = decoder_step_spec(self.cfg, 1)
        self.float_dtype = np.dtype(np.float32)
        self.limits = BatchLimits()
        self.src_skip, self.tgt_skip = src_skip, tgt_skip
        self.fail_on_batch, self.fail_on_step = fail_on_batch, fail_on_step
        self.on_encode = on_encode
        self.batches: list[np.ndarray] = []
        self.steps = 0

    def close(self):
        pass

    def encode(self, src):
        from deltalm.backends import Encoded

        self.batches.append(np.array(src))
        if self.on_encode:
            self.on_encode()
        if self.fail_on_batch == len(self.batches):
            raise RuntimeError("out of device memory")
        cross = np.repeat(np.asarray(src, np.float32)[:, None, :, None], 2, axis=1)
        return Encoded(cross=[cross, cross], padding=np.asarray(src) == PAD)

    def run_step(self, feeds):
        from deltalm.backends import StepOutput

        self.steps += 1
        if self.fail_on_step == self.steps:
            raise RuntimeError("out of device memory")
        rows = len(feeds["tokens"])
        group = rows // feeds["src_padding"].shape[0]
        lp = np.full((rows, 1, self.cfg.vocab_size), -10.0, dtype=np.float32)
        for r in range(rows):
            s = r // group
            src = [int(t) for t, pad in zip(feeds["cross_key_0"][s, 0, :, 0], feeds["src_padding"][s]) if not pad]
            src = src[self.src_skip :]
            t = int(feeds["positions"][r]) - self.tgt_skip
            lp[r, 0, src[t] if 0 <= t < len(src) else EOS] = 0.0
        lp = lp - np.log(np.exp(lp).sum(axis=2, keepdims=True)).astype(np.float32)
        empty = np.zeros((rows, 1, 1), np.float32)
        new = np.zeros((rows, 2, 1, 1), np.float32)
        return StepOutput(
            topk_scores=empty, topk_ids=empty.astype(np.int64), token_scores=empty, log_probs=lp, new_kv=[new, new]
        )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A directory with the toy spm.model and dict.txt, as an artifact directory has them."""
    d = tmp_path_factory.mktemp("artifact")
    build_toy_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(artifact) -> Tokenizer:
    return Tokenizer.from_files(artifact / "spm.model", artifact / "dict.txt")


@pytest.fixture
def backend(tok):
    return CopyBackend(len(tok))


def run(backend, tok, lines, search=None, warn=None, tgt_prefix=None, **stream):
    """All translations of ``lines`` through a Translator over ``backend``."""
    extra = {"warn": warn} if warn else {}
    translator = Translator.from_backend(backend, tok, tgt_prefix=tgt_prefix, **extra)
    return list(translator.translate_iterable(lines, **stream, **(search or {"beam": 2})))


def mixed_lines(n=23):
    """Lines of clearly different lengths (1 to 3 corpus sentences), a few empty."""
    corpus = toy_corpus()
    out = []
    for i in range(n):
        out.append("" if i % 9 == 4 else " ".join(corpus[(7 * i + j) % 400] for j in range(1 + i % 3)))
    return out


def parse(argv):
    p = argparse.ArgumentParser()
    add_translate_arguments(p)
    return p.parse_args(argv)


# --- order, batching, empty lines -----------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_outputs_come_back_in_input_order_after_length_sorting(backend, tok, batch_size):
    lines = mixed_lines()
    out = run(backend, tok, lines, batch_size=batch_size)
    assert [t.index for t in out] == list(range(len(lines)))
    assert [t.text for t in out] == lines
    assert all(b.shape[0] <= batch_size for b in backend.batches)
    widths = [b.shape[1] for b in backend.batches]
    assert widths == sorted(widths, reverse=True)  # the backend saw the longest sources first
    assert sum(b.shape[0] for b in backend.batches) == sum(1 for line in lines if line)


def test_max_tokens_bounds_padded_batch_size_and_order_is_kept(backend, tok):
    lines = mixed_lines(30)
    out = run(backend, tok, lines, batch_size=None, max_tokens=200)
    assert [t.text for t in out] == lines
    assert all(b.shape[0] * b.shape[1] <= 200 for b in backend.batches)
    assert max(b.shape[0] for b in backend.batches) > 1


def test_empty_and_blank_lines_give_empty_outputs_without_the_backend(backend, tok):
    lines = ["", "   ", toy_corpus()[0], "\n"]
    out = run(backend, tok, lines)
    assert [t.text for t in out] == ["", "", toy_corpus()[0], ""]
    assert [format_translation(t, "jsonl") for t in out][0] == '{"id": 0, "nbest": []}'
    assert sum(b.shape[0] for b in backend.batches) == 1


def test_a_chunk_of_only_empty_lines_never_calls_the_backend(backend, tok):
    assert [t.text for t in run(backend, tok, ["", "", ""])] == ["", "", ""]
    assert backend.batches == []


def test_line_endings_and_a_byte_order_mark_are_not_text(backend, tok):
    s = toy_corpus()[5]
    out = run(backend, tok, [b"\xef\xbb\xbf" + s.encode() + b"\r\n", s.encode() + b"\n", s])
    assert [t.text for t in out] == [s, s, s]


# --- output formats -------------------------------------------------------------------------------


def test_jsonl_holds_the_nbest_with_eos_terminated_tokens_and_positional_scores(backend, tok):
    lines = [toy_corpus()[3], "", toy_corpus()[200]]
    search = {"beam": 4, "nbest": 3, "lenpen": 1.0, "max_len_b": 60}
    records = [json.loads(format_translation(t, "jsonl")) for t in run(backend, tok, lines, search)]
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[1] == {"id": 1, "nbest": []}
    for r, line in zip([records[0], records[2]], [lines[0], lines[2]]):
        assert len(r["nbest"]) == 3
        assert set(r["nbest"][0]) == {"tokens", "score", "positional_scores", "text"}
        scores = [h["score"] for h in r["nbest"]]
        assert scores == sorted(scores, reverse=True)
        for h in r["nbest"]:
            assert h["tokens"][-1] == EOS
            assert len(h["positional_scores"]) == len(h["tokens"])
            assert h["score"] == pytest.approx(sum(h["positional_scores"]) / len(h["tokens"]), rel=1e-5)
        best = r["nbest"][0]
        assert best["text"] == line
        assert best["tokens"] == tok.encode(line)  # the copy model reproduces the source ids


def test_target_prefix_is_forced_in_tokens_and_removed_from_text(tok):
    tag = tok.encode_target_prefix(["__de__"])
    backend = CopyBackend(len(tok), tgt_skip=1)
    line = toy_corpus()[10]
    (t,) = run(backend, tok, [line], {"beam": 2, "max_len_b": 60}, tgt_prefix=["__de__"])
    assert t.hypotheses[0].tokens[0] == tag[0]
    assert t.text == line
    assert json.loads(format_translation(t, "jsonl"))["nbest"][0]["text"] == line


def test_source_prefix_is_put_in_front_of_every_source(artifact):
    tok = Tokenizer.from_files(artifact / "spm.model", artifact / "dict.txt", ["__fr__"])
    backend = CopyBackend(len(tok), src_skip=1)
    lines = toy_corpus()[:3]
    assert [t.text for t in run(backend, tok, lines)] == lines
    tag = tok.dictionary.index("__fr__")
    for b in backend.batches:
        for row in b:
            assert row[row != PAD][0] == tag


# --- bad input ------------------------------------------------------------------------------------


def test_invalid_utf8_is_an_error_naming_the_line(backend, tok):
    lines = [b"good line\n", b"caf\xe9 au lait\n", b"fine\n"]
    with pytest.raises(InputError, match=r"input line 2 is not valid UTF-8.*--errors replace"):
        run(backend, tok, lines)


def test_errors_replace_translates_invalid_utf8_with_the_replacement_character(backend, tok):
    lines = [toy_corpus()[0].encode() + b"\n", b"caf\xe9 au lait\n"]
    out = run(backend, tok, lines, errors="replace")
    assert out[0].text == toy_corpus()[0]
    assert out[1].text == tok.decode(tok.encode("caf\ufffd au lait"))


def test_too_long_line_is_an_error_naming_the_line(tok):
    backend = CopyBackend(len(tok), max_positions=20)
    short, long_ = "Le chat voit.", toy_corpus()[0] + " " + toy_corpus()[1]
    assert len(tok.encode(long_)) > 20
    with pytest.raises(InputError, match=r"input line 3 has \d+ source tokens.*at most 20.*--truncate"):
        run(backend, tok, [short, short, long_])
    assert backend.batches == []  # checked before anything of the chunk runs


def test_truncate_cuts_the_source_to_the_model_positions_and_warns(tok):
    backend = CopyBackend(len(tok), max_positions=20)
    warnings = []
    long_ = toy_corpus()[0] + " " + toy_corpus()[1]
    out = run(backend, tok, ["Le chat voit.", long_], truncate=True, warn=warnings.append)
    assert len(warnings) == 1 and "input line 2" in warnings[0] and "truncated" in warnings[0]
    assert backend.batches[0].shape[1] == 20
    assert out[1].hypotheses[0].tokens == tok.encode(long_)[:19] + [EOS]
    assert out[0].text == "Le chat voit."


def test_truncate_warning_goes_to_stderr(tok, capsys):
    backend = CopyBackend(len(tok), max_positions=10)
    run(backend, tok, [toy_corpus()[0]], truncate=True)
    assert "deltalm: warning: input line 1" in capsys.readouterr().err


def test_source_prefix_counts_toward_the_model_positions(artifact):
    tok = Tokenizer.from_files(artifact / "spm.model", artifact / "dict.txt", ["__de__"])
    plain = Tokenizer.from_files(artifact / "spm.model", artifact / "dict.txt")
    line = "Le chat voit."
    limit = len(plain.encode(line))  # the line fits exactly without the prefix
    assert [t.text for t in run(CopyBackend(len(tok), max_positions=limit), plain, [line])] == [line]
    with pytest.raises(InputError, match=f"input line 1 has {limit + 1} source tokens"):
        run(CopyBackend(len(tok), max_positions=limit, src_skip=1), tok, [line])


# --- streaming and failures -----------------------------------------------------------------------


def test_input_is_read_chunk_by_chunk(backend, tok):
    corpus = toy_corpus()
    consumed = []

    def lines():
        for i in range(50):
            consumed.append(i)
            yield corpus[i]

    seen_at_first_batch = []
    backend.on_encode = lambda: seen_at_first_batch.append(len(consumed))
    stream = Translator.from_backend(backend, tok).translate_iterable(lines(), beam=1, max_len_b=60, chunk_lines=10)
    assert consumed == []  # nothing is read before the first translation is asked for
    first = [next(stream) for _ in range(10)]
    assert [t.text for t in first] == corpus[:10]
    assert len(consumed) == 10 and seen_at_first_batch[0] == 10
    rest = list(stream)
    assert [t.index for t in rest] == list(range(10, 50))


def lines_named(message: str) -> set[int]:
    """The input line numbers an error message names before its first colon ("3-5, 9" too; after
    "FILE lines" when it names the --input file)."""
    head = re.split(r"\blines? ", message.split(":")[0])[-1]
    named = set()
    for a, b in re.findall(r"(\d+)(?:-(\d+))?", head):
        named.update(range(int(a), int(b or a) + 1))
    return named


def _failing_lines():
    corpus = toy_corpus()
    return [corpus[0], f"{corpus[1]} {corpus[2]}", corpus[6], f"{corpus[3]} {corpus[4]} {corpus[5]}", corpus[9]]


def test_a_failing_encoder_run_names_the_lines_it_was_encoding(tok):
    lines = _failing_lines()
    by_length = sorted(range(5), key=lambda i: (-len(tok.encode(lines[i])), i))
    with pytest.raises(DeltaLMError) as err:
        run(CopyBackend(len(tok), fail_on_batch=1), tok, lines, batch_size=2)
    # longest first, two at a time: the first encoder run holds the two longest lines
    assert lines_named(str(err.value)) == {i + 1 for i in by_length[:2]}
    assert err.value.keys == sorted(by_length[:2])  # 0-based positions in the input
    assert "RuntimeError: out of device memory" in str(err.value)


def test_a_failing_step_names_the_lines_it_was_decoding(tok):
    lines = _failing_lines()
    by_length = sorted(range(5), key=lambda i: (-len(tok.encode(lines[i])), i))
    with pytest.raises(DeltaLMError) as err:
        run(CopyBackend(len(tok), fail_on_step=3), tok, lines, batch_size=3)
    assert lines_named(str(err.value)) == {i + 1 for i in by_length[:3]}


# --- the command: files, stdout, options ----------------------------------------------------------


@pytest.fixture
def fake_load(monkeypatch, tok):
    """Replaces load_backend: records its calls and hands out a CopyBackend."""
    calls = []

    def load(name, source, **options):
        calls.append((name, source, options))
        return load.backend

    load.backend = CopyBackend(len(tok))
    load.calls = calls
    monkeypatch.setattr(translator_module, "load_backend", load)
    return load


def test_output_file_is_written_whole(artifact, fake_load, tmp_path):
    lines = mixed_lines(12)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert run_translate(parse([str(artifact), "--input", str(src), "--output", str(out), "--batch-size", "3"])) == 0
    assert out.read_text(encoding="utf-8").split("\n") == lines + [""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_failed_run_leaves_no_output_file_and_names_the_lines(artifact, fake_load, tok, tmp_path):
    lines = toy_corpus()[:8]
    by_length = sorted(range(8), key=lambda i: (-len(tok.encode(lines[i])), i))
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    fake_load.backend.fail_on_batch = 1
    with pytest.raises(DeltaLMError) as err:
        run_translate(parse([str(artifact), "--input", str(src), "--output", str(out), "--batch-size", "2"]))
    assert f"{src} lines " in str(err.value)  # the lines of the --input file
    assert lines_named(str(err.value).split(f"{src} ")[1]) == {i + 1 for i in by_length[:2]}  # the first two decoded
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # no temporary file left


def test_failed_run_keeps_an_existing_output_file(artifact, fake_load, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"ok\n\xff\n")
    out = tmp_path / "out.txt"
    out.write_text("previous\n")
    with pytest.raises(InputError, match=f"^{re.escape(str(src))} line 2 is not valid UTF-8"):
        run_translate(parse([str(artifact), "--input", str(src), "--output", str(out)]))
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_stdin_to_stdout_in_jsonl(artifact, fake_load, monkeypatch, capsys):
    lines = [toy_corpus()[1], "", toy_corpus()[2]]
    stdin = io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert (
        run_translate(parse([str(artifact), "--format", "jsonl", "--beam", "2", "--nbest", "2", "--chunk-lines", "2"]))
        == 0
    )
    captured = capsys.readouterr()
    records = [json.loads(x) for x in captured.out.splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2]
    assert [r["nbest"][0]["text"] if r["nbest"] else "" for r in records] == lines
    assert captured.err == ""  # no progress bar: stdin, and stderr is not a terminal


class FlushCountingBytes(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.at_flush: list[bytes] = []

    def flush(self):
        self.at_flush.append(self.getvalue())


def test_stdout_is_flushed_after_every_chunk(artifact, fake_load, monkeypatch, tmp_path):
    lines = toy_corpus()[:5]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stdout = io.TextIOWrapper(FlushCountingBytes(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    run_translate(parse([str(artifact), "--input", str(src), "--chunk-lines", "2"]))
    written = [b.decode().splitlines() for b in stdout.buffer.at_flush if b]
    assert written[:3] == [lines[:2], lines[:4], lines]


class TerminalStderr(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_for_a_file_input(artifact, fake_load, monkeypatch, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(toy_corpus()[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    for extra, shown in [([], True), (["--no-progress"], False)]:
        stderr = TerminalStderr()
        monkeypatch.setattr(sys, "stderr", stderr)
        run_translate(parse([str(artifact), "--input", str(src), "--output", str(out), *extra]))
        shown_text = stderr.getvalue()
        assert ("100%" in shown_text and "4 lines" in shown_text and shown_text.endswith("\n")) == shown
        assert stderr.getvalue() == "" or shown


def test_open_model_passes_directory_options_to_the_backend(artifact, fake_load):
    tok = open_translator(parse([str(artifact), "--threads", "3", "--src-prefix", "__de__"])).tokenizer
    assert fake_load.calls == [("ort", artifact, {"device": "cpu", "threads": 3})]
    assert tok.src_prefix == [tok.dictionary.index("__de__")]
    open_translator(parse([str(artifact), "--backend", "trt"]))
    assert fake_load.calls[-1][2]["device"] == "cuda"


def test_open_model_passes_checkpoint_options_to_the_torch_backend(artifact, fake_load, tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    dict_path = str(artifact / "dict.txt")
    open_translator(
        parse(
            ["--checkpoint", str(ckpt), "--spm", str(artifact / "spm.model"), "--dict", dict_path, "--config", "tiny"]
        )
    )
    assert fake_load.calls == [("torch", str(ckpt), {"config": "tiny", "dict_path": dict_path, "threads": None})]


def test_unknown_prefix_token_fails_before_the_backend_loads(artifact, fake_load):
    with pytest.raises(DeltaLMError, match="__xx__"):
        open_translator(parse([str(artifact), "--tgt-prefix", "__xx__"]))
    assert fake_load.calls == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beam", "0"], "--beam must be >= 1"),
        (["--beam", "2", "--nbest", "3", "--format", "jsonl"], r"--nbest must be between 1 and --beam \(2\), got 3"),
        (["--nbest", "2"], "--nbest > 1 needs --format jsonl"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--chunk-lines", "0"], "--chunk-lines must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--topk", "5"], "--sampling-topk applies only with --sampling"),
        (["--sampling-topp", "0.5"], "--sampling-topp applies only with --sampling"),
        (["--sampling", "--topk", "5", "--topp", "0.9"], "not both"),
        (["--sampling", "--topp", "0"], r"--sampling-topp must be in \(0, 1\]"),
        (["--min-len", "10", "--max-len-b", "5"], "--min-len 10 exceeds --max-len-b 5"),
        (["--spm", "x.model"], "--spm go with --checkpoint"),
        (["--backend", "torch", "--device", "cuda"], "the torch backend runs on the CPU"),
        (["--backend", "trt", "--device", "cpu"], "trt runs on --device cuda only"),
        (["--checkpoint", "c.pt"], "--checkpoint needs --spm and --dict"),
        (
            ["--checkpoint", "c.pt", "--spm", "s", "--dict", "d", "--device", "cuda"],
            "--device applies to the ort and trt",
        ),
        (
            ["--checkpoint", "c.pt", "--spm", "s", "--dict", "d", "--backend", "ort"],
            "--backend ort runs an artifact directory",
        ),
        (["--input", "/nonexistent/in.txt"], "input file /nonexistent/in.txt does not exist"),
        (["--output", "/nonexistent/dir/out.txt"], "directory of --output"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(artifact, fake_load, argv, message):
    # argv without --checkpoint gets the artifact directory in front
    full = argv if "--checkpoint" in argv else [str(artifact), *argv]
    with pytest.raises(InputError) as err:
        run_translate(parse(full))
    assert re.search(message, _as_command_line(err.value)), _as_command_line(err.value)
    assert fake_load.calls == []


def test_artifact_directory_and_checkpoint_are_exclusive(artifact, fake_load):
    with pytest.raises(InputError, match="not both"):
        run_translate(parse([str(artifact), "--checkpoint", "c.pt", "--spm", "s", "--dict", "d"]))
    with pytest.raises(InputError, match="nothing to translate with.*put it first"):
        run_translate(parse(["--src-prefix", "__de__", str(artifact)]))
    assert fake_load.calls == []


def test_max_tokens_alone_lifts_the_sentence_limit():
    from deltalm.commands.translate import _batching

    assert _batching(parse(["d", "--max-tokens", "4096"])) == {"batch_size": None, "max_tokens": 4096}
    assert _batching(parse(["d"])) == {"batch_size": 32, "max_tokens": None}


def test_a_dictionary_larger_than_the_model_vocabulary_is_refused(tok):
    with pytest.raises(InputError, match="does not belong to this model"):
        Translator.from_backend(CopyBackend(len(tok) - 1), tok)


def test_importing_translate_does_not_import_torch():
    code = "import sys, deltalm, deltalm.commands.translate; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_a_translation_gives_its_record_as_a_dict_and_as_the_json_line_translate_writes():
    import json

    from deltalm.translator import Hypothesis, Translation, format_translation

    t = Translation(3, [Hypothesis(tokens=[17, 2], score=-0.5, positional_scores=[-0.25, float("-inf")], text="Hallo")])
    record = {
        "id": 3,
        "nbest": [{"tokens": [17, 2], "score": -0.5, "positional_scores": [-0.25, None], "text": "Hallo"}],
    }
    assert t.to_dict() == record
    assert isinstance(t.to_json(), str) and json.loads(t.to_json()) == record
    assert t.to_json() == format_translation(t, "jsonl")
