"""The one search loop: beam search, greedy and sampling with fairseq SequenceGenerator semantics
(fairseq 0.12), over any backend. numpy only.

A backend provides ``encode`` and ``step`` (see ``runtime/backends/__init__.py``). Each step feeds
one token per live hypothesis; hypotheses are kept grouped by sentence (``beam`` rows per live
sentence), which lets the backend share one copy of each sentence's cross-attention K/V.

Two ways to get candidates from a step:
- top-k (fast path): the backend applies the search rules (pad, unk penalty, min/max length,
  forced prefix) before its own per-row top-k, and returns [rows, k] scores and ids. Per-row top-k
  with k >= 2 * beam contains fairseq's global top 2 * beam over beam x vocab, because adding a
  hypothesis' cumulative score does not change the order within its row.
- full log-probs: needed for sampling, temperature, no_repeat_ngram_size; the rules are applied
  here by ``apply_rules``, the numpy twin of the in-graph rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

NEG_INF = np.float32(-np.inf)


@dataclass
class SearchOptions:
    beam: int = 5
    nbest: int = 1
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    lenpen: float = 1.0
    unkpen: float = 0.0
    no_repeat_ngram_size: int = 0
    sampling: bool = False
    temperature: float = 1.0
    sampling_topk: int = -1
    sampling_topp: float = -1.0
    seed: int | None = None
    prefix_tokens: list[int] = field(default_factory=list)  # forced target prefix (language tag...)

    def validate(self) -> None:
        if self.beam < 1:
            raise InputError(f"--beam must be >= 1, got {self.beam}")
        if not 1 <= self.nbest <= self.beam:
            raise InputError(f"--nbest must be between 1 and --beam ({self.beam}), got {self.nbest}")
        if self.max_len_a < 0 or self.max_len_b < 0:
            raise InputError("--max-len-a and --max-len-b must be >= 0")
        if self.min_len < 0:
            raise InputError(f"--min-len must be >= 0, got {self.min_len}")
        if self.temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        if self.no_repeat_ngram_size < 0:
            raise InputError("--no-repeat-ngram-size must be >= 0")
        if self.sampling_topp > 1:
            raise InputError(f"--topp must be <= 1, got {self.sampling_topp}")
        if self.sampling_topk == 0:
            raise InputError("--topk must be > 0 (or -1 for no limit)")

    @property
    def needs_log_probs(self) -> bool:
        """True when candidates cannot come from the backend's in-graph top-k."""
        return self.sampling or self.temperature != 1.0 or self.no_repeat_ngram_size > 0


@dataclass
class StepRules:
    """What must hold for a step before any top-k, exactly as fairseq applies it."""

    ban_eos: bool  # step < min_len (and no forced prefix token at this step)
    only_eos: bool  # step >= max_len
    unk_penalty: float
    forced_tokens: np.ndarray  # [rows] int64, -1 where the row is free


@dataclass
class Hypothesis:
    tokens: list[int]  # fairseq dictionary ids, final </s> included
    score: float  # sum of token log-probs / len(tokens) ** lenpen
    positional_scores: list[float]


def max_length(opts: SearchOptions, src_len: int, max_positions: int) -> int:
    """fairseq: min(max_len_a * src_len + max_len_b, max_decoder_positions - 1); src_len is the
    padded source width."""
    return min(int(opts.max_len_a * src_len + opts.max_len_b), max_positions - 1)


def step_rules(opts: SearchOptions, step: int, max_len: int, rows: int) -> StepRules:
    forced = np.full(rows, -1, dtype=np.int64)
    prefix_active = step < len(opts.prefix_tokens) and step < max_len
    if prefix_active:
        forced[:] = opts.prefix_tokens[step]
    return StepRules(
        ban_eos=(not prefix_active) and step < opts.min_len,
        only_eos=step >= max_len,
        unk_penalty=float(opts.unkpen),
        forced_tokens=forced,
    )


def apply_rules(log_probs: np.ndarray, rules: StepRules, pad: int, unk: int, eos: int) -> np.ndarray:
    """fairseq's per-step edits of the [rows, vocab] float32 log-probs, in fairseq's order.
    Mirrors ``export/graphs.py:apply_rules`` (tests keep the two equal)."""
    lp = np.array(log_probs, dtype=np.float32, copy=True)
    lp[np.isnan(lp)] = NEG_INF
    lp[:, pad] = NEG_INF
    lp[:, unk] -= np.float32(rules.unk_penalty)
    if rules.only_eos:
        eos_col = lp[:, eos].copy()
        lp[:] = NEG_INF
        lp[:, eos] = eos_col
    forced = rules.forced_tokens
    rows = np.nonzero(forced >= 0)[0]
    if rows.size:
        kept = lp[rows, forced[rows]]
        lp[rows] = NEG_INF
        lp[rows, forced[rows]] = kept
    if rules.ban_eos:
        lp[:, eos] = NEG_INF
    return lp


