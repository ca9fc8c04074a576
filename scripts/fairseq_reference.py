"""Cross-check our search engine and scorer against fairseq's own SequenceGenerator, its
LexicallyConstrainedBeamSearch and its SequenceScorer (opt-in; needs fairseq).

fairseq runs the PyTorch DeltaLM through a thin FairseqEncoderDecoderModel adapter that recomputes
the whole (teacher-forced) decoder at every step, so it shares no search code and no cache code
with us; our side runs ``deltalm.search.Engine`` over the cached ``TorchBackend``, all sentences of
a case in one continuous batch, while fairseq decodes each sentence alone. Both must give the same
n-best token ids, scores and positional scores: plain search options, per-sentence target
prefixes of different lengths, lexical constraints (ordered and unordered, with and without a
prefix), and scores of given targets.

Run: ``make test-fairseq`` (builds .venv-fairseq with fairseq-fixed 0.12.3.1, ~5 min once).
Prints one JSON line per case and exits non-zero on any mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from deltalm.config import ModelConfig  # noqa: E402
from deltalm.export.model import DeltaLM  # noqa: E402
from deltalm.export.torch_backend import TorchBackend  # noqa: E402
from deltalm.options import TranslateOptions  # noqa: E402
from deltalm.scoring import score_pairs  # noqa: E402
from deltalm.search import Engine, Finished, Sentence, generate  # noqa: E402


class _Encoder(FairseqEncoder):
    def __init__(self, dictionary, model):
        super().__init__(dictionary)
        self.m = model

    def forward(self, src_tokens, src_lengths=None, **_):
        enc, pad = self.m.encoder(src_tokens)
        return {"encoder_out": [enc], "encoder_padding_mask": [pad]}

    def forward_torchscript(self, net_input):
        return self.forward(net_input["src_tokens"])

    def reorder_encoder_out(self, encoder_out, new_order):
        return {k: [v[0].index_select(0, new_order)] for k, v in encoder_out.items()}

    def max_positions(self):
        return self.m.cfg.max_positions


class _Decoder(FairseqIncrementalDecoder):
    """No cache: every call re-runs the teacher-forced decoder over all previous tokens."""

    def __init__(self, dictionary, model):
        super().__init__(dictionary)
        self.m = model

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **_):
        enc, pad = encoder_out["encoder_out"][0], encoder_out["encoder_padding_mask"][0]
        x = self.m.decoder(prev_output_tokens, self.m.decoder.cross_kv(enc), pad)
        logits = self.m.decoder.project(x)
        if incremental_state is not None:
            logits = logits[:, -1:]
        return logits, {"attn": [None], "inner_states": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        pass

    def max_positions(self):
        return self.m.cfg.max_positions

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0].float(), dim=-1)


class Adapter(FairseqEncoderDecoderModel):
    pass


def _patch_ngram_blocker():
    """fairseq 0.12's CPU n-gram blocker receives the whole token buffer (pads past ``step``
    included) and so never blocks anything (fairseq issues #4709, #5206); its CUDA extension
    blocks correctly. We implement the intended (CUDA) behaviour, so compare against the Python
    path fed ``tokens[:, : step + 1]`` as #4709 proposes."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    original = NGramRepeatBlock.forward

    def forward(self, tokens, lprobs, bsz, beam_size, step):
        return original(self, tokens[:, : step + 1], lprobs, bsz, beam_size, step)

    NGramRepeatBlock.forward = forward


def build(seed: int, vocab: int):
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=vocab)
    torch.manual_seed(seed)
    model = DeltaLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.35)
    model.eval()
    d = Dictionary()
    while len(d) < vocab:
        d.add_symbol(f"w{len(d)}")
    return model, Adapter(_Encoder(d, model), _Decoder(d, model)).eval(), d


