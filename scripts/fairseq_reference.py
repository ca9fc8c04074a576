"""Cross-check our search loop against fairseq's own SequenceGenerator (opt-in; needs fairseq).

fairseq runs the PyTorch DeltaLM through a thin FairseqEncoderDecoderModel adapter that recomputes
the whole (teacher-forced) decoder at every step, so it shares no search code and no cache code
with us; our side runs ``deltalm.search.generate`` over the cached ``TorchBackend``. Both must give
the same n-best token ids, scores and positional scores.

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

from deltalm.export.model import DeltaLM  # noqa: E402
from deltalm.export.torch_backend import TorchBackend  # noqa: E402
from deltalm.config import ModelConfig  # noqa: E402
from deltalm.options import TranslateOptions  # noqa: E402
from deltalm.search import generate  # noqa: E402


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
            src[r, width - n:] = np.concatenate([rng.integers(4, 60, size=n - 1), [2]])
        for case in CASES:
            prefix_tokens = case.get("prefix_tokens", [])
            opts = TranslateOptions(nbest=case["beam"], max_len_b=case.get("max_len_b", 12),
                                    **{k: v for k, v in case.items() if k not in ("max_len_b", "prefix_tokens")})
            gen = SequenceGenerator([adapter], d, beam_size=opts.beam, max_len_a=opts.max_len_a, max_len_b=opts.max_len_b,
                                    min_len=opts.min_len, len_penalty=opts.lenpen, unk_penalty=opts.unkpen,
                                    no_repeat_ngram_size=opts.no_repeat_ngram_size)
            # fairseq decodes each sentence alone (our contract: a sentence's result does not depend on
            # its batch; fairseq's max_len_a uses the padded width of its batch), we the whole batch
            ref = []
            for r, n in enumerate(lengths):
                sample = {"net_input": {"src_tokens": torch.from_numpy(src[r:r + 1, width - n:]), "src_lengths": torch.tensor([n])}}
                prefix = torch.tensor([prefix_tokens]) if prefix_tokens else None
                with torch.no_grad():
                    ref += gen.generate([adapter], sample, prefix_tokens=prefix)
            ours = generate(backend, src, opts, prefix=prefix_tokens)
            for s in range(len(lengths)):
                want = [(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in ref[s]]
                got = [(h.tokens, h.score, h.positional_scores) for h in ours[s]]
                ok = [w[0] for w in want] == [g[0] for g in got] and all(
                    abs(w[1] - g[1]) < 1e-4 and np.allclose(w[2], g[2], atol=1e-4) for w, g in zip(want, got))
                failures += not ok
                print(json.dumps({"seed": seed, "case": case, "sentence": s, "ok": ok,
                                  **({} if ok else {"fairseq": want[:2], "ours": got[:2]})}))
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