def block_repeated_ngrams(log_probs: np.ndarray, history: np.ndarray, n: int, step: int) -> None:
    """fairseq NGramRepeatBlock, in place: history [rows, step + 1] (leading </s> included).
    A token that would complete an n-gram already in the row's history gets -inf."""
    if n <= 0 or step + 2 - n < 0:
        return
    for r in range(history.shape[0]):
        toks = history[r].tolist()
        key = tuple(toks[len(toks) - (n - 1):]) if n > 1 else ()
        banned = [toks[i + n - 1] for i in range(len(toks) - n + 1) if tuple(toks[i:i + n - 1]) == key]
        if banned:
            log_probs[r, banned] = NEG_INF


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    z = x - m
    return (z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))).astype(np.float32)


def _row_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k in descending order (ties: lower id first). [rows, V] -> [rows, k] x2."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids


def _sample(lp: np.ndarray, count: int, opts: SearchOptions, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """fairseq Sampling for one row of log-probs: ``count`` draws with replacement, restricted to
    the top-k tokens or to the top-p nucleus (the smallest prefix of the sorted distribution
    whose mass reaches p). Returns (ids, log-probs of the drawn ids)."""
    probs = np.exp(lp.astype(np.float64))
    if opts.sampling_topp > 0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = int(np.sum(cum < opts.sampling_topp)) + 1
        cand = order[:keep]
    elif opts.sampling_topk > 0:
        cand = np.argsort(-probs, kind="stable")[: opts.sampling_topk]
    else:
        cand = np.arange(lp.shape[0])
    p = probs[cand]
    total = p.sum()
    if not total > 0:  # everything banned: fall back to the first candidate (score stays -inf)
        ids = np.full(count, cand[0])
    else:
        ids = cand[rng.choice(cand.shape[0], size=count, replace=True, p=p / total)]
    return ids.astype(np.int64), lp[ids].astype(np.float32)


class _Finalized:
    """Finished hypotheses of each input sentence (fairseq ``finalized``)."""

    def __init__(self, batch: int, beam: int, lenpen: float):
        self.hyps: list[list[Hypothesis]] = [[] for _ in range(batch)]
        self.beam = beam
        self.lenpen = lenpen

    def add(self, sent: int, step: int, tokens: np.ndarray, cum_scores: np.ndarray) -> None:
        """tokens [step + 1] (without the leading </s>, final </s> included); cum_scores [step + 1]
        cumulative float32 scores (fairseq recovers positional scores as their differences)."""
        if len(self.hyps[sent]) >= self.beam:
            return
        pos = np.empty_like(cum_scores)
        pos[0] = cum_scores[0]
        pos[1:] = cum_scores[1:] - cum_scores[:-1]
        score = cum_scores[-1] / np.float32((step + 1) ** self.lenpen)
        self.hyps[sent].append(Hypothesis([int(t) for t in tokens], float(score), [float(x) for x in pos]))

    def full(self, sent: int) -> bool:
        return len(self.hyps[sent]) >= self.beam

    def nbest(self, sent: int, n: int) -> list[Hypothesis]:
        return sorted(self.hyps[sent], key=lambda h: -h.score)[:n]


def generate(backend, src_tokens: np.ndarray, opts: SearchOptions, shortlist=None) -> list[list[Hypothesis]]:
    """Translate a batch: src_tokens [batch, src_len] int64, left-padded. Returns, per sentence,
    its n-best hypotheses sorted by score (best first). ``shortlist`` (``deltalm.shortlist``):
    the steps score only the batch's candidates (the backend must have been opened for it)."""
    opts.validate()
    cfg = backend.cfg
    eos, pad, unk = cfg.eos, cfg.pad, cfg.unk
    src_tokens = np.ascontiguousarray(src_tokens, dtype=np.int64)
    batch, src_len = src_tokens.shape
    beam = opts.beam
    max_len = max_length(opts, src_len, cfg.max_positions)
    if opts.min_len > max_len:
        raise InputError(f"--min-len {opts.min_len} exceeds the maximum length {max_len}")
    for t in opts.prefix_tokens:
        if t in (eos, pad) or not 0 <= t < cfg.vocab_size:
            raise InputError(f"forced target prefix token {t} is not allowed")
    if beam >= cfg.vocab_size:
        raise InputError(f"--beam {beam} must be smaller than the vocabulary ({cfg.vocab_size})")
    use_topk = not opts.needs_log_probs and getattr(backend, "topk", 0) >= 2 * beam
    rng = np.random.default_rng(opts.seed)

    if shortlist is None:
        state = backend.encode(src_tokens)
    else:
        required = [eos, unk, *opts.prefix_tokens]
        state = backend.encode(src_tokens, candidates=shortlist.candidates(src_tokens, required, backend.topk + 3))
    finalized = _Finalized(batch, beam, opts.lenpen)
    live = np.arange(batch, dtype=np.int64)  # encoder rows of the live sentences
    rows = batch * beam
    reorder = np.arange(rows, dtype=np.int64)
    history = np.full((rows, 1), eos, dtype=np.int64)  # fed tokens, leading </s> included
    cum = np.zeros((rows, 0), dtype=np.float32)  # cumulative score after each generated token

    for step in range(max_len + 1):
        sents = live.shape[0]
        rules = step_rules(opts, step, max_len, rows)
        if use_topk:
            vals, ids = backend.step(state, history[:, -1], step, reorder, live, rules, want="topk")
        else:
            lp = backend.step(state, history[:, -1], step, reorder, live, rules, want="logprobs")
            if opts.temperature != 1.0:
                lp = _log_softmax(lp / np.float32(opts.temperature))
            lp = apply_rules(lp, rules, pad, unk, eos)
            if opts.no_repeat_ngram_size > 0:
                block_repeated_ngrams(lp, history, opts.no_repeat_ngram_size, step)
        prev = cum[:, -1] if step > 0 else np.zeros(rows, dtype=np.float32)

        if opts.sampling:
            # one draw per hypothesis (beam draws from hypothesis 0 at step 0); each continues itself
            lp3 = lp.reshape(sents, beam, -1)
            cand_tokens = np.empty((sents, beam), dtype=np.int64)
            cand_lp = np.empty((sents, beam), dtype=np.float32)
            for s in range(sents):
                if step == 0:
                    cand_tokens[s], cand_lp[s] = _sample(lp3[s, 0], beam, opts, rng)
                else:
                    for b in range(beam):
                        cand_tokens[s, b : b + 1], cand_lp[s, b : b + 1] = _sample(lp3[s, b], 1, opts, rng)
            cand_beams = np.zeros((sents, beam), dtype=np.int64) if step == 0 else np.tile(np.arange(beam), (sents, 1))
            cand_scores = prev.reshape(sents, beam)[np.arange(sents)[:, None], cand_beams] + cand_lp
        else:
            if not use_topk:
                vals, ids = _row_topk(lp, 2 * beam)
            k = vals.shape[1]
            vals = vals.reshape(sents, beam, k)
            ids = ids.reshape(sents, beam, k)
            scores = prev.reshape(sents, beam, 1) + vals
            if step == 0:  # all beams are identical: expand only the first
                scores, ids = scores[:, :1], ids[:, :1]
            flat = scores.reshape(sents, -1)
            vocab_span = cfg.vocab_size * scores.shape[1]
            cand_size = min(2 * beam, vocab_span - 1, flat.shape[1])  # fairseq: k <= beam*V - 1
            # descending; ties: lower flat index (hypothesis, then rank) first
            order = np.argsort(-flat, axis=1, kind="stable")[:, :cand_size]
            cand_scores = np.take_along_axis(flat, order, axis=1)
            cand_beams = order // k
            cand_tokens = np.take_along_axis(ids.reshape(sents, -1), order, axis=1)

        eos_mask = (cand_tokens == eos) & (cand_scores != NEG_INF)
        first = min(beam, cand_tokens.shape[1])
        for s in range(sents):
            sent = int(live[s])
            for j in range(first):
                if eos_mask[s, j] and not finalized.full(sent):
                    r = s * beam + int(cand_beams[s, j])
                    toks = np.append(history[r, 1:], eos)
                    finalized.add(sent, step, toks, np.append(cum[r], cand_scores[s, j]))

        if opts.sampling:
            # every hypothesis continues itself; one that just ended is dead from now on
            active = np.tile(np.arange(beam), (sents, 1))
            new_scores = np.where(eos_mask, NEG_INF, cand_scores)
        else:
            # the next beams: the first `beam` candidates that are not eos, in candidate order
            key = eos_mask.astype(np.int64) * cand_tokens.shape[1] + np.arange(cand_tokens.shape[1])
            active = np.argsort(key, axis=1, kind="stable")[:, :beam]
            new_scores = np.take_along_axis(cand_scores, active, axis=1)
        new_tokens = np.take_along_axis(cand_tokens, active, axis=1)
        new_parents = np.arange(sents)[:, None] * beam + np.take_along_axis(cand_beams, active, axis=1)

        alive = np.array(
            [not finalized.full(int(live[s])) and step < max_len and bool(np.any(new_scores[s] != NEG_INF)) for s in range(sents)],
            dtype=bool,
        )
        if not alive.any():
            break
        live = live[alive]
        reorder = new_parents[alive].reshape(-1)
        rows = reorder.shape[0]
        history = np.concatenate([history[reorder], new_tokens[alive].reshape(-1, 1)], axis=1)
        cum = np.concatenate([cum[reorder], new_scores[alive].reshape(-1, 1)], axis=1)

    return [finalized.nbest(s, opts.nbest) for s in range(batch)]
