"""Property tests (hypothesis) of what users feed in: any Unicode (control characters, lone
surrogates, very long and empty strings) to the tokenizer, any bytes to dict.txt, and any lines,
text or bytes, to ``deltalm translate`` on the tiny artifact. Allowed outcomes: a result, or a
clean one-line DeltaLMError; never a traceback. Every input line gets exactly one output line."""

from __future__ import annotations

import json
import re

import pytest
from cli_support import FAST, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltalm.errors import InputError, TokenizerError
from deltalm.export.toy_data import toy_corpus
from deltalm.tokenizer import Dictionary

EOS = 2
MAX_POSITIONS = 512  # the tiny model's


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


CORPUS_CHARS = sorted(set("".join(toy_corpus())))
ODD_CHARS = [
    "\r",
    "\t",
    "\x00",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x7f",
    "\x85",
    "\u00a0",
    "\u2028",
    "\u2029",
    "\u3000",
    "\u200b",
    "\ufeff",
    "\u2581",
    "\ufffd",
    "ﬁ",
    "\U0001f600",
    "<unk>",
    "</s>",
]

any_char = st.characters(blacklist_categories=(), blacklist_characters="\n")  # lone surrogates too
line_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")  # what UTF-8 can carry

lines = st.one_of(
    st.text(line_char, max_size=40),  # any Unicode, control characters included
    st.lists(st.sampled_from(CORPUS_CHARS + ODD_CHARS), max_size=120).map("".join),
    st.lists(st.sampled_from(toy_corpus()), min_size=1, max_size=4).map(" ".join),
    st.sampled_from(["", " ", "\t", "\r", "\ufeff", "\u3000 \u3000"]),
    st.builds(lambda s, n: (s * n)[:6000], st.text(line_char, min_size=1, max_size=6), st.integers(100, 1500)),
)


def as_read(line: str, index: int) -> str:
    """The text the command translates for input line ``index`` (0-based): one trailing "\\r"
    belongs to a CRLF line end, a byte order mark opens the file."""
    line = line.removesuffix("\r")
    return line.removeprefix("\ufeff") if index == 0 else line


# --- tokenizer and dictionary ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(any_char), lines))
def test_tokenizer_takes_any_string(tok, text):
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # not text UTF-8 can carry
        with pytest.raises(InputError, match="cannot be encoded as UTF-8 at position"):
            tok.encode(text)
        return
    ids = tok.encode(text)
    assert ids[-1] == EOS and EOS not in ids[:-1]
    assert all(3 <= i < len(tok) for i in ids[:-1])
    decoded = tok.decode(ids)
    assert isinstance(decoded, str) and "\n" not in decoded
    assert decoded == decoded.strip()
    # round trip: what sentencepiece kept (no <unk>) encodes back to the same ids
    if 3 not in ids and not any(ch.isspace() for ch in tok.sp.normalize(text)):
        assert tok.encode(decoded) == ids


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.tuples(
                st.text(line_char, max_size=12), st.sampled_from([" 1", " 7", " x", "", "  3", " 1 #fairseq:overwrite"])
            ),
            max_size=12,
        ).map(lambda rows: "\n".join(w + c for w, c in rows).encode("utf-8")),
    )
)
def test_dictionary_takes_any_bytes(scratch, data):
    path = scratch / "dict.txt"
    path.write_bytes(data)
    try:
        d = Dictionary.load(path)
    except TokenizerError as e:
        message = str(e)
        assert message.startswith(f"{path}:") and "\n" not in message
        return
    assert len(d) >= 4 and d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]


# --- the command ----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(inputs=st.lists(lines, max_size=6), truncate=st.booleans())
def test_translate_answers_every_line_or_names_the_bad_one(tiny, tok, inputs, truncate):
    stdin = "".join(line + "\n" for line in inputs).encode("utf-8")
    argv = ["translate", tiny.artifact, *FAST, "--format", "jsonl", *(["--truncate"] if truncate else [])]
    res = run_cli(argv, stdin)
    lengths = [len(tok.encode(as_read(line, i))) for i, line in enumerate(inputs)]
    too_long = [i + 1 for i, n in enumerate(lengths) if n > MAX_POSITIONS]
    if too_long and not truncate:
        assert res.rc == 2 and res.out == b""
        assert res.err == (
            f"deltalm: error: input line {too_long[0]} has {lengths[too_long[0] - 1]} source tokens "
            f"(with </s> and the source prefix); the model takes at most {MAX_POSITIONS}. "
            "Pass --truncate to cut it\n"
        )
        return
    assert res.rc == 0, res.err
    warning = r"^deltalm: warning: input line (\d+): \d+ source tokens, truncated"
    warned = [int(n) for n in re.findall(warning, res.err, re.M)]
    assert warned == too_long and len(res.err.splitlines()) == len(too_long)
    records = [json.loads(line) for line in res.out.decode("utf-8").split("\n")[:-1]]
    assert [r["id"] for r in records] == list(range(len(inputs)))
    for record, n in zip(records, lengths):
        if n == 1:  # nothing sentencepiece keeps: an empty answer, the model not asked
            assert record["nbest"] == []
            continue
        (best,) = record["nbest"]
        assert 1 <= len(best["tokens"]) <= 5  # --max-len-b 4, then </s>
        assert best["text"] == tok.decode(best["tokens"]) and "\n" not in best["text"]


@settings(max_examples=15, deadline=None)
@given(
    inputs=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=6),
    errors=st.sampled_from(["strict", "replace"]),
)
def test_translate_takes_any_bytes(tiny, inputs, errors):
    res = run_cli(["translate", tiny.artifact, *FAST, "--errors", errors], b"".join(b + b"\n" for b in inputs))
    invalid = []
    for i, raw in enumerate(inputs):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid.append(i + 1)
    if invalid and errors == "strict":
        assert res.rc == 2 and res.out == b""
        assert re.fullmatch(
            rf"deltalm: error: input line {invalid[0]} is not valid UTF-8 \(byte 0x[0-9a-f]{{2}} at "
            r"byte \d+\); pass --errors replace to translate it with U\+FFFD for bad bytes\n",
            res.err,
        )
        return
    assert res.rc == 0, res.err
    assert res.out.count(b"\n") == len(inputs)
