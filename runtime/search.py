"""The one search: beam search, greedy and sampling with fairseq SequenceGenerator semantics
(fairseq 0.12), as a step-level engine over any backend. numpy only.

    engine = Engine(backend)
    engine.add("a", Sentence(src_ids, options))
    while not engine.idle:
        for event in engine.step():      # Partial(key, tokens) / Finished(key, hypotheses)
            ...

Sentences join a running batch at a step boundary (``add``; the encoder runs once for all the
arrivals of a step) and leave it as soon as they are finished (``Finished``) or cancelled. Each
sentence has its own options, step counter, maximum length, forced prefix and finished
hypotheses; rows (hypotheses) of sentences at different steps share one decoder step, each at its
own position. Sentences of different beam sizes run in separate lanes (one decoder step each per
engine step): the step graph shares a sentence's encoder K/V among its ``beam`` rows, which needs
one group size per step.

Exactness: a sentence's candidates at each step depend only on its own rows (their history, the
rules of its options and its step), so whatever joins or leaves around it, beam search and greedy
give it the result it gets alone, which is fairseq's ``generate`` on that sentence: same ids, scores
equal up to float rounding (its attention spans more padding in a larger batch). ``max_len_a``
applies to the sentence's own source length (fairseq uses the padded width of its batch, which makes
results depend on the batch). Sampling draws from a generator of its own per sentence, seeded from
``Sentence.seed`` (also batch-independent); a vocabulary shortlist scores the candidates of the
whole batch, so with one the results depend on the batch.

Candidates of a step:
- top-k (fast path): the step graph applies the rules (pad, unk penalty, min/max length, forced
  prefix) before its per-row top-k; per-row top-k with k >= 2 * beam contains fairseq's global top
  2 * beam over beam x vocabulary, because adding a hypothesis' cumulative score does not change
  the order within its row;
- full log-probs: for sampling, temperature, no_repeat_ngram_size and beams wider than k / 2; the
  rules are applied here by ``apply_rules``, the numpy twin of the in-graph rules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from .backends.interface import Backend, Encoded
from .batch import DecoderBatch
from .constraints import constrained_candidates, start_state
from .errors import DecodeError, DeltaLMError, InputError
from .graphs import RULES_MARGIN
from .options import OptionError, TranslateOptions
from .tokenizer import collate

NEG_INF = np.float32(-np.inf)


# --- what goes in, what comes out -----------------------------------------------------------------


@dataclass(frozen=True)
class Sentence:
    """One sentence to decode: ``src`` its source ids (source prefix and ``</s>`` included);
    ``options``; ``prefix`` forced target ids (language tag, per-sentence prefix); ``seed`` of its
    sampling generator (None: fresh entropy); ``constraints`` target token sequences every
    hypothesis should contain (lexically constrained decoding, ``options.constraint_order``)."""

    src: tuple[int, ...]
    options: TranslateOptions = field(default_factory=TranslateOptions)
    prefix: tuple[int, ...] = ()
    seed: tuple[int, ...] | None = None
    constraints: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Hypothesis:
    """One finished hypothesis. ``tokens``: fairseq dictionary ids, final ``</s>`` included (and the
    forced target prefix, if any); ``score``: sum of the token log-probs (natural log) / len(tokens)
    ** lenpen; ``positional_scores``: the log-prob of each token; ``text``: the detokenized target
    (forced prefix symbols removed), filled in by the Translator."""

    tokens: list[int]
    score: float
    positional_scores: list[float]
    text: str = ""


@dataclass(frozen=True)
class Partial:
    """The best live hypothesis of sentence ``key`` after a step: its tokens so far (prefix
    included, no ``</s>``)."""

    key: Hashable
    tokens: list[int]


@dataclass(frozen=True)
class Finished:
    """Sentence ``key`` is done: its n-best hypotheses, best first."""

    key: Hashable
    hypotheses: list[Hypothesis]


# --- the rules of a step ----------------------------------------------------------------------------


@dataclass
class StepRules:
    """What must hold for each row of a step before any top-k, exactly as fairseq applies it."""

    forced_tokens: np.ndarray  # [rows] int64, -1 where the row is free
    ban_eos: np.ndarray  # [rows] bool: step < min_len (and no forced prefix token at this step)
    only_eos: np.ndarray  # [rows] bool: step >= max_len
    unk_penalty: np.ndarray  # [rows] float32


def max_length(opts: TranslateOptions, src_len: int, max_positions: int) -> int:
    """fairseq: min(max_len_a * src_len + max_len_b, max_decoder_positions - 1)."""
    return min(int(opts.max_len_a * src_len + opts.max_len_b), max_positions - 1)


def sentence_rules(opts: TranslateOptions, prefix: Sequence[int], step: int, max_len: int) -> tuple[int, bool, bool]:
    """(forced token or -1, ban_eos, only_eos) of a sentence at ``step``: fairseq forces the prefix
    token while ``step < len(prefix)`` (and step < max_len) and bans eos before ``min_len``
    only where no prefix token is forced."""
    forced = prefix[step] if step < len(prefix) and step < max_len else -1
    return forced, forced < 0 and step < opts.min_len, step >= max_len


def apply_rules(log_probs: np.ndarray, rules: StepRules, pad: int, unk: int, eos: int) -> np.ndarray:
    """fairseq's per-step edits of the [rows, vocab] float32 log-probs, in fairseq's order, each
    rule per row. Mirrors ``export/graphs.py:apply_rules`` (tests keep the two equal)."""
    lp = np.array(log_probs, dtype=np.float32, copy=True)
    lp[np.isnan(lp)] = NEG_INF
    lp[:, pad] = NEG_INF
    lp[:, unk] -= np.asarray(rules.unk_penalty, dtype=np.float32)
    only = np.flatnonzero(rules.only_eos)
    if only.size:
        eos_col = lp[only, eos].copy()
        lp[only] = NEG_INF
        lp[only, eos] = eos_col
    forced = rules.forced_tokens
    rows = np.flatnonzero(forced >= 0)
    if rows.size:
        kept = lp[rows, forced[rows]]
        lp[rows] = NEG_INF
        lp[rows, forced[rows]] = kept
    lp[np.flatnonzero(rules.ban_eos), eos] = NEG_INF
    return lp


def _ruled_scores(raw: np.ndarray, ids: np.ndarray, rules: StepRules, rows: slice, cfg) -> np.ndarray:
    """``apply_rules`` on the raw log-probs of the token ``ids`` of some rows ([n, M] each): what
    those columns of the ruled [n, V] log-probs would hold."""
    v = np.array(raw, dtype=np.float32, copy=True)
    v[np.isnan(v)] = NEG_INF
    v[ids == cfg.pad] = NEG_INF
    v = np.where(ids == cfg.unk, v - rules.unk_penalty[rows][:, None], v).astype(np.float32)
    v[rules.only_eos[rows][:, None] & (ids != cfg.eos)] = NEG_INF
    forced = rules.forced_tokens[rows][:, None]
    v[(forced >= 0) & (ids != forced)] = NEG_INF
    v[rules.ban_eos[rows][:, None] & (ids == cfg.eos)] = NEG_INF
    return v


def block_repeated_ngrams(log_probs: np.ndarray, history: np.ndarray, n: int, step: int) -> None:
    """fairseq NGramRepeatBlock, in place: history [rows, step + 1] (leading </s> included).
    A token that would complete an n-gram already in the row's history gets -inf."""
    if n <= 0 or step + 2 - n < 0:
        return
    for r in range(history.shape[0]):
        toks = history[r].tolist()
        key = tuple(toks[len(toks) - (n - 1) :]) if n > 1 else ()
        banned = [toks[i + n - 1] for i in range(len(toks) - n + 1) if tuple(toks[i : i + n - 1]) == key]
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


