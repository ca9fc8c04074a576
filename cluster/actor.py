"""The Ray Data actor: one ``deltalm.Translator`` per actor, opened once, mapping batches of lines.

A plain class (Ray Data makes the actor of it), so it imports no Ray and can be tried without it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import time

import numpy as np

from ..errors import DeltaLMError, InputError
from ..translator import Translator, format_translation
from .shards import BOM


class TranslateActor:
    """``__call__`` takes a batch of rows (numpy columns ``shard``, ``line``, ``n_lines``,
    ``text``: one input line as bytes, without its newline) and returns, for each row, its
    ``shard``, ``line`` and ``n_lines``, ``out`` (the output line of ``deltalm translate`` for
    that input line, ``id`` = line number in its file), ``tokens`` (target tokens of the best
    hypothesis), ``actor`` (host:pid), ``call`` (the actor's call counter) and ``seconds`` (the
    call's wall time, shared out over its rows)."""

    def __init__(self, model: str, backend: str | None, device: str | None, threads: int | None,
                 src_prefix: list[str] | None, tgt_prefix: list[str] | None, fmt: str, options: dict,
                 batching: dict, errors: str, shard_names: list[str]) -> None:
        self.translator = Translator(model, backend=backend, device=device, threads=threads,
                                     src_prefix=src_prefix, tgt_prefix=tgt_prefix)
        self.fmt, self.options, self.batching, self.errors = fmt, options, batching, errors
        self.shard_names = shard_names
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        lines = [bytes(x) for x in batch["text"]]
        # Translator strips a byte order mark from the first sentence of a call (the start of a
        # file for ``deltalm translate``); here a batch starts anywhere in a file, where a mark is
        # text: an empty first sentence (no decoding) keeps it. The file's own mark is removed
        # when it is read (shards.split_lines).
        pad = [b""] if lines and lines[0].startswith(BOM) else []
        try:
            results = list(self.translator.translate_chunks(
                [pad + lines], errors=self.errors, **self.batching, **self.options))[len(pad):]
        except DeltaLMError as e:
            raise InputError(self._in_file_terms(str(e), batch, len(pad))) from None
        ids = batch["line"]
        out = np.array([format_translation(dataclasses.replace(t, index=int(i)), self.fmt)
                        for t, i in zip(results, ids)], dtype=object)
        tokens = np.array([len(t.hypotheses[0].tokens) if t.hypotheses else 0 for t in results], dtype=np.int64)
        self.calls += 1
        n = len(lines)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return {
            "shard": batch["shard"], "line": ids, "n_lines": batch["n_lines"], "out": out, "tokens": tokens,
            "actor": np.array([self.name] * n, dtype=object), "call": np.full(n, self.calls, dtype=np.int64),
            "seconds": np.full(n, seconds, dtype=np.float64),
        }

    def _in_file_terms(self, message: str, batch: dict, pad: int) -> str:
        """The translator numbers lines within the call; the user knows files and their lines."""
        def where(m: re.Match) -> str:
            k = int(m[1]) - 1 - pad
            if not 0 <= k < len(batch["line"]):
                return m[0]
            return f"{self.shard_names[int(batch['shard'][k])]} line {int(batch['line'][k]) + 1}"

        return re.sub(r"input line (\d+)", where, message)