CASES = [
    dict(beam=1),
    dict(beam=5),
    dict(beam=5, lenpen=0.6),
    dict(beam=4, lenpen=1.7, min_len=6),
    dict(beam=3, max_len_a=0.5, max_len_b=3),
    dict(beam=5, unkpen=2.0),
    dict(beam=2, max_len_b=1),
    dict(beam=6, max_len_b=10, lenpen=0.0),
    dict(beam=4, prefix_tokens=[7, 9]),
    dict(beam=3, no_repeat_ngram_size=2, min_len=10),
    dict(beam=1, prefix_tokens=[5], min_len=3),
]


# decoding controls on a trained model (random models are full of near-ties that any two
# implementations order differently): the demo's copy model, on corpus sentences
CONSTRAINED = [
    dict(beam=4, order="ordered"),
    dict(beam=5, order="unordered", lenpen=0.7),
    dict(beam=3, order="ordered", min_len=4),
    dict(beam=6, order="unordered", min_len=3),
    dict(beam=4, order="unordered", repeat=True),  # a constraint token repeated: the trie counts matter
    dict(beam=5, order="ordered", swap=True),  # constraints from other sentences: hard to place
]


def compare(seed, case, s, want, got) -> bool:
    ok = [w[0] for w in want] == [g[0] for g in got] and all(
        abs(w[1] - g[1]) < 1e-4 and np.allclose(w[2], g[2], atol=1e-4) for w, g in zip(want, got)
    )
    print(
        json.dumps(
            {"seed": seed, "case": case, "sentence": s, "ok": ok, **({} if ok else {"fairseq": want, "ours": got})}
        )
    )
    return ok


def engine_results(backend, sentences, alone: bool = False) -> list:
    """Every sentence through one Engine (one continuous batch), or each through an Engine of its own."""
    if alone:
        return [engine_results(backend, [s])[0] for s in sentences]
    engine = Engine(backend)
    for k, sentence in enumerate(sentences):
        engine.add(k, sentence)
    out = {}
    for event in engine.run():
        if isinstance(event, Finished):
            out[event.key] = event.hypotheses
    return [[(h.tokens, h.score, h.positional_scores) for h in out[k]] for k in range(len(sentences))]


def fairseq_hyps(hyps) -> list:
    return [(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in hyps]


def trained_model():
    """The demo's tiny copy model (trained here, deterministic) and its tokenizer."""
    import tempfile

    from deltalm.export.toy_data import build_toy_tokenizer, toy_corpus
    from deltalm.export.toy_model import train_copy_model
    from deltalm.tokenizer import Tokenizer

    torch.set_num_threads(1)  # deterministic training
    work = Path(tempfile.mkdtemp(prefix="fairseq-reference-"))
    tok = Tokenizer(*build_toy_tokenizer(work))
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=len(tok))
    model = train_copy_model(tok, cfg, steps=300)
    d = Dictionary()
    while len(d) < cfg.vocab_size:
        d.add_symbol(f"w{len(d)}")
    corpus = toy_corpus()
    return model, Adapter(_Encoder(d, model), _Decoder(d, model)).eval(), d, tok, corpus


