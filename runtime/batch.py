"""The state of a running batch that the decoder step reads: per sentence its encoder K/V, per row
(hypothesis) its self-attention cache. Host arrays, owned here and fed to the step graph in place.

Layout: sentences occupy slots ``0 .. sents-1``, rows ``0 .. sents * group - 1`` (the ``group``
hypotheses of sentence ``s`` are rows ``s * group ..``). Every array keeps that order, and the
slices the step reads (``[:sents]``, ``[:rows]``) are contiguous, so binding them costs nothing.

Memory is reused as sentences come and go: capacities grow by doubling (rows) and by chunks
(positions, source length) and are kept; a leaving sentence's slot is refilled by moving the last
sentence into it (one sentence copied, not the batch); a beam reorder copies only the rows whose
parent changed; the step's new keys / values are written into the cache where they belong. The
capacity in positions and source tokens shrinks again when the long sentences have left, so that
the step does not attend over padding for ever.
"""

from __future__ import annotations

import numpy as np

from .backends.interface import step_feeds
from .config import ModelConfig
from .graphs import GraphSpec, cache_names, cross_names, per_layer

POSITION_CHUNK = 16  # cache positions are allocated this many at a time
SOURCE_CHUNK = 16  # source positions likewise


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


class DecoderBatch:
    """Encoder K/V and self-attention caches of a batch whose sentences each have ``group`` rows."""

    def __init__(self, cfg: ModelConfig, float_dtype, group: int) -> None:
        self.cfg = cfg
        self.dtype = np.dtype(float_dtype)
        self.group = group
        self.sents = 0
        layers = 2 * cfg.decoder_layers
        self.cross = [self._empty(0, 0) for _ in range(layers)]  # [sent_cap, H, src_cap, hd]
        self.padding = np.ones((0, 0), dtype=bool)  # [sent_cap, src_cap], True: no source token
        self.cache = [self._empty(0, 0) for _ in range(layers)]  # [row_cap, H, cache_cap, hd]

    def _empty(self, n: int, length: int) -> np.ndarray:
        # np.zeros: pages never written are never touched (calloc), and the cache must be finite
        return np.zeros((n, self.cfg.heads, length, self.cfg.head_dim), dtype=self.dtype)

    # -- sizes
    @property
    def rows(self) -> int:
        return self.sents * self.group

    @property
    def src_cap(self) -> int:
        return self.padding.shape[1]

    @property
    def cache_cap(self) -> int:
        return self.cache[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity, not just the live part)."""
        return sum(a.nbytes for a in self.cross + self.cache) + self.padding.nbytes

    # -- the views a step reads
    def cross_views(self) -> list[np.ndarray]:
        return [a[: self.sents] for a in self.cross]

    def padding_view(self) -> np.ndarray:
        return self.padding[: self.sents]

    def cache_views(self) -> list[np.ndarray]:
        return [a[: self.rows] for a in self.cache]

    def feeds(
        self,
        spec: GraphSpec,
        tokens: np.ndarray,
        positions: np.ndarray,
        rules,
        *,
        score_ids: np.ndarray | None = None,
        want_log_probs: bool = False,
        candidates: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The step graph's feeds (``spec``) for the live rows: ``tokens`` [rows, T], ``positions``
        [rows], ``rules`` (``deltalm.search.StepRules``), ``score_ids`` [rows, T, M] (default: one
        dummy id), ``candidates`` for a shortlist graph (default: the whole vocabulary)."""
        rows = self.rows
        if score_ids is None:
            score_ids = np.full((rows, tokens.shape[1], 1), self.cfg.eos, dtype=np.int64)
        arrays = dict(
            tokens=tokens,
            positions=positions,
            src_padding=self.padding_view(),
            forced_tokens=rules.forced_tokens,
            ban_eos=rules.ban_eos,
            only_eos=rules.only_eos,
            unk_penalty=rules.unk_penalty,
            score_ids=score_ids,
            want_log_probs=np.array(want_log_probs),
        )
        arrays |= dict(zip(per_layer(self.cfg, cache_names), self.cache_views()))
        arrays |= dict(zip(per_layer(self.cfg, cross_names), self.cross_views()))
        if "candidates" in spec.input_names:
            arrays["candidates"] = candidates if candidates is not None else np.arange(self.cfg.vocab_size)
        return step_feeds(spec, **arrays)

    # -- sentences come
    def admit(self, cross: list[np.ndarray], padding: np.ndarray, which: np.ndarray) -> range:
        """Add sentences ``which`` of an encoded batch (``cross`` per layer [batch, H, S, hd],
        ``padding`` [batch, S]) after the live ones; returns their slots. Their rows' caches are
        empty (their step 0 reads none of it)."""
        n, width = len(which), padding.shape[1]
        start = self.sents
        self._reserve(start + n, max(self.src_cap, _round_up(width, SOURCE_CHUNK)))
        for dst, src in zip(self.cross, cross):
            dst[start : start + n, :, :width] = src[which]
            dst[start : start + n, :, width:] = 0
        self.padding[start : start + n] = True
        self.padding[start : start + n, :width] = padding[which]
        self.sents += n
        return range(start, start + n)

    def _reserve(self, sents: int, src_cap: int) -> None:
        sent_cap = self.padding.shape[0]
        if sents <= sent_cap and src_cap == self.src_cap:
            return
        new_cap = max(sents, 2 * sent_cap) if sents > sent_cap else sent_cap
        live, width = self.sents, min(self.src_cap, src_cap)
        cross = [self._empty(new_cap, src_cap) for _ in self.cross]
        for dst, src in zip(cross, self.cross):
            dst[:live, :, :width] = src[:live, :, :width]
        padding = np.ones((new_cap, src_cap), dtype=bool)
        padding[:live, :width] = self.padding[:live, :width]
        self.cross, self.padding = cross, padding
        if new_cap != sent_cap:
            rows_cap = new_cap * self.group
            cache = [self._empty(rows_cap, self.cache_cap) for _ in self.cache]
            for dst, src in zip(cache, self.cache):
                dst[: self.rows] = src[: self.rows]
            self.cache = cache

    # -- sentences go
    def retire(self, keep: np.ndarray) -> np.ndarray:
        """Keep the sentences whose slots ``keep`` (bool [sents]) marks; the others leave. Returns
        the new order: ``order[i]`` is the old slot of the sentence now in slot ``i``. A hole left
        below the new count is filled with the last surviving sentence (one sentence moved per
        hole); the others keep their slots."""
        keep = np.asarray(keep, dtype=bool)
        count = int(keep.sum())
        order = np.arange(count)
        holes = np.flatnonzero(~keep[:count])
        movers = count + np.flatnonzero(keep[count:])
        order[holes] = movers
        if holes.size:
            g = self.group
            rows_to = (holes[:, None] * g + np.arange(g)).reshape(-1)
            rows_from = (movers[:, None] * g + np.arange(g)).reshape(-1)
            for a in self.cross:
                a[holes] = a[movers]
            self.padding[holes] = self.padding[movers]
            for a in self.cache:
                a[rows_to] = a[rows_from]
        self.sents = count
        self._shrink()
        return order

    def _shrink(self) -> None:
        """Give back source positions no live sentence needs (the step attends over all of them)."""
        if self.sents == 0:
            self._reserve(0, 0)
            return
        used = np.flatnonzero(~self.padding[: self.sents].all(axis=0))
        need = _round_up(int(used[-1]) + 1 if used.size else 1, SOURCE_CHUNK)
        if need < self.src_cap:
            self._reserve(self.sents, need)

    # -- rows move
    def reorder(self, parents: np.ndarray) -> None:
        """Row ``r`` continues row ``parents[r]`` (a beam reorder; [rows]). Only the rows whose
        parent is another row are copied."""
        moved = np.flatnonzero(parents != np.arange(len(parents)))
        if moved.size:
            sources = parents[moved]
            for a in self.cache:
                a[moved] = a[sources]  # the right side is gathered first: overlaps are safe

    def fit_positions(self, length: int) -> None:
        """Make the cache hold ``length`` positions per row (growing by POSITION_CHUNK, and giving
        back what no row needs any more)."""
        need = _round_up(max(length, 1), POSITION_CHUNK)
        if need == self.cache_cap:
            return
        if need < self.cache_cap and need > self.cache_cap - 2 * POSITION_CHUNK:
            return  # not worth a copy
        keep = min(need, self.cache_cap)
        cache = [self._empty(a.shape[0], need) for a in self.cache]
        for dst, src in zip(cache, self.cache):
            dst[: self.rows, :, :keep] = src[: self.rows, :, :keep]
        self.cache = cache

    def write(self, new_kv: list[np.ndarray], positions: np.ndarray) -> None:
        """Write a step's new keys / values (per layer [rows, H, T, hd]) at each row's positions
        ``positions[r] .. positions[r] + T - 1``."""
        rows, new_len = new_kv[0].shape[0], new_kv[0].shape[2]
        index = np.arange(rows)
        for t in range(new_len):
            at = positions + t
            for dst, src in zip(self.cache, new_kv):
                dst[index, :, at, :] = src[:, :, t, :]