def sample_rows(
    lp: np.ndarray, draws: int, opts: TranslateOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """fairseq Sampling for each row of log-probs ``lp`` [rows, V]: ``draws`` draws with
    replacement per row, restricted to the top-k tokens or to the top-p nucleus (the smallest
    prefix of the sorted distribution whose mass reaches p). Returns (ids, log-probs of the drawn
    ids), each [rows, draws]."""
    rows, vocab = lp.shape
    probs = np.exp(lp.astype(np.float64))
    if opts.sampling_topk > 0:
        k = min(opts.sampling_topk, vocab)
        cand = np.argpartition(-probs, k - 1, axis=1)[:, :k] if k < vocab else np.tile(np.arange(vocab), (rows, 1))
        # descending, ties by id (a stable order, as a sort of the whole row would give)
        cand = np.take_along_axis(cand, np.lexsort((cand, -np.take_along_axis(probs, cand, axis=1)), axis=1), axis=1)
        keep = np.full(rows, k)
    elif opts.sampling_topp > 0:
        cand = np.argsort(-probs, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(probs, cand, axis=1), axis=1)
        keep = np.sum(cum < opts.sampling_topp, axis=1) + 1
    else:
        cand = np.tile(np.arange(vocab), (rows, 1))
        keep = np.full(rows, vocab)
    p = np.take_along_axis(probs, cand, axis=1)
    p[np.arange(cand.shape[1])[None, :] >= keep[:, None]] = 0.0
    total = p.sum(axis=1)
    ids = np.empty((rows, draws), dtype=np.int64)
    for r in range(rows):
        if not total[r] > 0:  # everything banned: the first candidate (its score stays -inf)
            ids[r] = cand[r, 0]
        else:
            ids[r] = cand[r, rng.choice(cand.shape[1], size=draws, replace=True, p=p[r] / total[r])]
    return ids, np.take_along_axis(lp, ids, axis=1).astype(np.float32)


# --- the engine -----------------------------------------------------------------------------------


class _Live:
    """One sentence in a lane: its options and everything its search has so far."""

    def __init__(self, key: Hashable, sentence: Sentence, max_len: int, group: int, eos: int):
        self.key = key
        self.eos = eos
        self.sentence = sentence
        self.opts = sentence.options
        self.max_len = max_len
        self.step = 0
        self.hist = np.full((group, 1), eos, dtype=np.int64)  # fed tokens, leading </s> included
        self.cum = np.zeros((group, 0), dtype=np.float32)  # cumulative score after each token
        self.final: list[Hypothesis] = []
        self.cancelled = False
        # the constraint state of each hypothesis (lexically constrained decoding), else None
        self.states = (
            [start_state(sentence.constraints, self.opts.constraint_order)] * group if sentence.constraints else None
        )
        self.rng = (
            np.random.default_rng(None if sentence.seed is None else list(sentence.seed))
            if self.opts.sampling
            else None
        )

    def bans_eos(self) -> np.ndarray:
        """[group] bool: hypotheses whose constraints are not all met may not end (fairseq bans
        </s> for them from step 1 on). At the maximum length, where nothing but </s> is allowed,
        a sentence none of whose hypotheses has met its constraints could not end at all (fairseq's
        generator fails an assertion there): its hypotheses end without them."""
        unfinished = np.zeros(self.hist.shape[0], dtype=bool)
        if self.states is None or self.step == 0:
            return unfinished
        unfinished = np.array([not state.finished for state in self.states])
        if self.step >= self.max_len and unfinished.all():
            unfinished[:] = False
        return unfinished

    @property
    def prev_scores(self) -> np.ndarray:
        return self.cum[:, -1] if self.step > 0 else np.zeros(self.hist.shape[0], dtype=np.float32)

    def finalize(self, row: int, score: np.float32) -> None:
        """fairseq finalize_hypos: row ``row`` ends with </s> at this step with cumulative score
        ``score``; kept while fewer than ``beam`` hypotheses are finished."""
        if len(self.final) >= self.opts.beam:
            return
        cum = np.append(self.cum[row], score)
        pos = np.empty_like(cum)
        pos[0] = cum[0]
        pos[1:] = cum[1:] - cum[:-1]  # fairseq recovers positional scores as differences
        tokens = [int(t) for t in self.hist[row, 1:]] + [self.eos]
        norm = cum[-1] / np.float32((self.step + 1) ** self.opts.lenpen)
        self.final.append(Hypothesis(tokens, float(norm), [float(x) for x in pos]))

    def nbest(self) -> list[Hypothesis]:
        return sorted(self.final, key=lambda h: -h.score)[: self.opts.nbest]


@dataclass
class _Candidates:
    """The candidates of a set of sentences at one step: scores / tokens / beams [n, C] in
    candidate order, ``valid`` [n, C] (False beyond a sentence's candidate count)."""

    scores: np.ndarray
    tokens: np.ndarray
    beams: np.ndarray
    valid: np.ndarray


class _Lane:
    """The sentences of one beam size: their rows share each decoder step."""

    def __init__(self, engine: Engine, group: int):
        self.engine = engine
        self.group = group
        self.batch = DecoderBatch(engine.cfg, engine.backend.float_dtype, group)
        self.live: list[_Live] = []
        self.sources: list[tuple[int, ...]] = []  # per live sentence (shortlist candidates)
        self.candidates: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.live) * self.group

    def admit(self, items: list[tuple[Hashable, Sentence]], encoded: Encoded, which: np.ndarray) -> None:
        cfg = self.engine.cfg
        self.batch.admit(encoded.cross, encoded.padding, which)
        for key, sentence in items:
            max_len = max_length(sentence.options, len(sentence.src), cfg.max_positions)
            self.live.append(_Live(key, sentence, max_len, self.group, cfg.eos))
        self._refresh_candidates()

    def _refresh_candidates(self) -> None:
        shortlist = self.engine.shortlist
        if shortlist is None or not self.live:
            self.candidates = None
            return
        cfg = self.engine.cfg
        required = {cfg.eos, cfg.unk}
        for live in self.live:
            required.update(live.sentence.prefix)
        src = collate([live.sentence.src for live in self.live], cfg.pad)
        self.candidates = shortlist.candidates(src, sorted(required), self.engine.backend.topk + RULES_MARGIN)

    # -- one step
    def step(self) -> list:
        engine = self.engine
        cfg, backend, g = engine.cfg, engine.backend, self.group
        self._drop_cancelled()
        if not self.live:
            return []
        n = len(self.live)
        rows = n * g
        steps = np.array([live.step for live in self.live], dtype=np.int64)
        positions = np.repeat(steps, g)
        self.batch.fit_positions(int(steps.max()) + 1)
        forced, ban, only, unk = (np.empty(n, np.int64), np.empty(n, bool), np.empty(n, bool), np.empty(n, np.float32))
        for s, live in enumerate(self.live):
            forced[s], ban[s], only[s] = sentence_rules(live.opts, live.sentence.prefix, live.step, live.max_len)
            unk[s] = live.opts.unkpen
        rules = StepRules(
            np.repeat(forced, g),
            np.repeat(ban, g) | np.concatenate([live.bans_eos() for live in self.live]),
            np.repeat(only, g),
            np.repeat(unk, g),
        )
        full = [live.opts.needs_log_probs or 2 * g > backend.topk for live in self.live]
        want = any(full)
        # the tokens each constrained hypothesis could take next: their scores come back with the step
        nexts = [[sorted(st.next_tokens()) for st in live.states] if live.states else None for live in self.live]
        width = max([1] + [len(t) for per in nexts if per for t in per])
        score_ids = np.full((rows, 1, width), cfg.eos, dtype=np.int64)
        for s, per in enumerate(nexts):
            for b, next_ids in enumerate(per or ()):
                score_ids[s * g + b, 0, : len(next_ids)] = next_ids
        feeds = self.batch.feeds(
            backend.step_spec,
            np.concatenate([live.hist[:, -1:] for live in self.live]),
            positions,
            rules,
            score_ids=score_ids,
            want_log_probs=want,
            candidates=self.candidates,
        )
        out = backend.run_step(feeds)
        self.batch.write(out.new_kv, positions)

        log_probs = None
        if want:
            log_probs = out.log_probs[:, 0, :]
            if "candidates" in feeds:  # back to the whole vocabulary: -inf off the shortlist
                expanded = np.full((rows, cfg.vocab_size), NEG_INF, dtype=np.float32)
                expanded[:, feeds["candidates"]] = log_probs
                log_probs = expanded
        topk = (out.topk_scores[:, 0, :].reshape(n, g, -1), out.topk_ids[:, 0, :].reshape(n, g, -1))
        parents = np.arange(rows, dtype=np.int64)
        keep = np.ones(n, dtype=bool)
        events: list = []
        plain = [s for s in range(n) if not full[s] and nexts[s] is None]
        if plain:
            self._advance(plain, self._beam_candidates(plain, *topk), parents, keep, events)
        for s in range(n):
            if s in plain:
                continue
            live = self.live[s]
            mine = slice(s * g, (s + 1) * g)
            lp: np.ndarray | None
            if full[s]:
                assert log_probs is not None  # want = any(full)
                lp = self._full_log_probs(live, log_probs[mine], rules, s)
                vals, ids = _row_topk(lp, 2 * g)
            else:
                lp, vals, ids = None, topk[0][s], topk[1][s]
            per = nexts[s]
            if live.opts.sampling:
                assert lp is not None  # sampling needs_log_probs, so full[s]
                self._advance([s], self._sampled_candidates(live, lp), parents, keep, events)
            elif per is None:
                self._advance([s], self._beam_candidates([s], vals[None], ids[None]), parents, keep, events)
            else:
                token_scores = (
                    _ruled_scores(out.token_scores[mine, 0, :], score_ids[mine, 0, :], rules, mine, cfg)
                    if lp is None
                    else np.take_along_axis(lp, score_ids[mine, 0, :], axis=1)
                )
                self._advance_constrained(s, vals, ids, per, token_scores, parents, keep, events)
        self.batch.reorder(parents)
        if not keep.all():
            order = self.batch.retire(keep)
            self.live = [self.live[i] for i in order]
            self._refresh_candidates()
        return events

    def _full_log_probs(self, live: _Live, lp: np.ndarray, rules: StepRules, s: int) -> np.ndarray:
        """The rows of one sentence as the search sees them: temperature, rules, n-gram blocking."""
        cfg, g = self.engine.cfg, self.group
        if live.opts.temperature != 1.0:
            lp = _log_softmax(lp / np.float32(live.opts.temperature))
        mine = slice(s * g, (s + 1) * g)
        lp = apply_rules(
            lp,
            StepRules(rules.forced_tokens[mine], rules.ban_eos[mine], rules.only_eos[mine], rules.unk_penalty[mine]),
            cfg.pad,
            cfg.unk,
            cfg.eos,
        )
        if live.opts.no_repeat_ngram_size > 0:
            block_repeated_ngrams(lp, live.hist, live.opts.no_repeat_ngram_size, live.step)
        return lp

    def _beam_candidates(self, sents: list[int], vals: np.ndarray, ids: np.ndarray) -> _Candidates:
        """fairseq BeamSearch.step for sentences ``sents``: their rows' top scores ``vals`` / ``ids``
        [len(sents) or n, group, k] (the rules applied) -> the best 2 * beam (hypothesis, token)
        pairs by cumulative score. At step 0 every hypothesis is the same: only the first is
        expanded."""
        g, vocab = self.group, self.engine.cfg.vocab_size
        lives = [self.live[s] for s in sents]
        if vals.shape[0] != len(sents):
            vals, ids = vals[sents], ids[sents]
        k = vals.shape[2]
        prev = np.stack([live.prev_scores for live in lives])
        scores = prev[:, :, None] + vals
        first = np.array([live.step == 0 for live in lives])
        scores[first, 1:, :] = NEG_INF
        flat = scores.reshape(len(sents), g * k)
        width = min(2 * g, g * k)
        # descending; ties: lower flat index (hypothesis, then rank) first
        order = np.argsort(-flat, axis=1, kind="stable")[:, :width]
        spans = np.where(first, 1, g)
        size = np.minimum(np.minimum(2 * g, vocab * spans - 1), k * spans)  # fairseq: k <= beam * V - 1
        return _Candidates(
            np.take_along_axis(flat, order, axis=1),
            np.take_along_axis(ids.reshape(len(sents), -1), order, axis=1),
            order // k,
            np.arange(width)[None, :] < size[:, None],
        )

    def _sampled_candidates(self, live: _Live, lp: np.ndarray) -> _Candidates:
        """fairseq Sampling.step: one draw per hypothesis (``beam`` draws from the first at step
        0); each hypothesis continues itself."""
        g = self.group
        assert live.rng is not None  # a sampling sentence has its generator
        if live.step == 0:
            tokens, drawn = sample_rows(lp[:1], g, live.opts, live.rng)
            beams = np.zeros((1, g), dtype=np.int64)
        else:
            tokens, drawn = sample_rows(lp, 1, live.opts, live.rng)
            tokens, drawn = tokens.reshape(1, g), drawn.reshape(1, g)
            beams = np.arange(g)[None, :]
        scores = live.prev_scores[beams] + drawn
        return _Candidates(scores, tokens.reshape(1, g), beams, np.ones((1, g), dtype=bool))

    def _advance_constrained(
        self,
        s: int,
        vals: np.ndarray,
        ids: np.ndarray,
        nexts: list[list[int]],
        next_scores: np.ndarray,
        parents: np.ndarray,
        keep: np.ndarray,
        events: list,
    ) -> None:
        """fairseq LexicallyConstrainedBeamSearch.step for sentence ``s``: its rows' top scores
        ``vals`` / ``ids`` [group, k] and the scores of each row's next constraint tokens (rules
        applied), then the common finish / continue, the constraint states following the beams."""
        live, g, vocab = self.live[s], self.group, self.engine.cfg.vocab_size
        assert live.states is not None  # only sentences with constraints get here
        width = min(2 * g, g * vocab - 1)
        top = self._beam_candidates([s], vals[None], ids[None])
        if live.step >= live.max_len and not any(state.finished for state in live.states):
            # no hypothesis met the constraints and only </s> is left: they end as plain beams do
            # (fairseq's banks would rank the -inf constraint tokens first and end none of them)
            self._advance([s], top, parents, keep, events)
            return
        prev = live.prev_scores
        row_best = None if live.step == 0 else (prev + vals[:, 0], ids[:, 0])
        by_row = [{t: prev[b] + next_scores[b, j] for j, t in enumerate(tokens)} for b, tokens in enumerate(nexts)]
        cand = constrained_candidates(
            live.step,
            width,
            (top.scores[0, :width], top.tokens[0, :width], top.beams[0, :width]),
            row_best,
            by_row,
            live.states,
        )
        found = len(cand.scores)
        pad = 2 * g - found  # fairseq's candidate buffer is 2 x beam wide, zero-filled
        scores = np.concatenate([cand.scores, np.zeros(pad, np.float32)])[None]
        tokens = np.concatenate([cand.tokens, np.zeros(pad, np.int64)])[None]
        beams = np.concatenate([cand.beams, np.zeros(pad, np.int64)])[None]
        active = self._advance(
            [s], _Candidates(scores, tokens, beams, np.ones((1, 2 * g), dtype=bool)), parents, keep, events
        )
        if keep[s]:
            live.states = [cand.states[a] for a in active[0]]

    def _advance(
        self, sents: list[int], cand: _Candidates, parents: np.ndarray, keep: np.ndarray, events: list
    ) -> np.ndarray:
        """Finish the hypotheses that end in </s> among the first ``beam`` candidates, continue
        with the first ``beam`` that do not (sampling: every hypothesis continues itself), and say
        which sentences are done."""
        engine, g = self.engine, self.group
        eos = engine.cfg.eos
        width = cand.scores.shape[1]
        eos_mask = (cand.tokens == eos) & (cand.scores != NEG_INF) & cand.valid
        sampling = self.live[sents[0]].opts.sampling
        if sampling:
            active = np.tile(np.arange(g), (len(sents), 1))
            new_scores = np.where(eos_mask, NEG_INF, cand.scores)
        else:
            # the next beams: the first `beam` valid candidates that are not eos, in candidate order
            key = np.where(cand.valid, eos_mask * width, 2 * width) + np.arange(width)
            active = np.argsort(key, axis=1, kind="stable")[:, :g]
            new_scores = np.take_along_axis(cand.scores, active, axis=1)
        new_tokens = np.take_along_axis(cand.tokens, active, axis=1)
        new_beams = np.take_along_axis(cand.beams, active, axis=1)
        first = min(g, width)
        for i, s in enumerate(sents):
            live = self.live[s]
            for j in np.flatnonzero(eos_mask[i, :first]):
                live.finalize(int(cand.beams[i, j]), cand.scores[i, j])
            alive = (
                len(live.final) < live.opts.beam and live.step < live.max_len and bool(np.any(new_scores[i] != NEG_INF))
            )
            if not alive:
                keep[s] = False
                events.append(Finished(live.key, live.nbest()))
                continue
            mine = new_beams[i]
            parents[s * g : (s + 1) * g] = s * g + mine
            live.hist = np.concatenate([live.hist[mine], new_tokens[i][:, None]], axis=1)
            live.cum = np.concatenate([live.cum[mine], new_scores[i][:, None]], axis=1)
            live.step += 1
            if engine.partials:
                events.append(Partial(live.key, [int(t) for t in live.hist[int(np.argmax(new_scores[i])), 1:]]))
        return active

    def _drop_cancelled(self) -> None:
        if any(live.cancelled for live in self.live):
            order = self.batch.retire(np.array([not live.cancelled for live in self.live]))
            self.live = [self.live[i] for i in order]
            self._refresh_candidates()


