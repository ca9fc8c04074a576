"""The search engine against fairseq SequenceGenerator semantics (fairseq's search and generator
code), and continuous batching: a sentence's result whatever joins or leaves the batch around it."""

import itertools

import numpy as np
import pytest

from deltalm.errors import InputError
from deltalm.options import TranslateOptions as Options
from deltalm.search import (
    Engine,
    Finished,
    Partial,
    Sentence,
    StepRules,
    apply_rules,
    block_repeated_ngrams,
    generate,
    sentence_rules,
)

EOS, PAD, UNK = 2, 1, 3


def step_rules(opts, step, max_len, rows, prefix=()):
    forced, ban, only = sentence_rules(opts, prefix, step, max_len)
    return StepRules(
        np.full(rows, forced), np.full(rows, ban), np.full(rows, only), np.full(rows, opts.unkpen, np.float32)
    )


def reference_beam(model, sent, opts, src_len):
    """fairseq's beam search for one sentence, written plainly from the specification: lists,
    no vectorization, no top-k shortcut."""
    V = model.cfg.vocab_size
    beam = opts.beam
    max_len = min(int(opts.max_len_a * src_len + opts.max_len_b), model.cfg.max_positions - 1)
    hyps = [((EOS,), [])] * beam  # (fed tokens incl. leading eos, cumulative scores)
    final = []
    for step in range(max_len + 1):
        cands = []
        for b, (toks, cum) in enumerate(hyps if step > 0 else hyps[:1]):
            lp = model.log_probs(sent, toks).astype(np.float32)
            rules = step_rules(opts, step, max_len, 1)
            lp = apply_rules(lp[None], rules, PAD, UNK, EOS)[0]
            prev = cum[-1] if cum else np.float32(0)
            for t in range(V):
                cands.append((np.float32(prev + lp[t]), b * V + t, b, t))
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[: min(2 * beam, len(cands) - 1)]
        for score, _, b, t in cands[:beam]:
            if t == EOS and score != -np.inf and len(final) < beam:
                toks, cum = hyps[b]
                cum = cum + [score]
                pos = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, len(cum))]
                final.append((list(toks[1:]) + [EOS], float(score / np.float32((step + 1) ** opts.lenpen)), pos))
        if len(final) >= beam or step == max_len:
            break
        nxt = [c for c in cands if not (c[3] == EOS and c[0] != -np.inf)][:beam]
        hyps = [(hyps[b][0] + (t,), hyps[b][1] + [s]) for s, _, b, t in nxt]
    return sorted(final, key=lambda h: -h[1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beam", [1, 2, 5])
def test_beam_search_matches_plain_reference(fake_backend, seed, beam):
    model = fake_backend(vocab=9, seed=seed)
    opts = Options(beam=beam, nbest=beam, max_len_b=6, min_len=2, lenpen=0.8, unkpen=0.3)
    sources = [(5, 2), (4, 5, 2), (2,)]
    out = generate(model, sources, opts)
    for s, src in enumerate(sources):
        ref = reference_beam(model, src, opts, len(src))
        assert [h.tokens for h in out[s]] == [r[0] for r in ref]
        np.testing.assert_allclose([h.score for h in out[s]], [r[1] for r in ref], rtol=1e-6)
        for h, r in zip(out[s], ref):
            np.testing.assert_allclose(h.positional_scores, r[2], rtol=1e-5, atol=1e-6)


def test_topk_path_equals_full_log_probs_path(fake_backend):
    src = np.array([[4, 5, 2], [1, 6, 2]])
    opts = Options(beam=4, nbest=4, max_len_b=7, lenpen=1.3, unkpen=0.5)
    full = generate(fake_backend(vocab=11, seed=3, topk=0), src, opts)
    fast = generate(fake_backend(vocab=11, seed=3, topk=8), src, opts)
    assert [[h.tokens for h in s] for s in full] == [[h.tokens for h in s] for s in fast]
    assert [[h.score for h in s] for s in full] == [[h.score for h in s] for s in fast]


def exhaustive(model, sent, opts, max_len, free):
    """Every sequence over the free tokens the rules allow, scored as fairseq scores finished
    hypotheses."""
    out = []
    for n in range(max(opts.min_len, 0), max_len + 1):
        for body in itertools.product(free, repeat=n):
            seq = list(body) + [EOS]
            total, hist = np.float32(0), (EOS,)
            for t in seq:
                total = np.float32(total + model.log_probs(sent, hist)[t])
                hist = hist + (t,)
            out.append((seq, float(total / np.float32(len(seq) ** opts.lenpen))))
    return sorted(out, key=lambda x: -x[1])


def test_beam_search_equals_exhaustive_search_when_the_beam_holds_every_hypothesis(fake_backend):
    # only tokens 4, 5 and eos have finite log-probs: 2 + 4 + 8 = 14 sequences of 1..3 tokens,
    # at most 12 finite candidates per step, so a beam of 14 keeps every one of them
    model = fake_backend(vocab=16, seed=11)
    base = model.log_probs
    allowed = np.isin(np.arange(16), [4, 5, EOS])
    model.log_probs = lambda s, h: np.where(allowed, base(s, h), -np.inf).astype(np.float32)
    for lenpen in (0.5, 1.0, 1.5):
        opts = Options(beam=14, nbest=14, max_len_b=3, min_len=1, lenpen=lenpen)
        out = generate(model, np.array([[4, 2]]), opts)[0]
        ref = exhaustive(model, (4, 2), opts, max_len=3, free=[4, 5])
        assert len(ref) == 14
        assert [h.tokens for h in out] == [r[0] for r in ref]
        np.testing.assert_allclose([h.score for h in out], [r[1] for r in ref], rtol=1e-6)


def test_min_len_forbids_early_eos(fake_backend):
    opts = Options(beam=3, nbest=3, max_len_b=8, min_len=4)
    for h in generate(fake_backend(vocab=7, seed=2), np.array([[4, 2]]), opts)[0]:
        assert len(h.tokens) >= 5 and h.tokens.count(EOS) == 1


def test_max_len_forces_eos(fake_backend):
    # with eos made very unlikely, every hypothesis runs to max_len tokens + eos
    model = fake_backend(vocab=7, seed=5)
    base = model.log_probs
    model.log_probs = lambda s, h: np.where(np.arange(7) == EOS, -30.0, base(s, h)).astype(np.float32)
    opts = Options(beam=2, nbest=2, max_len_a=1.0, max_len_b=2)  # 3 source tokens -> max_len 5
    for h in generate(model, np.array([[4, 5, 2]]), opts)[0]:
        assert len(h.tokens) == 6 and h.tokens[-1] == EOS


def test_max_len_is_capped_by_positions(fake_backend):
    model = fake_backend(vocab=7, seed=5, max_positions=6)
    base = model.log_probs
    model.log_probs = lambda s, h: np.where(np.arange(7) == EOS, -30.0, base(s, h)).astype(np.float32)
    h = generate(model, np.array([[4, 2]]), Options(beam=1, max_len_b=200))[0][0]
    assert len(h.tokens) == 6  # max_len = 6 - 1 = 5 tokens, then eos


def test_lenpen_normalizes_by_length_power(fake_backend):
    for lenpen in (0.0, 1.0, 2.0):
        for h in generate(
            fake_backend(vocab=8, seed=1), np.array([[4, 2]]), Options(beam=3, nbest=3, max_len_b=6, lenpen=lenpen)
        )[0]:
            raw = np.float32(sum(np.float32(x) for x in h.positional_scores))
            assert h.score == pytest.approx(raw / len(h.tokens) ** lenpen, rel=1e-5)


def test_unkpen_lowers_unk_score(fake_backend):
    model = fake_backend(vocab=6, seed=4)
    base = model.log_probs
    model.log_probs = lambda s, h: (
        np.where(np.arange(6) == UNK, 0.0, -5.0).astype(np.float32) if len(h) == 1 else base(s, h)
    )
    with_unk = generate(model, np.array([[4, 2]]), Options(beam=1, max_len_b=3))[0][0]
    assert with_unk.tokens[0] == UNK
    without = generate(model, np.array([[4, 2]]), Options(beam=1, max_len_b=3, unkpen=10.0))[0][0]
    assert without.tokens[0] != UNK


def test_step_zero_expands_only_the_first_beam(fake_backend):
    # all beams are fed the same start token; if step 0 expanded every beam, the top candidates
    # would be duplicates and the beams would hold the same prefix
    model = fake_backend(vocab=10, seed=8)
    out = generate(model, np.array([[4, 2]]), Options(beam=4, nbest=4, max_len_b=3))[0]
    assert len({tuple(h.tokens) for h in out}) == 4


def test_nbest_sorted_and_positional_scores_include_eos(fake_backend):
    out = generate(fake_backend(vocab=8, seed=6), np.array([[4, 2]]), Options(beam=5, nbest=5, max_len_b=5))[0]
    scores = [h.score for h in out]
    assert scores == sorted(scores, reverse=True)
    assert all(len(h.positional_scores) == len(h.tokens) for h in out)


def test_batch_and_padding_do_not_change_results(fake_backend):
    model = fake_backend(vocab=9, seed=9)
    opts = Options(beam=3, nbest=3, max_len_b=6)
    together = generate(model, np.array([[1, 1, 5, 2], [4, 6, 7, 2]]), opts)
    alone = generate(fake_backend(vocab=9, seed=9), np.array([[1, 1, 5, 2]]), opts)
    assert [h.tokens for h in together[0]] == [h.tokens for h in alone[0]]


def test_forced_target_prefix(fake_backend):
    opts = Options(beam=3, nbest=3, max_len_b=6)
    for h in generate(fake_backend(vocab=9, seed=2), np.array([[4, 2]]), opts, prefix=[7, 8])[0]:
        assert h.tokens[:2] == [7, 8]


def test_no_repeat_ngram_blocks_repeats():
    lp = np.zeros((1, 10), dtype=np.float32)
    history = np.array([[2, 5, 6, 7, 5]])  # "5 6" seen: after 5 the token 6 is banned for n=2
    block_repeated_ngrams(lp, history, 2, step=4)
    assert lp[0, 6] == -np.inf and np.isfinite(np.delete(lp[0], 6)).all()


def test_no_repeat_ngram_in_generation(fake_backend):
    out = generate(
        fake_backend(vocab=6, seed=1),
        np.array([[4, 2]]),
        Options(beam=2, max_len_b=12, min_len=12, no_repeat_ngram_size=2),
    )[0][0]
    grams = [tuple(out.tokens[i : i + 2]) for i in range(len(out.tokens) - 1)]
    assert len(grams) == len(set(grams))


def test_sampling_is_seeded_and_respects_topk(fake_backend):
    sources = [(4, 2), (5, 2)]
    src = sources
    opts = Options(beam=3, nbest=3, max_len_b=6, sampling=True, sampling_topk=2, seed=7)
    a = generate(fake_backend(vocab=12, seed=1), src, opts)
    b = generate(fake_backend(vocab=12, seed=1), src, opts)
    assert [[h.tokens for h in s] for s in a] == [[h.tokens for h in s] for s in b]
    model = fake_backend(vocab=12, seed=1)
    for s, hyps in enumerate(a):
        for h in hyps:
            hist = (EOS,)
            for step, (t, score) in enumerate(zip(h.tokens, h.positional_scores)):
                lp = apply_rules(model.log_probs(sources[s], hist)[None], step_rules(opts, step, 6, 1), PAD, UNK, EOS)[
                    0
                ]
                assert t in np.argsort(-lp, kind="stable")[:2]
                assert score == pytest.approx(lp[t], abs=1e-5)
                hist += (t,)


def test_sampling_topp_keeps_the_nucleus():
    from deltalm.search import sample_rows

    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], dtype=np.float32))
    ids, _ = sample_rows(lp, 400, Options(sampling=True, sampling_topp=0.7), np.random.default_rng(0))
    assert set(ids[0].tolist()) == {0, 1} and set(ids[1].tolist()) == {3, 2}  # 0.5 < 0.7, 0.8 >= 0.7: two


