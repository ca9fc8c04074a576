"""The two exported computations as modules: the torch backend runs exactly these, and the ONNX
exporter traces exactly these, so the PyTorch reference and the graphs cannot drift apart.
Interfaces (names, dtypes, symbolic shapes) are declared once in ``runtime/graphs.py``."""

from __future__ import annotations

import torch
import torch.nn as nn

from deltalm.config import ModelConfig
from deltalm.graphs import (
    RULES_MARGIN,
    GraphSpec,
    cache_names,
    cross_names,
    decoder_step_shortlist_spec,
    decoder_step_spec,
    encoder_spec,
)

NEG_INF = float("-inf")


def _per_row(rule: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row rule [N] broadcast against [N, T, X]."""
    return rule.reshape(-1, *([1] * (like.dim() - 1)))


def apply_rules(
    log_probs: torch.Tensor,
    cfg: ModelConfig,
    forced_tokens: torch.Tensor,
    ban_eos: torch.Tensor,
    only_eos: torch.Tensor,
    unk_penalty: torch.Tensor,
) -> torch.Tensor:
    """fairseq's per-step edits of the full log-probs [N, T, V], each rule per row [N] (reference
    for ``topk_with_rules``; mirrors ``runtime/search.py:apply_rules``)."""
    cols = torch.arange(cfg.vocab_size, dtype=torch.int64, device=log_probs.device)
    is_eos = cols == cfg.eos
    lp = log_probs.masked_fill(torch.isnan(log_probs), NEG_INF)
    lp = lp.masked_fill(cols == cfg.pad, NEG_INF)
    lp = torch.where(cols == cfg.unk, lp - _per_row(unk_penalty, lp).to(lp.dtype), lp)
    lp = lp.masked_fill(_per_row(only_eos, lp) & ~is_eos, NEG_INF)
    forced = _per_row(forced_tokens, lp)
    lp = lp.masked_fill((forced >= 0) & (cols != forced), NEG_INF)
    return lp.masked_fill(_per_row(ban_eos, lp) & is_eos, NEG_INF)


def topk_with_rules(
    logits: torch.Tensor,
    lse: torch.Tensor,
    k: int,
    cfg: ModelConfig,
    forced_tokens: torch.Tensor,
    ban_eos: torch.Tensor,
    only_eos: torch.Tensor,
    unk_penalty: torch.Tensor,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``apply_rules(logits - lse, ...)`` without building the [N, T, V] log-probs: a
    row's order is the same on its logits, so the raw top-(k + RULES_MARGIN) of the logits is
    taken, ``lse`` (the row's log-sum-exp) subtracted from those only, and the rules applied there
    (they change at most RULES_MARGIN columns: pad and eos can only drop out, unk can only fall);
    rows with a forced token or with only eos allowed have exactly one finite entry, read by a
    gather. logits [N, T, V] float32, lse [N, T, 1], rules per row [N] -> scores [N, T, k], ids
    [N, T, k].

    ``columns`` [C] (a vocabulary shortlist): logits is [N, T, C], column j for token
    ``columns[j]``; at least k + RULES_MARGIN columns; a forced token or eos missing from them
    scores -inf."""
    wide = min(k + RULES_MARGIN, logits.shape[-1])
    vals, ids = torch.topk(logits, wide, dim=-1)
    vals = vals - lse
    if columns is not None:
        ids = columns[ids]
    penalty, ban, only = _per_row(unk_penalty, vals), _per_row(ban_eos, vals), _per_row(only_eos, vals)
    vals = vals.masked_fill(torch.isnan(vals), NEG_INF)
    vals = vals.masked_fill(ids == cfg.pad, NEG_INF)
    vals = torch.where(ids == cfg.unk, vals - penalty, vals)
    vals = vals.masked_fill(ban & (ids == cfg.eos), NEG_INF)
    # rows with exactly one allowed token: the forced prefix token, or eos at max_len
    forced = _per_row(forced_tokens, vals).expand(-1, vals.shape[1], 1)  # [N, T, 1]
    has_forced = forced >= 0
    single_id = torch.where(has_forced, forced, torch.full_like(forced, cfg.eos))
    single = _scores_of(logits, lse, single_id, columns)
    single = torch.where(single_id == cfg.unk, single - penalty, single)
    # (the search never combines these rules so; kept equal to apply_rules anyway)
    single = single.masked_fill(
        torch.isnan(single) | (only & (single_id != cfg.eos)) | (ban & (single_id == cfg.eos)), NEG_INF
    )
    is_single = has_forced | only
    first = torch.arange(wide, device=logits.device) == 0
    vals = torch.where(is_single, torch.where(first, single, torch.full_like(vals, NEG_INF)), vals)
    ids = torch.where(is_single & first, single_id, ids)
    scores, order = torch.topk(vals, k, dim=-1)
    return scores, ids.gather(-1, order)


def _scores_of(
    logits: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, columns: torch.Tensor | None
) -> torch.Tensor:
    """Raw log-probs of token ``ids`` [N, T, M] from logits [N, T, V] (or [N, T, C] over the
    shortlist ``columns``: an id that is not a candidate scores -inf)."""
    if columns is None:
        return logits.gather(-1, ids) - lse
    match = columns == ids.unsqueeze(-1)  # [N, T, M, C]
    found = logits.gather(-1, match.to(torch.int64).argmax(dim=-1)) - lse
    return found.masked_fill(~match.any(dim=-1), NEG_INF)


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
    """The decoder on new tokens of many rows, each at its own position, with the search rules
    and the top-k in the graph (``decoder_step_spec``). ``forward`` takes the inputs positionally
    in the order of the spec (as the ONNX exporter passes them) and reads them by name from there
    on; build them by name with ``inputs(feeds)``. Outputs in the order of the spec.

    The [rows, vocabulary] tensors are what a step costs in memory: the logits are built once, the
    top-k and the scored ids read them with the row's log-sum-exp, and the log-probs are only built
    when ``want_log_probs`` (their vocabulary axis is 0 otherwise)."""

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
        layers = range(self.cfg.decoder_layers)
        cache = [tuple(f[name] for name in cache_names(i)) for i in layers]
        cross = [tuple(f[name] for name in cross_names(i)) for i in layers]
        candidates = f.get("candidates")
        tokens = f["tokens"]
        hidden, new = self.model.decoder.step(tokens, f["positions"], cache, cross, f["src_padding"])
        n, t = tokens.shape
        # the projection on [N * T, D]: a 2-D Gemm on the table itself once exported (onnx_export)
        logits = self.model.decoder.project(hidden.reshape(n * t, -1), candidates).float().reshape(n, t, -1)
        peak = logits.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        lse = peak + torch.log(torch.exp(logits - peak).sum(dim=-1, keepdim=True))
        scores, ids = topk_with_rules(
            logits, lse, self.k, self.cfg, f["forced_tokens"], f["ban_eos"], f["only_eos"], f["unk_penalty"], candidates
        )
        token_scores = _scores_of(logits, lse, f["score_ids"], candidates)
        width = f["want_log_probs"].to(torch.int64).reshape(1) * logits.shape[-1]  # all columns, or none
        log_probs = logits[:, :, :width] - lse
        outs = [scores, ids, token_scores, log_probs]
        for k, v in new:
            outs += [k, v]
        return tuple(outs)