def run_decoding_controls(model, adapter, d, tok, corpus) -> int:
    from fairseq import search
    from fairseq.token_generation_constraints import pack_constraints

    backend = TorchBackend(model, topk=16)
    lines = [corpus[i] for i in (0, 7, 42, 99, 150, 233)]
    sources = [tok.encode(line) for line in lines]
    words = [line.split() for line in lines]
    # target prefixes: the first tokens of the sentence's own translation (a copy), of another one, or none
    prefixes = [
        tok.encode(" ".join(words[0][:2]))[:-1],
        [],
        tok.encode(words[3][0])[:-1],
        tok.encode(" ".join(words[0][:3]))[:-1],
        [],
        tok.encode(words[2][-1])[:-1],
    ]
    own = [[tok.encode(w[1])[:-1], tok.encode(w[-1])[:-1]] for w in words]
    other = [[tok.encode(words[(k + 1) % len(words)][0])[:-1]] for k in range(len(words))]
    failures = 0
    for case in (dict(beam=4), dict(beam=3, min_len=5, lenpen=1.3), dict(beam=1), dict(beam=5, unkpen=1.0)):
        opts = TranslateOptions(nbest=case["beam"], max_len_b=30, **case)
        ours = engine_results(backend, [Sentence(tuple(src), opts, tuple(pre)) for src, pre in zip(sources, prefixes)])
        gen = SequenceGenerator(
            [adapter],
            d,
            beam_size=opts.beam,
            max_len_b=30,
            min_len=opts.min_len,
            len_penalty=opts.lenpen,
            unk_penalty=opts.unkpen,
        )
        for s, (src, pre) in enumerate(zip(sources, prefixes)):
            sample = {"net_input": {"src_tokens": torch.tensor([src]), "src_lengths": torch.tensor([len(src)])}}
            with torch.no_grad():
                ref = gen.generate([adapter], sample, prefix_tokens=torch.tensor([pre]) if pre else None)
            failures += not compare("trained", {"prefixes": True, **case}, s, fairseq_hyps(ref[0]), ours[s])
    for case in CONSTRAINED:
        opts = TranslateOptions(
            beam=case["beam"],
            nbest=case["beam"],
            max_len_b=30,
            min_len=case.get("min_len", 1),
            lenpen=case.get("lenpen", 1.0),
            constraint_order=case["order"],
        )
        constraints = other if case.get("swap") else own
        if case.get("repeat"):
            constraints = [c + [c[0]] for c in constraints]
        pre_of = [[] for _ in sources]  # with a forced prefix fairseq's DBA drops the forced tokens: we refuse it
        ours = engine_results(
            backend,
            [
                Sentence(tuple(src), opts, tuple(pre), constraints=tuple(tuple(c) for c in cs))
                for src, pre, cs in zip(sources, pre_of, constraints)
            ],
        )
        strategy = search.LexicallyConstrainedBeamSearch(d, case["order"])
        gen = SequenceGenerator(
            [adapter],
            d,
            beam_size=opts.beam,
            max_len_b=30,
            min_len=opts.min_len,
            len_penalty=opts.lenpen,
            search_strategy=strategy,
        )
        for s, (src, pre, cs) in enumerate(zip(sources, pre_of, constraints)):
            sample = {"net_input": {"src_tokens": torch.tensor([src]), "src_lengths": torch.tensor([len(src)])}}
            packed = pack_constraints([[torch.tensor(c) for c in cs]])
            try:
                with torch.no_grad():
                    ref = gen.generate(
                        [adapter], sample, prefix_tokens=torch.tensor([pre]) if pre else None, constraints=packed
                    )
            except AssertionError:  # no hypothesis met its constraints within max_len: fairseq stops there
                ok = len(ours[s]) > 0  # we end the hypotheses without them
                print(
                    json.dumps(
                        {
                            "seed": "trained",
                            "case": {"constraints": case},
                            "sentence": s,
                            "ok": ok,
                            "fairseq": "AssertionError (no hypothesis meets the constraints within max_len)",
                        }
                    )
                )
                failures += not ok
                continue
            failures += not compare("trained", {"constraints": case}, s, fairseq_hyps(ref[0]), ours[s])
            met = all(_contains(h[0], c) for h in ours[s] for c in cs)
            print(
                json.dumps({"case": {"constraints": case}, "sentence": s, "every_constraint_in_every_hypothesis": met})
            )
    return failures


def _contains(tokens, phrase) -> bool:
    return any(tokens[i : i + len(phrase)] == list(phrase) for i in range(len(tokens) - len(phrase) + 1))


