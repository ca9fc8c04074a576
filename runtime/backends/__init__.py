"""Backends compute; the search loop (runtime/search.py) decides. A backend has:

    cfg: ModelConfig
    topk: int                      # k of its in-graph top-k (0: none)
    encode(src_tokens [batch, src_len] int64) -> state
        runs the encoder once; the state holds the cross K/V, the source padding and the
        self-attention caches (device-resident for GPU backends).
    step(state, tokens [rows], step, reorder [rows], sent_index [sents], rules, want)
        feeds one token per hypothesis (rows = sents * group, grouped by sentence); reorder
        says which row of the previous step each row continues (applied to the caches inside
        the backend); sent_index says which encoder row each live sentence is. Returns
        (scores [rows, k], ids [rows, k]) with the rules applied when want == "topk", or the raw
        float32 log-probs [rows, vocab] when want == "logprobs".

A backend opened for a vocabulary shortlist (ort, ``shortlist=True``) takes
``encode(src_tokens, candidates=ids)``: its steps then score only those token ids (ids returned
are token ids; the log-probs are -inf off the candidates). ``search.generate(..., shortlist)``
passes each batch's candidates.

``load_backend`` imports a backend only when asked for: the torch backend lives in export/
(it needs torch), the others here.
"""
from __future__ import annotations

from ..errors import InputError

BACKENDS = ("torch", "ort", "trt")


def load_backend(name: str, source, **options):
    """source: a checkpoint spec (torch) or an artifact directory (ort, trt)."""
    if name == "torch":
        from deltalm.export.torch_backend import TorchBackend

        return TorchBackend.from_source(source, **options)
    if name == "ort":
        from .ort import OrtBackend

        return OrtBackend.from_artifact(source, **options)
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend.from_artifact(source, **options)
    raise InputError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