class Engine:
    """Continuous decoding over a backend (see the module docstring).

    ``max_rows``: live hypotheses at most (beam x sentences, over every lane); ``max_tokens``:
    padded source tokens at most (per lane, its sentences x its longest source; summed over the
    lanes); None: no limit (the backend's ``limits`` apply in any case). A sentence waits
    until it fits; the first waiting sentence is admitted into an idle engine whatever its size.
    ``shortlist``: a vocabulary shortlist (``deltalm.Shortlist``; the backend must have been opened
    for it). ``partials``: report a ``Partial`` event per live sentence and step (streaming)."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_rows: int | None = None,
        max_tokens: int | None = None,
        shortlist=None,
        partials: bool = False,
    ) -> None:
        if shortlist is not None and "candidates" not in backend.step_spec.input_names:
            raise InputError(
                "a vocabulary shortlist needs a backend opened for it (without the shortlist graph, "
                "every step scores the whole vocabulary)"
            )
        self.backend = backend
        self.cfg = backend.cfg
        limits = backend.limits
        if limits.rows is not None:
            max_rows = limits.rows if max_rows is None else min(max_rows, limits.rows)
        self.max_sentences = limits.sentences
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.shortlist = shortlist
        self.partials = partials
        self._waiting: deque[tuple[Hashable, Sentence]] = deque()
        self._lanes: dict[int, _Lane] = {}
        self.steps = 0  # decoder steps run (one per lane and engine step)
        self.admitted_last = 0  # sentences admitted by the last step()
        self.rows_last = 0  # rows (hypotheses) the last step() decoded, over every lane

    # -- state
    @property
    def idle(self) -> bool:
        return not self._waiting and not any(lane.live for lane in self._lanes.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def live(self) -> int:
        return sum(len(lane.live) for lane in self._lanes.values())

    @property
    def live_rows(self) -> int:
        return sum(lane.rows for lane in self._lanes.values())

    def _lane_sentences(self, group: int) -> int:
        return len(self._lanes[group].live) if group in self._lanes else 0

    def _padded_tokens(self, extra: dict[int, list[int]]) -> int:
        """Padded source tokens of the live sentences plus ``extra`` (beam -> source lengths)."""
        total = 0
        for group in set(self._lanes) | set(extra):
            lengths = [len(live.sentence.src) for live in self._lanes[group].live] if group in self._lanes else []
            lengths += extra.get(group, [])
            total += len(lengths) * max(lengths, default=0)
        return total

    # -- requests
    @staticmethod
    def check_sentence(cfg, sentence: Sentence) -> None:
        """What a model of configuration ``cfg`` must allow for ``sentence`` (OptionError /
        InputError); ``add`` calls it."""
        opts = sentence.options
        if opts.beam >= cfg.vocab_size:
            raise OptionError("beam", f"{opts.beam} must be smaller than the vocabulary ({cfg.vocab_size})")
        if not 1 <= len(sentence.src) <= cfg.max_positions:
            raise InputError(f"a source of {len(sentence.src)} tokens; the model takes 1 to {cfg.max_positions}")
        for t in sentence.prefix:
            if t in (cfg.eos, cfg.pad) or not 0 <= t < cfg.vocab_size:
                raise InputError(f"forced target prefix token {t} is not allowed")
        max_len = max_length(opts, len(sentence.src), cfg.max_positions)
        if opts.min_len > max_len:
            raise OptionError("min_len", f"{opts.min_len} exceeds the maximum length {max_len}")
        if sentence.constraints and opts.sampling:
            raise OptionError(
                "sampling",
                "cannot be combined with lexical constraints (fairseq's sampling has no constrained search either)",
            )
        if sentence.constraints and sentence.prefix:
            # fairseq's constrained search deals candidates that can advance a constraint first, even
            # when a forced token leaves them no probability: the forced token loses its place and no
            # hypothesis survives (its generator then fails an assertion)
            raise InputError(
                "lexical constraints cannot be combined with a forced target prefix (tgt_prefix or "
                "target_prefix): fairseq's constrained search drops the forced tokens"
            )
        for c in sentence.constraints:
            if not c:
                raise InputError("a lexical constraint is empty")
            for t in c:
                if t in (cfg.eos, cfg.pad) or not 0 <= t < cfg.vocab_size:
                    raise InputError(f"lexical constraint token {t} is not allowed")

    def add(self, key: Hashable, sentence: Sentence) -> None:
        """Queue ``sentence`` under ``key`` (the caller's name for it, reported in its events);
        it joins the batch at the next step where it fits."""
        self.check_sentence(self.cfg, sentence)
        self._waiting.append((key, sentence))

    def cancel(self, key: Hashable) -> bool:
        """Forget sentence ``key``: out of the queue now, out of the batch at the next step. No
        event is reported for it. Returns whether it was found."""
        for i, (k, _) in enumerate(self._waiting):
            if k == key:
                del self._waiting[i]
                return True
        for lane in self._lanes.values():
            for live in lane.live:
                if live.key == key and not live.cancelled:
                    live.cancelled = True
                    return True
        return False

    # -- the loop
    def step(self, admit: bool = True) -> list:
        """Admit what fits (one encoder run for all arrivals), advance every live sentence by one
        token, retire the finished ones. Returns this step's events. A failure of the backend is
        a ``DecodeError`` naming the sentences of the failed run. ``admit=False``: no waiting
        sentence joins at this step (a scheduler that runs a batch to its end before the next,
        e.g. ``deltalm serve --batching request``, admits only while nothing is live)."""
        if admit:
            self._admit()
        else:
            self.admitted_last = 0
        events: list = []
        self.rows_last = 0
        for group in sorted(self._lanes):
            lane = self._lanes[group]
            if lane.live:
                self.rows_last += lane.rows
                try:
                    events += lane.step()
                except DeltaLMError:
                    raise
                except Exception as e:  # the backend's: name the sentences it was decoding
                    raise DecodeError([live.key for live in lane.live], e) from e
                self.steps += 1
            if not lane.live:
                del self._lanes[group]  # its memory goes with it
        return events

    def run(self) -> Iterator:
        """Steps until idle, yielding every event."""
        while not self.idle:
            yield from self.step()

    def _admit(self) -> None:
        rows = self.live_rows
        arrivals: list[tuple[Hashable, Sentence]] = []
        extra: dict[int, list[int]] = {}
        while self._waiting:
            _, sentence = self._waiting[0]
            beam = sentence.options.beam
            more = {**extra, beam: extra.get(beam, []) + [len(sentence.src)]}
            fits = (
                (self.max_rows is None or rows + beam <= self.max_rows)
                and (self.max_tokens is None or self._padded_tokens(more) <= self.max_tokens)
                and (
                    self.max_sentences is None
                    or (
                        len(more[beam]) + self._lane_sentences(beam) <= self.max_sentences
                        and len(arrivals) < self.max_sentences
                    )
                )
            )  # the encoder runs all arrivals at once
            if not fits and (rows or arrivals):
                break
            arrivals.append(self._waiting.popleft())
            rows, extra = rows + beam, more
        self.admitted_last = len(arrivals)
        if not arrivals:
            return
        try:
            encoded = self.backend.encode(collate([s.src for _, s in arrivals], self.cfg.pad))
        except Exception as e:  # the backend's: name the sentences it was encoding
            raise DecodeError([key for key, _ in arrivals], e) from e
        by_group: dict[int, list[int]] = {}
        for i, (_, sentence) in enumerate(arrivals):
            by_group.setdefault(sentence.options.beam, []).append(i)
        for group, which in by_group.items():
            lane = self._lanes.get(group) or self._lanes.setdefault(group, _Lane(self, group))
            lane.admit([arrivals[i] for i in which], encoded, np.array(which))


def generate(
    backend: Backend,
    sources: Sequence[Sequence[int]] | np.ndarray,
    options: TranslateOptions | None = None,
    prefix: Sequence[int] = (),
    shortlist=None,
    **limits,
) -> list[list[Hypothesis]]:
    """Decode ``sources`` (id lists, or a left-padded [batch, src_len] array) with one set of
    options; per sentence its n-best hypotheses, best first. A loop over ``Engine``."""
    options = options or TranslateOptions()
    pad = backend.cfg.pad
    if isinstance(sources, np.ndarray):
        sources = [tuple(int(t) for t in row if t != pad) for row in sources]
    engine = Engine(backend, shortlist=shortlist, **limits)
    for i, src in enumerate(sources):
        seed = None if options.seed is None else (options.seed, i)
        engine.add(i, Sentence(tuple(int(t) for t in src), options, tuple(prefix), seed))
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for event in engine.run():
        if isinstance(event, Finished):
            results[cast(int, event.key)] = event.hypotheses  # the keys added above: 0 .. len(sources) - 1
    return results
