"""The Ray Data actor: one ``deltalm.Translator`` per actor, opened once, mapping batches of lines.

A plain class (Ray Data makes the actor of it), so it imports no Ray and can be tried without it.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from ..artifact import sha256_file
from ..errors import InputError
from ..translator import Translator, format_translation


class TranslateActor:
    """``__call__`` takes a batch of chunks (numpy columns ``shard``, ``start``: line number of the
    chunk's first line in its file, ``n_lines``: lines of the file, ``lines``: the chunk's lines
    as bytes, without newlines) and returns one row per line: ``shard``, ``line``, ``n_lines``,
    ``out`` (the output line of ``deltalm translate`` for that input line, ``id`` = line number
    in its file), ``tokens`` (target tokens of the best hypothesis), ``actor`` (host:pid),
    ``call`` (the actor's call counter) and ``seconds`` (the call's wall time, shared out over
    its lines).

    A chunk is sorted by length and cut into backend batches exactly as ``deltalm translate``
    cuts the same ``--chunk-lines`` lines of the file, so the scores agree to the bit, not only
    the texts. ``job`` (``deltalm.cluster.CorpusJob``): the model, options and batching; its
    vocabulary shortlist file, if any, is read at that path on the actor's node and checked to
    have ``job.shortlist_sha256`` (the SHA-256 the driver fingerprinted the run with)."""

    def __init__(self, job, threads: int | None, device: str | None, shard_names: dict[int, str]) -> None:
        if job.shortlist is not None:
            _check_shortlist_file(job.shortlist, job.shortlist_sha256)
        self.translator = Translator(
            job.model,
            backend=job.backend,
            device=device,
            threads=threads,
            src_prefix=job.src_prefix,
            tgt_prefix=job.tgt_prefix,
            shortlist=job.shortlist,
        )
        self.job = job
        self.shard_names = shard_names
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        began = time.perf_counter()
        cols: dict[str, list] = {"shard": [], "line": [], "n_lines": [], "out": [], "tokens": []}
        for shard, start, n_lines, chunk in zip(batch["shard"], batch["start"], batch["n_lines"], batch["lines"]):
            shard, start = int(shard), int(start)
            lines = [bytes(x) for x in chunk]
            for k, t in enumerate(self._translate(lines, shard, start)):
                cols["shard"].append(shard)
                cols["line"].append(start + k)
                cols["n_lines"].append(int(n_lines))
                cols["out"].append(format_translation(t, self.job.fmt))
                cols["tokens"].append(len(t.hypotheses[0].tokens) if t.hypotheses else 0)
        self.calls += 1
        n = len(cols["line"])
        return {
            "shard": np.array(cols["shard"], dtype=np.int32),
            "line": np.array(cols["line"], dtype=np.int64),
            "n_lines": np.array(cols["n_lines"], dtype=np.int64),
            "out": np.array(cols["out"], dtype=object),
            "tokens": np.array(cols["tokens"], dtype=np.int64),
            "actor": np.array([self.name] * n, dtype=object),
            "call": np.full(n, self.calls, dtype=np.int64),
            "seconds": np.full(n, (time.perf_counter() - began) / max(n, 1), dtype=np.float64),
        }

    def _translate(self, lines: list[bytes], shard: int, start: int) -> list:
        # The translator is told where the chunk lies (the file's name, its first line), so its
        # messages name the file and line, and a byte order mark is stripped only at the start of
        # the file (``start`` 0; the file's own mark is removed when it is read: shards.split_lines).
        job = self.job
        return list(
            self.translator.translate_chunks(
                [lines],
                options=job.options,
                batch_size=job.batch_size,
                max_tokens=job.max_tokens,
                errors=job.errors,
                source=self.shard_names.get(shard, "?"),
                start=start,
            )
        )


def _check_shortlist_file(path: str, sha256: str) -> None:
    """The shortlist this actor reads is the file the driver fingerprinted (the manifest records
    outputs under that fingerprint: another file on some node would mix outputs)."""
    host = socket.gethostname()
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise InputError(
            f"cannot read the shortlist {path} on {host}: {e.strerror or e} (every node must read it at this path)"
        ) from None
    if digest != sha256:
        raise InputError(
            f"the shortlist {path} on {host} is not the file the run started with (SHA-256 "
            f"differs): every node must read the same file at this path"
        )
