"""Text <-> token ids exactly as fairseq does it for DeltaLM: sentencepiece pieces, looked up in a
fairseq ``dict.txt`` (never "spm id + 1"), ``</s>`` appended, sources left-padded.

fairseq's path, reproduced here step by step:
  encode: ``SentencepieceBPE.encode`` gives ``" ".join(sp.encode(line, out_type=str))``, then
          ``Dictionary.encode_line`` splits that on whitespace (``\\s+``) and looks each word up.
  decode: ``Dictionary.string`` joins the symbols with " " (bos / eos dropped), then
          ``post_process(..., "sentencepiece")``: remove " ", turn "\u2581" into " ", ``strip()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece

from deltalm.errors import InputError, TokenizerError

SPM_SPACE = "\u2581"  # sentencepiece's visible space, "▁"
_OVERWRITE_FLAG = "#fairseq:overwrite"


def read_text_lines(path: str | Path, flag: str | None = None) -> list[str]:
    """The lines of a user's UTF-8 text file (a byte-order mark dropped, line ends removed, no
    other normalization); InputError in one line naming ``flag`` (the option that gave the path,
    if any) and the path when the file cannot be read or is not UTF-8."""
    named = f"{flag} {path}" if flag else str(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise InputError(f"cannot read {named}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{named} is not UTF-8 text ({e})") from None


class Dictionary:
    """A fairseq Dictionary: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, then dict.txt."""

    bos, pad, eos, unk = 0, 1, 2, 3

    def __init__(self) -> None:
        self.symbols: list[str] = ["<s>", "<pad>", "</s>", "<unk>"]
        self.counts: list[int] = [1, 1, 1, 1]
        self._indices: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        """Read a fairseq dict.txt: one ``TOKEN COUNT`` line per symbol, split on the last space,
        optionally followed by `` #fairseq:overwrite`` (the only way to repeat a token; the repeat
        gets a new id and the token then maps to it, as in fairseq)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read dictionary {path}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line_no = data[: e.start].count(b"\n") + 1
            raise TokenizerError(f"{path}:{line_no}: dictionary is not valid UTF-8") from None
        # fairseq reads the file in text mode: universal newlines, nothing else splits lines.
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline ending the last line

        d = cls()
        for line_no, raw in enumerate(lines, start=1):
            line = raw.rstrip()
            word, sep, field = line.rpartition(" ")
            overwrite = field == _OVERWRITE_FLAG
            if overwrite:
                word, sep, field = word.rpartition(" ")
            if not sep:
                raise TokenizerError(f"{path}:{line_no}: expected '<token> <count> [{_OVERWRITE_FLAG}]', got {raw!r}")
            try:
                count = int(field)
            except ValueError:
                raise TokenizerError(f"{path}:{line_no}: count {field!r} of token {word!r} is not an integer") from None
            if word in d._indices and not overwrite:
                raise TokenizerError(
                    f"{path}:{line_no}: duplicate token {word!r} (first at id {d._indices[word]}); "
                    f"append ' {_OVERWRITE_FLAG}' to the line to allow it"
                )
            d._indices[word] = len(d.symbols)
            d.symbols.append(word)
            d.counts.append(count)
        return d

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._indices

    def __getitem__(self, idx: int) -> str:
        return self.symbols[idx]

    def index(self, symbol: str) -> int:
        """The id of ``symbol``, or ``unk`` when it is not in the dictionary."""
        return self._indices.get(symbol, self.unk)

    def string(self, ids: Iterable[int]) -> str:
        """The symbols of ``ids`` joined by " ", without ``<s>``, ``</s>`` and ``<pad>`` (fairseq's
        ``Dictionary.string`` drops bos and eos; pad never reaches it from the search)."""
        size = len(self.symbols)
        out = []
        for i in ids:
            i = int(i)
            if i in (self.bos, self.eos, self.pad):
                continue
            if not 0 <= i < size:
                raise InputError(f"token id {i} is outside the dictionary (size {size})")
            out.append(self.symbols[i])
        return " ".join(out)