def test_sampling_topk_draws_from_the_k_best_of_each_row():
    from deltalm.search import sample_rows

    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32))
    ids, scores = sample_rows(lp, 300, Options(sampling=True, sampling_topk=2), np.random.default_rng(1))
    assert set(ids[0].tolist()) == {0, 1} and set(ids[1].tolist()) == {2, 3}
    np.testing.assert_array_equal(scores, np.take_along_axis(lp, ids, axis=1))


def test_bad_options_are_input_errors(fake_backend):
    for bad in (dict(beam=0), dict(nbest=3, beam=2), dict(temperature=0)):
        with pytest.raises(InputError):
            Options(**bad).validate()
    with pytest.raises(InputError, match="min_len"):
        generate(fake_backend(), np.array([[4, 2]]), Options(min_len=300, max_len_b=10))


# --- continuous batching ------------------------------------------------------------------------------


def _alone(model_factory, src, opts, prefix=()):
    return generate(model_factory(), [src], opts, prefix=prefix)[0]


def _same(got, want):
    assert [h.tokens for h in got] == [h.tokens for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.positional_scores, b.positional_scores, rtol=1e-6, atol=1e-7)


def test_continuous_batching_equals_decoding_alone(fake_backend):
    rng = np.random.default_rng(5)
    factory = lambda: fake_backend(vocab=11, seed=5)  # noqa: E731
    engine = Engine(factory(), max_rows=8)
    sentences, arrivals = {}, {}
    for k in range(12):
        src = tuple(rng.integers(4, 11, size=rng.integers(1, 6)).tolist()) + (EOS,)
        beam = int(rng.choice([1, 2, 3]))
        opts = Options(
            beam=beam,
            nbest=beam,
            min_len=int(rng.integers(0, 3)),
            max_len_b=int(rng.integers(3, 9)),
            lenpen=float(rng.choice([0.6, 1.0, 1.4])),
            unkpen=float(rng.choice([0.0, 0.5])),
        )
        sentences[k] = Sentence(src, opts, tuple(rng.integers(4, 11, size=rng.integers(0, 3)).tolist()))
        arrivals.setdefault(int(rng.integers(0, 10)), []).append(k)
    results, step = {}, 0
    while arrivals or not engine.idle:
        for k in arrivals.pop(step, []):
            engine.add(k, sentences[k])
        for event in engine.step():
            if isinstance(event, Finished):
                results[event.key] = event.hypotheses
        step += 1
    assert sorted(results) == list(range(12))
    for k, s in sentences.items():
        _same(results[k], _alone(factory, s.src, s.options, s.prefix))


