"""The two exported computations as modules: the torch backend runs exactly these, and the ONNX
exporter traces exactly these, so the PyTorch reference and the graphs cannot drift apart.
Interfaces (names, dtypes, symbolic shapes) are declared once in ``runtime/graphs.py``."""
from __future__ import annotations

import torch
import torch.nn as nn

from deltalm.config import ModelConfig
from deltalm.graphs import GraphSpec, cross_names, decoder_step_shortlist_spec, decoder_step_spec, encoder_spec, past_names

NEG_INF = float("-inf")


def apply_rules(
    log_probs: torch.Tensor,
    cfg: ModelConfig,
    forced_tokens: torch.Tensor,
    ban_eos: torch.Tensor,
    only_eos: torch.Tensor,
    unk_penalty: torch.Tensor,
) -> torch.Tensor:
    """fairseq's per-step edits of the full log-probs [rows, V] (reference for ``topk_with_rules``;
    mirrors ``runtime/search.py:apply_rules``)."""
    cols = torch.arange(cfg.vocab_size, dtype=torch.int64, device=log_probs.device)
    is_eos = (cols == cfg.eos).unsqueeze(0)
    lp = log_probs.masked_fill(torch.isnan(log_probs), NEG_INF)
    lp = lp.masked_fill((cols == cfg.pad).unsqueeze(0), NEG_INF)
    lp = torch.where((cols == cfg.unk).unsqueeze(0), lp - unk_penalty.to(lp.dtype), lp)
    lp = lp.masked_fill(only_eos & ~is_eos, NEG_INF)
    forced = forced_tokens.unsqueeze(1)
    lp = lp.masked_fill((forced >= 0) & (cols.unsqueeze(0) != forced), NEG_INF)
    return lp.masked_fill(ban_eos & is_eos, NEG_INF)


def topk_with_rules(
    log_probs: torch.Tensor,
    k: int,
    cfg: ModelConfig,
    forced_tokens: torch.Tensor,
    ban_eos: torch.Tensor,
    only_eos: torch.Tensor,
    unk_penalty: torch.Tensor,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``apply_rules(log_probs, ...)`` without touching the full [rows, V] tensor more
    than the top-k itself does: the rules change at most three columns (pad and eos can only drop
    out, unk can only fall), so the ruled top-k lies within the raw top-(k + 3), where the rules are
    applied; rows with a forced token or with only eos allowed have exactly one finite entry, read
    by a gather. log_probs [rows, V] float32 -> scores [rows, k], ids [rows, k].

    ``columns`` [C] (a vocabulary shortlist): log_probs is [rows, C], column j for token
    ``columns[j]``; at least k + 3 columns; a forced token or eos missing from them scores -inf."""
    wide = min(k + 3, cfg.vocab_size)
    vals, ids = torch.topk(log_probs, wide, dim=-1)
    if columns is not None:
        ids = columns[ids]
    vals = vals.masked_fill(torch.isnan(vals), NEG_INF)
    vals = vals.masked_fill(ids == cfg.pad, NEG_INF)
    vals = torch.where(ids == cfg.unk, vals - unk_penalty, vals)
    vals = vals.masked_fill(ban_eos & (ids == cfg.eos), NEG_INF)
    # rows with exactly one allowed token: the forced prefix token, or eos at max_len
    forced = forced_tokens.unsqueeze(1)
    has_forced = forced >= 0
    single_id = torch.where(has_forced, forced, torch.full_like(forced, cfg.eos))
    if columns is None:
        single = log_probs.gather(1, single_id)
    else:  # the column holding single_id, if any
        match = columns.unsqueeze(0) == single_id
        single = log_probs.gather(1, match.to(torch.int64).argmax(dim=1, keepdim=True))
        single = single.masked_fill(~match.any(dim=1, keepdim=True), NEG_INF)
    single = torch.where(single_id == cfg.unk, single - unk_penalty, single)
    # (the search never combines these rules so; kept equal to apply_rules anyway)
    single = single.masked_fill(
        torch.isnan(single) | (only_eos & (single_id != cfg.eos)) | (ban_eos & (single_id == cfg.eos)), NEG_INF
    )
    is_single = has_forced | only_eos
    first = (torch.arange(wide, device=log_probs.device) == 0).unsqueeze(0)
    vals = torch.where(is_single, torch.where(first, single, torch.full_like(vals, NEG_INF)), vals)
    ids = torch.where(is_single & first, single_id, ids)
    scores, order = torch.topk(vals, k, dim=-1)
    return scores, ids.gather(1, order)


class EncoderGraph(nn.Module):
    """src_tokens [batch, src_len] -> outputs of ``encoder_spec(cfg)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cfg: ModelConfig = model.cfg

    def spec(self, float_dtype: str = "float32") -> GraphSpec:
        return encoder_spec(self.cfg, float_dtype)

    def forward(self, src_tokens: torch.Tensor):
        if self.cfg.is_encoder_decoder:
            enc, _ = self.model.encoder(src_tokens)
            outs = [enc]
            for k, v in self.model.decoder.cross_kv(enc):
                outs += [k, v]
            return tuple(outs)
        hidden, logits = self.model(src_tokens)
        return (hidden,) if logits is None else (hidden, logits.float())


class DecoderStepGraph(nn.Module):
    """One decoder step with in-graph beam reorder, sentence selection, rules and top-k.
    ``forward`` takes the inputs positionally in the order of ``decoder_step_spec(cfg, k)`` (as
    the ONNX exporter passes them) and reads them by name from there on; build them by name with
    ``inputs(feeds)``. Outputs in the order of the spec."""

    def __init__(self, model: nn.Module, k: int, shortlist: bool = False):
        super().__init__()
        if not model.cfg.is_encoder_decoder:
            raise ValueError("encoder-only models have no decoder step")
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.k = min(k, self.cfg.vocab_size)
        self.shortlist = shortlist
        self.input_names = self.spec().input_names

    def spec(self, float_dtype: str = "float32") -> GraphSpec:
        make = decoder_step_shortlist_spec if self.shortlist else decoder_step_spec
        return make(self.cfg, self.k, float_dtype)

    def inputs(self, feeds: dict) -> tuple:
        """``feeds`` (input name -> tensor) as the positional arguments of ``forward``."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = sorted(set(feeds) - set(self.input_names))
        if missing or extra:
            raise ValueError(f"{self.spec().name} feeds: missing {missing}, unknown {extra}")
        return tuple(feeds[n] for n in self.input_names)

    def forward(self, *inputs):
        f = dict(zip(self.input_names, inputs, strict=True))
        reorder, sent_index = f["reorder"], f["sent_index"]
        layers = range(self.cfg.decoder_layers)
        past = [tuple(f[name].index_select(0, reorder) for name in past_names(i)) for i in layers]
        cross = [tuple(f[name].index_select(0, sent_index) for name in cross_names(i)) for i in layers]
        padding = f["src_padding"].index_select(0, sent_index)
        candidates = f.get("candidates")
        logits, present = self.model.decoder.step(f["tokens"], f["step"], past, cross, padding, candidates)
        # LogSoftmax is one fused kernel in ONNX Runtime (ReduceLogSumExp + Sub was 9x slower)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scores, ids = topk_with_rules(log_probs, self.k, self.cfg, f["forced_tokens"], f["ban_eos"], f["only_eos"],
                                      f["unk_penalty"], candidates)
        outs = [scores, ids, log_probs]
        for k, v in present:
            outs += [k, v]
        return tuple(outs)