def collate(sequences: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    """Stack id lists into an int64 array [batch, max_len], LEFT-padded with ``pad`` (fairseq's
    ``left_pad_source=True``)."""
    width = max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), width), pad, dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, width - len(seq) :] = seq
    return out


def _load_spm(path: Path) -> sentencepiece.SentencePieceProcessor:
    try:
        proto = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read sentencepiece model {path}: {e.strerror or e}") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception:  # the binding raises a bare RuntimeError on a bad proto
        raise TokenizerError(f"{path} is not a sentencepiece model (cannot parse it)") from None
    if sp.get_piece_size() == 0:
        raise TokenizerError(f"{path} is not a sentencepiece model (it has no pieces)")
    return sp


class Tokenizer:
    """sentencepiece + fairseq Dictionary; ``src_prefix`` symbols (e.g. ``["__de__"]``) are put in
    front of every encoded source."""

    def __init__(self, spm_path: str | Path, dict_path: str | Path, src_prefix: list[str] | None = None) -> None:
        self.spm_path, self.dict_path = Path(spm_path), Path(dict_path)
        self.sp = _load_spm(self.spm_path)
        self.dictionary = Dictionary.load(self.dict_path)
        self.src_prefix: list[int] = self._lookup_all(src_prefix or [], "source prefix")

    @classmethod
    def from_files(cls, spm_path: str | Path, dict_path: str | Path, src_prefix: list[str] | None = None) -> Tokenizer:
        return cls(spm_path, dict_path, src_prefix)

    @property
    def bos(self) -> int:
        return self.dictionary.bos

    @property
    def pad(self) -> int:
        return self.dictionary.pad

    @property
    def eos(self) -> int:
        return self.dictionary.eos

    @property
    def unk(self) -> int:
        return self.dictionary.unk

    def __len__(self) -> int:
        return len(self.dictionary)

    def _lookup_all(self, symbols: Sequence[str], what: str) -> list[int]:
        ids = []
        for sym in symbols:
            if sym not in self.dictionary:
                raise TokenizerError(f"{what} token {sym!r} is not in {self.dict_path}")
            ids.append(self.dictionary.index(sym))
        return ids

    def pieces(self, line: str) -> list[str]:
        """The tokens fairseq looks up for ``line``: the sentencepiece pieces joined by " " and
        split on whitespace again, so a piece holding whitespace that sentencepiece keeps (U+0085)
        is split or dropped, as in fairseq."""
        if not isinstance(line, str):
            raise InputError(f"text to translate must be a str, got {type(line).__name__}")
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"text has a character that cannot be encoded as UTF-8 at position {e.start}: {line[e.start]!r}"
            ) from None
        return " ".join(self.sp.encode(line, out_type=str)).split()

    def encode(self, line: str, src_prefix: Sequence[int] | None = None) -> list[int]:
        """Source ids: the source prefix (``src_prefix`` ids, by default the tokenizer's), then one
        dict id per piece (``unk`` if not in dict.txt), then ``</s>``; no ``<s>``."""
        index = self.dictionary.index
        prefix = self.src_prefix if src_prefix is None else src_prefix
        return [*prefix, *(index(p) for p in self.pieces(line)), self.eos]

    def encode_source_prefix(self, symbols: Sequence[str]) -> list[int]:
        """Ids of forced source tokens (e.g. a language tag); each must be in dict.txt."""
        return self._lookup_all(symbols, "source prefix")

    def encode_target_prefix(self, symbols: Sequence[str]) -> list[int]:
        """Ids of forced target tokens (e.g. a language tag); each must be in dict.txt."""
        return self._lookup_all(symbols, "target prefix")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: bos / eos / pad dropped, ``<unk>`` kept as the literal "<unk>", then
        fairseq's sentencepiece post-processing."""
        return self.dictionary.string(ids).replace(" ", "").replace(SPM_SPACE, " ").strip()

    def collate(self, sequences: Sequence[Sequence[int]], pad: int | None = None) -> np.ndarray:
        """int64 [batch, max_len], left-padded with ``pad`` (the dictionary's pad by default)."""
        return collate(sequences, self.pad if pad is None else pad)