def test_rows_of_one_step_are_at_different_positions(fake_backend):
    model = fake_backend(vocab=9, seed=1)
    engine = Engine(model)
    engine.add("a", Sentence((4, 5, EOS), Options(beam=1, min_len=6, max_len_b=6)))
    engine.step(), engine.step()
    engine.add("b", Sentence((6, EOS), Options(beam=1, min_len=6, max_len_b=6)))
    engine.step()
    assert model.calls[-1][0] == [2, 0]  # "a" at its third step, "b" at its first


def test_a_finished_sentence_leaves_the_batch_at_once(fake_backend):
    model = fake_backend(vocab=9, seed=1)
    engine = Engine(model)
    engine.add("short", Sentence((4, EOS), Options(beam=2, min_len=1, max_len_b=1)))
    engine.add("long", Sentence((5, EOS), Options(beam=2, min_len=6, max_len_b=6)))
    finished_at = {}
    for step in range(10):
        for event in engine.step():
            if isinstance(event, Finished):
                finished_at[event.key] = step
    assert finished_at == {"short": 1, "long": 6}
    rows = [c[1] for c in model.calls]
    assert rows == [4, 4] + [2] * 5  # two rows per sentence; after step 1 only "long"'s


def test_beams_of_different_sizes_run_in_their_own_lanes(fake_backend):
    model = fake_backend(vocab=9, seed=3)
    engine = Engine(model)
    engine.add(0, Sentence((4, EOS), Options(beam=1, min_len=3, max_len_b=3)))
    engine.add(1, Sentence((5, EOS), Options(beam=3, min_len=3, max_len_b=3)))
    engine.step()
    assert sorted(c[1] // c[2] for c in model.calls) == [1, 3]  # one step per group size


def test_cancelled_sentence_leaves_without_an_event(fake_backend):
    engine = Engine(fake_backend(vocab=9, seed=3))
    engine.add("a", Sentence((4, EOS), Options(beam=2, min_len=5, max_len_b=5)))
    engine.add("b", Sentence((5, EOS), Options(beam=2, min_len=5, max_len_b=5)))
    engine.add("c", Sentence((6, EOS), Options(beam=2)))
    engine.step()
    assert engine.cancel("a") and engine.cancel("c")  # one running, one still waiting
    assert not engine.cancel("nobody")
    events = list(engine.run())
    assert [e.key for e in events if isinstance(e, Finished)] == ["b"]


def test_budget_admits_sentences_as_rows_free_up(fake_backend):
    engine = Engine(fake_backend(vocab=9, seed=3), max_rows=4)
    for k in range(3):
        engine.add(k, Sentence((4 + k, EOS), Options(beam=2, min_len=2 + 2 * k, max_len_b=2 + 2 * k)))
    engine.step()
    assert (engine.live, engine.waiting) == (2, 1)
    done = [e.key for e in engine.run() if isinstance(e, Finished)]
    assert sorted(done) == [0, 1, 2]


def test_a_step_without_admission_lets_nobody_join(fake_backend):
    engine = Engine(fake_backend(vocab=9, seed=3))
    engine.add("a", Sentence((4, EOS), Options(beam=2, min_len=3, max_len_b=3)))
    engine.step()
    engine.add("b", Sentence((5, EOS), Options(beam=3, min_len=1, max_len_b=1)))
    engine.step(admit=False)
    assert (engine.live, engine.waiting, engine.admitted_last, engine.rows_last) == (1, 1, 0, 2)
    engine.step()
    assert (engine.live, engine.waiting, engine.admitted_last, engine.rows_last) == (2, 0, 1, 2 + 3)


def test_partial_events_report_the_best_live_hypothesis(fake_backend):
    engine = Engine(fake_backend(vocab=9, seed=4), partials=True)
    engine.add("x", Sentence((4, EOS), Options(beam=2, nbest=1, min_len=4, max_len_b=4)))
    events = list(engine.run())
    partials = [e.tokens for e in events if isinstance(e, Partial)]
    final = [e for e in events if isinstance(e, Finished)][0].hypotheses[0]
    assert [len(t) for t in partials] == [1, 2, 3, 4]
    assert partials[-1] == final.tokens[:-1]


def test_a_backends_limits_bound_each_step(fake_backend):
    """A TensorRT engine runs steps of at most its profile's rows and sentences: the engine admits
    no more, whatever the caller asked for."""
    from deltalm.backends import BatchLimits

    model = fake_backend(vocab=9, seed=2)
    model.limits = BatchLimits(rows=6, sentences=2)
    engine = Engine(model, max_rows=100)
    for k in range(5):
        engine.add(k, Sentence((4 + k, EOS), Options(beam=1, min_len=3, max_len_b=3)))
    done = [e.key for e in engine.run() if isinstance(e, Finished)]
    assert sorted(done) == list(range(5))
    assert max(sents for _, _, sents in model.calls) == 2


def test_a_backends_sentence_limit_bounds_each_encoder_run_across_beam_sizes(fake_backend):
    """Arrivals of different beam sizes join different lanes but are encoded in one run: that run
    too holds no more sentences than the backend's profile."""
    from deltalm.backends import BatchLimits

    model = fake_backend(vocab=9, seed=3)
    model.limits = BatchLimits(rows=40, sentences=2)
    encoded = []
    encode = model.encode
    model.encode = lambda src: (encoded.append(len(src)), encode(src))[1]
    engine = Engine(model, max_rows=100)
    for k in range(6):
        engine.add(k, Sentence((4 + k, EOS), Options(beam=1 + k % 2, min_len=2, max_len_b=2)))
    done = [e.key for e in engine.run() if isinstance(e, Finished)]
    assert sorted(done) == list(range(6))
    assert encoded and max(encoded) == 2 and sum(encoded) == 6