def run_scoring(model, adapter, d, tok, corpus) -> int:
    from fairseq.sequence_scorer import SequenceScorer

    backend = TorchBackend(model, topk=16)
    lines = [corpus[i] for i in (3, 8, 55, 120, 301)]
    sources = [tok.encode(line) for line in lines]
    targets = [
        tok.encode(lines[0]),
        tok.encode(lines[2]),
        tok.encode("the"),
        tok.encode(lines[3] + " " + lines[4]),
        tok.encode(lines[4]),
    ]  # its own translation, another sentence, a word, two sentences
    ours = score_pairs(backend, sources, targets, max_tokens=40)  # several runs of padded targets
    scorer = SequenceScorer(d)
    failures = 0
    for s, (src, tgt) in enumerate(zip(sources, targets)):
        sample = {
            "net_input": {
                "src_tokens": torch.tensor([src]),
                "src_lengths": torch.tensor([len(src)]),
                "prev_output_tokens": torch.tensor([[2] + tgt[:-1]]),
            },
            "target": torch.tensor([tgt]),
        }
        with torch.no_grad():
            ref = scorer.generate([adapter], sample)[0][0]
        want = [(ref["tokens"].tolist(), float(ref["score"]), ref["positional_scores"].tolist())]
        mean = float(np.float32(np.sum(np.asarray(ours[s], np.float32), dtype=np.float32)) / np.float32(len(tgt)))
        failures += not compare("trained", {"score": True}, s, want, [(tgt, mean, ours[s])])
    return failures


def main() -> int:
    _patch_ngram_blocker()
    failures = 0
    for seed in range(3):
        model, adapter, d = build(seed, vocab=60)
        backend = TorchBackend(model, topk=16)
        rng = np.random.default_rng(seed)
        lengths = [7, 3, 12, 1 + seed]
        width = max(lengths)
        src = np.full((len(lengths), width), 1, dtype=np.int64)
        for r, n in enumerate(lengths):
            src[r, width - n :] = np.concatenate([rng.integers(4, 60, size=n - 1), [2]])
        for case in CASES:
            prefix_tokens = case.get("prefix_tokens", [])
            opts = TranslateOptions(
                nbest=case["beam"],
                max_len_b=case.get("max_len_b", 12),
                **{k: v for k, v in case.items() if k not in ("max_len_b", "prefix_tokens")},
            )
            gen = SequenceGenerator(
                [adapter],
                d,
                beam_size=opts.beam,
                max_len_a=opts.max_len_a,
                max_len_b=opts.max_len_b,
                min_len=opts.min_len,
                len_penalty=opts.lenpen,
                unk_penalty=opts.unkpen,
                no_repeat_ngram_size=opts.no_repeat_ngram_size,
            )
            # fairseq decodes each sentence alone (our contract: a sentence's result does not depend on
            # its batch; fairseq's max_len_a uses the padded width of its batch), we the whole batch
            ref = []
            for r, n in enumerate(lengths):
                sample = {
                    "net_input": {
                        "src_tokens": torch.from_numpy(src[r : r + 1, width - n :]),
                        "src_lengths": torch.tensor([n]),
                    }
                }
                prefix = torch.tensor([prefix_tokens]) if prefix_tokens else None
                with torch.no_grad():
                    ref += gen.generate([adapter], sample, prefix_tokens=prefix)
            ours = generate(backend, src, opts, prefix=prefix_tokens)
            for s in range(len(lengths)):
                want = [(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in ref[s]]
                got = [(h.tokens, h.score, h.positional_scores) for h in ours[s]]
                ok = [w[0] for w in want] == [g[0] for g in got] and all(
                    abs(w[1] - g[1]) < 1e-4 and np.allclose(w[2], g[2], atol=1e-4) for w, g in zip(want, got)
                )
                failures += not ok
                print(
                    json.dumps(
                        {
                            "seed": seed,
                            "case": case,
                            "sentence": s,
                            "ok": ok,
                            **({} if ok else {"fairseq": want, "ours": got}),
                        }
                    )
                )
    trained = trained_model()
    failures += run_decoding_controls(*trained)
    failures += run_scoring(*trained)
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
