"""A vocabulary shortlist: the target tokens worth scoring for a batch, so that the decoder step
projects onto a few thousand rows of the 250001-row table instead of all of them (opt-in,
approximate; the idea of CTranslate2's vocabulary map, built for fairseq dictionaries).

For a batch, the candidates are: the ``frequent`` list (the most frequent target tokens of the
corpus it was built from), the batch's own source tokens (names and numbers are copied), for each
source token its ``per_source`` most associated target tokens, and what the search cannot do
without (eos, unk, the forced target prefix). The step graph ``decoder_step_shortlist`` then
computes logits and the log-softmax over those candidates only, so scores are normalized over
the shortlist: a translation can differ from the full-vocabulary one, which is why it is opt-in
and why ``deltalm bench --shortlist`` reports how often it does.

Built from a corpus of (source ids, target ids) pairs: a parallel corpus, or a monolingual source
corpus translated by the model itself (then the shortlist holds what this model actually
produces for such text). Association: the Dice coefficient of the sentence counts,
2 * c(s, t) / (c(s) + c(t)).

File: ``.npz`` (numpy, no pickle): the frequent ids, the per-source lists as CSR arrays
(``offsets`` [V + 1], ``targets``) and a JSON header (format, vocabulary size, sha256 of the
dictionary it was built with, how it was built). Numpy only: no torch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import sha256_file
from .atomic import atomic_output
from .errors import InputError

FORMAT = "deltalm-shortlist/1"
FREQUENT = 500
PER_SOURCE = 30


@dataclass(frozen=True, eq=False)
class Shortlist:
    vocab_size: int
    frequent: np.ndarray  # [F] int64, most frequent first
    offsets: np.ndarray  # [V + 1] int64: targets[offsets[s]:offsets[s + 1]] belong to source id s
    targets: np.ndarray  # [M] int64, best first within each source id
    dictionary_sha256: str = ""
    info: dict = field(default_factory=dict)

    def candidates(self, src_tokens: np.ndarray, required: Sequence[int] = (), minimum: int = 0) -> np.ndarray:
        """Ascending distinct token ids for a batch of sources [batch, src_len] (padding
        included, harmlessly), plus ``required``; at least ``minimum`` of them (the lowest ids not
        yet in are added)."""
        src = np.unique(np.asarray(src_tokens, dtype=np.int64))
        src = src[(src >= 0) & (src < self.vocab_size)]
        lo, hi = self.offsets[src], self.offsets[src + 1]
        per_source = [self.targets[a:b] for a, b in zip(lo.tolist(), hi.tolist()) if b > a]
        ids = np.unique(np.concatenate([self.frequent, src, np.asarray(required, dtype=np.int64), *per_source]))
        if ids.size < minimum:
            filler = np.setdiff1d(np.arange(min(self.vocab_size, ids.size + minimum), dtype=np.int64), ids)
            ids = np.union1d(ids, filler[: minimum - ids.size])
        return ids

    def check_dictionary(self, dict_path: str | Path | None, vocab_size: int) -> None:
        """InputError unless this shortlist was built for that vocabulary (and dictionary file)."""
        if vocab_size != self.vocab_size:
            raise InputError(
                f"the shortlist was built for a vocabulary of {self.vocab_size}, the model has {vocab_size}"
            )
        if dict_path is not None and self.dictionary_sha256 and sha256_file(dict_path) != self.dictionary_sha256:
            raise InputError(f"the shortlist was built with another dictionary than {dict_path}")

    def save(self, path: str | Path) -> None:
        header = {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "dictionary_sha256": self.dictionary_sha256,
            "info": self.info,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            frequent=self.frequent,
            offsets=self.offsets,
            targets=self.targets,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        )
        with atomic_output(path) as f:
            f.write(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Shortlist:
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    raise InputError(f"{path}: not a shortlist file (write one with `deltalm shortlist`)")
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                arrays = {k: z[k].astype(np.int64) for k in ("frequent", "offsets", "targets")}
        except FileNotFoundError:
            raise InputError(f"{path}: no such shortlist file") from None
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a shortlist file ({type(e).__name__}: {e})") from None
        if header.get("format") != FORMAT:
            raise InputError(f"{path}: shortlist format {header.get('format')!r}, this version reads {FORMAT}")
        v = int(header["vocab_size"])
        off, tgt = arrays["offsets"], arrays["targets"]
        if (
            off.shape != (v + 1,)
            or off[0] != 0
            or off[-1] != tgt.size
            or np.any(np.diff(off) < 0)
            or np.any((tgt < 0) | (tgt >= v))
            or np.any((arrays["frequent"] < 0) | (arrays["frequent"] >= v))
        ):
            raise InputError(f"{path}: corrupt shortlist (its arrays do not fit a vocabulary of {v})")
        return cls(v, arrays["frequent"], off, tgt, header.get("dictionary_sha256", ""), header.get("info", {}))


def build_shortlist(
    pairs: Iterable[tuple[Sequence[int], Sequence[int]]],
    vocab_size: int,
    *,
    frequent: int = FREQUENT,
    per_source: int = PER_SOURCE,
    min_count: int = 1,
    ignore: Sequence[int] = (),
    dictionary_sha256: str = "",
    info: dict | None = None,
    chunk: int = 4_000_000,
) -> Shortlist:
    """A shortlist from (source ids, target ids) pairs (fairseq dictionary ids). ``ignore``:
    ids never counted (the special symbols, a language tag). ``min_count``: sentences in which a
    pair must co-occur to be kept."""
    if frequent < 0 or per_source < 0 or min_count < 1:
        raise InputError("frequent and per_source must be >= 0, min_count >= 1")
    V = vocab_size
    skip = np.zeros(V, dtype=bool)
    skip[[i for i in ignore if 0 <= i < V]] = True
    tgt_freq = np.zeros(V, dtype=np.int64)  # occurrences
    src_sents = np.zeros(V, dtype=np.int64)  # sentences containing the id
    tgt_sents = np.zeros(V, dtype=np.int64)
    pending: list[np.ndarray] = []
    pending_size = 0
    merged_keys = np.zeros(0, dtype=np.int64)
    merged_counts = np.zeros(0, dtype=np.int64)
    sentences = 0

    def merge():
        nonlocal merged_keys, merged_counts, pending, pending_size
        keys = np.concatenate([merged_keys, *pending])
        counts = np.concatenate([merged_counts, np.ones(pending_size, dtype=np.int64)])
        merged_keys, inverse = np.unique(keys, return_inverse=True)
        merged_counts = np.bincount(inverse, weights=counts, minlength=merged_keys.size).astype(np.int64)
        pending, pending_size = [], 0

    for src, tgt in pairs:
        s = np.asarray(src, dtype=np.int64)
        t = np.asarray(tgt, dtype=np.int64)
        s = s[(s >= 0) & (s < V)]
        t = t[(t >= 0) & (t < V)]
        s, t = s[~skip[s]], t[~skip[t]]
        sentences += 1
        np.add.at(tgt_freq, t, 1)
        s, t = np.unique(s), np.unique(t)
        src_sents[s] += 1
        tgt_sents[t] += 1
        if s.size and t.size:
            pending.append((s[:, None] * V + t[None, :]).ravel())
            pending_size += pending[-1].size
            if pending_size >= chunk:
                merge()
    merge()
    order = np.lexsort((np.arange(V), -tgt_freq))
    top = order[:frequent][tgt_freq[order[:frequent]] > 0]
    s_of, t_of = merged_keys // V, merged_keys % V
    keep = merged_counts >= min_count
    s_of, t_of, c = s_of[keep], t_of[keep], merged_counts[keep]
    dice = 2.0 * c / (src_sents[s_of] + tgt_sents[t_of])
    # per source id, best Dice first (ties: more co-occurrences, then the lower id)
    order = np.lexsort((t_of, -c, -dice, s_of))
    s_of, t_of = s_of[order], t_of[order]
    first = np.searchsorted(s_of, s_of, side="left")
    rank = np.arange(s_of.size) - first
    kept = rank < per_source
    s_of, t_of = s_of[kept], t_of[kept]
    offsets = np.zeros(V + 1, dtype=np.int64)
    np.add.at(offsets, s_of + 1, 1)
    offsets = np.cumsum(offsets)
    meta = {"sentences": sentences, "frequent": frequent, "per_source": per_source, "min_count": min_count} | (
        info or {}
    )
    return Shortlist(V, top.astype(np.int64), offsets, t_of.astype(np.int64), dictionary_sha256, meta)


def shortlist_from_corpus(
    translator, sources: Iterable[str], targets: Iterable[str] | None = None, options: dict | None = None, **build
) -> Shortlist:
    """``build_shortlist`` over text: ``sources`` (lines) with their ``targets`` (a parallel
    corpus, lines in the same order), or, without targets, with the translations ``translator``
    (a full-vocabulary ``deltalm.Translator``) makes of them under ``options`` (keyword options of
    ``translate_iterable``: give the beam and prefixes you will translate with). Ids are those of
    the translator's dictionary; special symbols and the source / target prefixes are ignored."""
    tok = translator.tokenizer
    ignore = {tok.bos, tok.pad, tok.eos, tok.unk, *tok.src_prefix, *translator.tgt_prefix}
    src_lines = list(sources)
    if targets is None:
        if getattr(translator, "shortlist", None) is not None:
            raise InputError("the translator that translates the corpus must not use a shortlist itself")
        tgt_ids = [
            t.hypotheses[0].tokens if t.hypotheses else []
            for t in translator.translate_iterable(src_lines, **(options or {}))
        ]
        how = "translations of a monolingual source corpus by the model"
    else:
        tgt_lines = list(targets)
        if len(tgt_lines) != len(src_lines):
            raise InputError(f"the parallel corpus has {len(src_lines)} source and {len(tgt_lines)} target lines")
        tgt_ids = [tok.encode(line, []) for line in tgt_lines]
        how = "a parallel corpus"
    pairs = ((tok.encode(s), t) for s, t in zip(src_lines, tgt_ids))
    dict_path = getattr(tok, "dict_path", None)
    digest = sha256_file(dict_path) if dict_path else ""
    return build_shortlist(
        pairs, len(tok), ignore=sorted(ignore), dictionary_sha256=digest, info={"built_from": how}, **build
    )
