"""Decoding control: lexical constraints (fairseq's dynamic beam allocation), scoring given
translations, per-sentence target prefixes. Their semantics on small models; ``make test-fairseq``
compares ids and scores with fairseq itself (LexicallyConstrainedBeamSearch, SequenceScorer,
prefix_tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltalm.constraints import OrderedState, UnorderedState
from deltalm.errors import InputError, SentenceError
from deltalm.options import OptionError
from deltalm.options import TranslateOptions as Options
from deltalm.search import Engine, Finished, Sentence, generate

EOS = 2


def same_hypotheses(a, b) -> None:
    """Same ids; scores equal up to the float rounding of another batch."""
    assert [h.tokens for h in a] == [h.tokens for h in b]
    for x, y in zip(a, b):
        assert x.text == y.text and x.score == pytest.approx(y.score, abs=1e-4)
        np.testing.assert_allclose(x.positional_scores, y.positional_scores, atol=1e-4)


def contains(tokens, phrase) -> bool:
    return any(list(tokens[i : i + len(phrase)]) == list(phrase) for i in range(len(tokens) - len(phrase) + 1))


# --- constraint states (the expected values are what fairseq's token_generation_constraints gives) ---


def test_ordered_state_takes_the_constraints_in_order_with_anything_between():
    state = OrderedState.start([[5, 6], [7]])
    seen = []
    for token in [9, 5, 8, 5, 6, 4, 7, 3]:
        state = state.advance(token)
        seen.append((state.bank, sorted(state.next_tokens()), state.finished))
    assert seen == [
        (0, [5], False),  # not a constraint token: nothing
        (1, [6], False),  # the first token of the first constraint
        (0, [5], False),  # mid-constraint, another token: starts over
        (1, [6], False),
        (2, [5, 7], False),  # first constraint done: the next one, or a restart
        (2, [5, 7], False),  # anything between constraints
        (3, [5], True),
        (3, [5], True),
    ]  # finished: anything


def test_unordered_state_walks_a_trie_of_the_constraints():
    state = UnorderedState.start([[5, 6], [5, 7]])
    assert sorted(state.next_tokens()) == [5] and state.bank == 0
    a = state.advance(5)
    assert (sorted(a.next_tokens()), a.bank, a.completed_count, a.finished) == ([5, 6, 7], 1, 0, False)
    b = a.advance(6)
    assert (sorted(b.next_tokens()), b.bank, b.completed_count, b.finished) == ([5], 2, 1, False)
    c = b.advance(5)  # off the trie and in again: [5, 6] is kept as completed
    assert (sorted(c.next_tokens()), c.bank, c.completed_count, c.finished) == ([5, 6, 7], 3, 1, False)
    d = c.advance(7)
    assert (d.bank, d.completed_count, d.finished) == (4, 2, True)
    assert d.advance(9).finished
    x = a.advance(9)  # an unfinished path abandoned: forgotten
    assert (x.bank, x.completed_count) == (0, 0)


def test_a_repeated_constraint_must_appear_as_often():
    state = UnorderedState.start([[5], [5]])
    once = state.advance(5)
    assert (once.bank, once.completed_count, once.finished) == (1, 1, False)
    assert once.advance(5).finished


# --- constrained search ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["ordered", "unordered"])
@pytest.mark.parametrize("seed", range(4))
def test_every_hypothesis_contains_every_constraint(fake_backend, order, seed):
    model = fake_backend(vocab=12, seed=seed)
    constraints = ((7, 8), (10,))
    opts = Options(beam=4, nbest=4, max_len_b=10, constraint_order=order)
    engine = Engine(model)
    engine.add(0, Sentence((4, 5, EOS), opts, constraints=constraints))
    hyps = [e for e in engine.run() if isinstance(e, Finished)][0].hypotheses
    assert hyps  # (hypotheses that could not meet the constraints within max_len never finish: fewer than 4)
    for h in hyps:
        assert all(contains(h.tokens, c) for c in constraints), h.tokens
        if order == "ordered":
            first = next(i for i in range(len(h.tokens)) if h.tokens[i : i + 2] == [7, 8])
            assert 10 in h.tokens[first + 2 :]
    plain = generate(fake_backend(vocab=12, seed=seed), [(4, 5, EOS)], Options(beam=4, nbest=4, max_len_b=10))[0]
    assert [h.tokens for h in hyps] != [h.tokens for h in plain]  # the constraints changed the search


def test_constrained_search_is_the_same_from_the_top_k_as_from_the_full_log_probs(fake_backend):
    """The fast path (in-graph top-k plus the scores of the constraint tokens, fed as score_ids)
    against the full log-probs: the same candidates, so the same hypotheses."""
    sentences = [
        Sentence(
            (4, 5, EOS),
            Options(beam=3, nbest=3, max_len_b=9, constraint_order=order, lenpen=0.8),
            constraints=((7, 8), (10,)),
        )
        for order in ("ordered", "unordered")
    ]
    results = []
    for topk in (0, 8):
        engine = Engine(fake_backend(vocab=12, seed=3, topk=topk))
        for k, s in enumerate(sentences):
            engine.add(k, s)
        done = {e.key: e.hypotheses for e in engine.run() if isinstance(e, Finished)}
        results.append([[(h.tokens, h.score) for h in done[k]] for k in range(2)])
    assert results[0] == results[1]


def test_a_constrained_sentence_gets_its_result_alone_beside_others(fake_backend):
    constrained = Sentence((4, 5, EOS), Options(beam=3, nbest=3, max_len_b=9), constraints=((7,), (9, 10)))
    alone = Engine(fake_backend(vocab=12, seed=5))
    alone.add("c", constrained)
    want = [e for e in alone.run() if isinstance(e, Finished)][0].hypotheses
    engine = Engine(fake_backend(vocab=12, seed=5))
    engine.add("p", Sentence((6, EOS), Options(beam=3, min_len=7, max_len_b=7)))
    engine.step()
    engine.add("c", constrained)
    got = {e.key: e.hypotheses for e in engine.run() if isinstance(e, Finished)}["c"]
    assert [(h.tokens, h.score) for h in got] == [(h.tokens, h.score) for h in want]


def test_constraints_that_cannot_be_met_end_the_hypotheses_without_them(fake_backend):
    """fairseq's generator fails an assertion when no hypothesis meets its constraints by the
    maximum length; here they end there without them."""
    engine = Engine(fake_backend(vocab=12, seed=1))
    engine.add(0, Sentence((4, EOS), Options(beam=2, nbest=2, max_len_b=2), constraints=((7, 8, 9, 10),)))
    hyps = [e for e in engine.run() if isinstance(e, Finished)][0].hypotheses
    assert hyps and all(len(h.tokens) == 3 for h in hyps)


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(options=Options(sampling=True, beam=2)), "sampling cannot be combined with lexical constraints"),
        (dict(prefix=(7,)), "cannot be combined with a forced target prefix"),
        (dict(constraints=((),)), "a lexical constraint is empty"),
        (dict(constraints=((EOS,),)), "lexical constraint token 2 is not allowed"),
    ],
)
def test_combinations_fairseq_cannot_decode_are_refused(fake_backend, bad, error):
    fields = dict(src=(4, EOS), options=Options(beam=2), constraints=((7,),)) | bad
    with pytest.raises(InputError, match=error):
        Engine(fake_backend(vocab=12)).add(0, Sentence(**fields))


# --- through the Translator (the tiny artifact, ONNX Runtime) ------------------------------------------


@pytest.fixture(scope="module")
def translator(tiny):
    import deltalm

    with deltalm.Translator(tiny.artifact, threads=1) as t:
        yield t


def test_translate_batch_with_constraints_puts_each_sentences_terms_in_its_hypotheses(translator, tiny):
    from deltalm.export.toy_data import toy_corpus

    lines = [toy_corpus()[i] for i in (2, 17, 40)]
    terms = [[lines[0].split()[1]], [lines[1].split()[-1].rstrip("."), lines[1].split()[0]], None]
    out = translator.translate_batch(
        lines, beam=4, nbest=2, max_len_b=40, constraints=terms, constraint_order="unordered"
    )
    tok = translator.tokenizer
    for t, words in zip(out, terms):
        for h in t.hypotheses:
            for w in words or []:
                assert contains(h.tokens, tok.encode(w, [])[:-1]), (h.text, w)
    plain = translator.translate_batch(lines[2:], beam=4, nbest=2, max_len_b=40)
    same_hypotheses(out[2].hypotheses, plain[0].hypotheses)  # a sentence without constraints: as alone


def test_a_constraint_the_dictionary_cannot_spell_is_refused(translator):
    with pytest.raises(
        SentenceError, match="input line 2: the constraint '猫' has pieces the dictionary does not know"
    ):
        translator.translate_batch(["a", "b"], constraints=[None, ["猫"]])
    with pytest.raises(SentenceError, match="the constraint '' is empty"):
        translator.translate_batch(["a"], constraints=[[""]])
    with pytest.raises(InputError, match="constraints has 1 entries for 2 sentences"):
        translator.translate_batch(["a", "b"], constraints=[["x"]])


def test_target_prefix_per_sentence_is_forced_kept_in_tokens_and_scored(translator, tiny):
    from deltalm.export.toy_data import toy_corpus

    lines = [toy_corpus()[i] for i in (5, 6, 7)]
    prefixes = ["Der", None, lines[2].split()[0] + " " + lines[2].split()[1]]
    out = translator.translate_batch(lines, beam=3, nbest=3, max_len_b=40, target_prefix=prefixes)
    tok = translator.tokenizer
    for t, prefix in zip(out, prefixes):
        ids = tok.encode(prefix, [])[:-1] if prefix else []
        for h in t.hypotheses:
            assert h.tokens[: len(ids)] == ids
            assert h.text.startswith(prefix or "")
        # every token is scored as the model scores it, the forced ones included
        [scored] = translator.score_batch([lines[out.index(t)]], [t.text])
        assert scored.tokens == t.hypotheses[0].tokens
        np.testing.assert_allclose(scored.positional_scores, t.hypotheses[0].positional_scores, atol=1e-4)
    same_hypotheses(
        out[1].hypotheses, translator.translate_batch([lines[1]], beam=3, nbest=3, max_len_b=40)[0].hypotheses
    )


# --- scoring ---------------------------------------------------------------------------------------


def test_scores_are_the_models_log_probs_of_the_target_and_their_mean(translator, tiny):
    from deltalm.export.checkpoints import build_model, load_for_export
    from deltalm.export.model import DeltaLM  # noqa: F401  (the checkpoint's model, rebuilt)

    model = build_model(load_for_export(str(tiny.checkpoint), None, str(tiny.dict)))
    tok = translator.tokenizer
    sources = ["Die Katze sieht den roten Apfel.", "Ein Kind will frisches Brot.", "Hallo"]
    targets = ["The cat sees the red apple.", "Un niño quiere pan.", "Hallo Hallo Hallo Hallo"]
    scores = translator.score_batch(sources, targets, max_tokens=8)  # several decoder runs
    for s, src, tgt in zip(scores, sources, targets):
        ids = tok.encode(tgt, [])
        assert s.tokens == ids and s.tokens[-1] == EOS
        with torch.no_grad():
            lp = model(torch.tensor([tok.encode(src)]), torch.tensor([[EOS] + ids[:-1]]))[0]
        want = lp.gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(s.positional_scores, want, atol=1e-4)
        assert s.score == pytest.approx(float(np.mean(s.positional_scores)), abs=1e-6)
        assert s.to_dict() == {"id": s.index, "tokens": ids, "score": s.score, "positional_scores": s.positional_scores}
    assert [s.index for s in scores] == [0, 1, 2]


def test_scoring_errors_name_the_pair(translator):
    with pytest.raises(InputError, match="2 sources but 1 targets"):
        translator.score_batch(["a", "b"], ["x"])
    with pytest.raises(SentenceError, match="input line 2 has an empty target"):
        translator.score_batch(["a", "b"], ["x", " "])
    with pytest.raises(
        SentenceError, match=r"input line 1 has \d+ target tokens \(with </s>\); the model scores at most"
    ):
        translator.score_batch(["a"], ["ein " * 600])
    with pytest.raises(OptionError, match="max_tokens"):
        translator.score_batch(["a"], ["b"], max_tokens=0)


# --- the command line ----------------------------------------------------------------------------


def test_score_command_writes_one_record_per_line_pair(tiny, tmp_path):
    import json

    from cli_support import run_cli

    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("Die Katze sieht den roten Apfel.\nHallo\n", encoding="utf-8")
    tgt.write_text("Die Katze sieht den roten Apfel.\nHallo Welt\n", encoding="utf-8")
    res = run_cli(["score", tiny.artifact, "--source", src, "--target", tgt, "--format", "jsonl", "--threads", "1"])
    assert res.rc == 0, res.err
    records = [json.loads(line) for line in res.lines]
    assert [r["id"] for r in records] == [0, 1]
    for r in records:
        assert set(r) == {"id", "tokens", "score", "positional_scores"} and r["tokens"][-1] == EOS
        assert r["score"] == pytest.approx(sum(r["positional_scores"]) / len(r["tokens"]), abs=1e-5)
    text = run_cli(["score", tiny.artifact, "--source", src, "--target", tgt, "--threads", "1"])
    assert [float(x) for x in text.lines] == pytest.approx([r["score"] for r in records])
    tgt.write_text("only one line\n", encoding="utf-8")
    bad = run_cli(["score", tiny.artifact, "--source", src, "--target", tgt])
    assert bad.rc == 2 and "has 2 lines but --target" in bad.err


def test_translate_reads_constraints_after_tabs_and_prefixes_from_a_file(tiny, tmp_path):
    from cli_support import run_cli

    inp = tmp_path / "in.txt"
    inp.write_text("Ein Kind will frisches Brot.\tBrot\tKind\nDer Hund schläft.\n", encoding="utf-8")
    res = run_cli(
        [
            "translate",
            tiny.artifact,
            "--input",
            inp,
            "--constraints",
            "unordered",
            "--beam",
            "4",
            "--max-len-b",
            "30",
            "--threads",
            "1",
        ]
    )
    assert res.rc == 0, res.err
    assert len(res.lines) == 2 and "Brot" in res.lines[0] and "Kind" in res.lines[0]
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text("Der\n\n", encoding="utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text("Ein Kind will frisches Brot.\nDer Hund schläft.\n", encoding="utf-8")
    res = run_cli(
        [
            "translate",
            tiny.artifact,
            "--input",
            plain,
            "--target-prefix",
            prefixes,
            "--max-len-b",
            "30",
            "--threads",
            "1",
        ]
    )
    assert res.rc == 0, res.err
    assert res.lines[0].startswith("Der")
    both = run_cli(["translate", tiny.artifact, "--input", inp, "--constraints", "--target-prefix", prefixes])
    assert both.rc == 2 and "cannot be combined with a forced target prefix" in both.err
