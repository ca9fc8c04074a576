"""One declaration of each exported graph's interface.

Used by the exporter (input/output names, dynamic axes), the validator (shapes of every output),
the manifest (written as JSON) and the runtime backends (feed names). Pure data: no torch.

Symbolic axes: ``batch`` (sentences given to the encoder), ``src_len``, ``rows`` (live
hypotheses, grouped by sentence: ``rows = sents * group``), ``past_rows`` (rows of the previous
step), ``sents`` (live sentences), ``past_len`` and ``total_len`` (= past_len + 1), ``cands`` (the
vocabulary shortlist's candidate ids).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: int64, float32, float16, bool
    shape: tuple  # ints and symbolic axis names

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]))


def cross_names(i: int) -> tuple[str, str]:
    return f"cross_key_{i}", f"cross_value_{i}"


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_{i}", f"past_value_{i}"


def present_names(i: int) -> tuple[str, str]:
    return f"present_key_{i}", f"present_value_{i}"


def encoder_spec(cfg: ModelConfig, float_dtype: str = "float32") -> GraphSpec:
    """DeltaLM: src_tokens -> encoder_out and the cross-attention K/V of every decoder layer.
    Encoder-only models: src_tokens -> encoder_out (+ mlm_logits when the model has a head)."""
    h, hd = cfg.heads, cfg.head_dim
    outputs = [TensorSpec("encoder_out", float_dtype, ("batch", "src_len", cfg.embed_dim))]
    if cfg.is_encoder_decoder:
        for i in range(cfg.decoder_layers):
            for name in cross_names(i):
                outputs.append(TensorSpec(name, float_dtype, ("batch", h, "src_len", hd)))
    elif cfg.mlm_head:
        outputs.append(TensorSpec("mlm_logits", "float32", ("batch", "src_len", cfg.vocab_size)))
    return GraphSpec("encoder", (TensorSpec("src_tokens", "int64", ("batch", "src_len")),), tuple(outputs))


def decoder_step_spec(cfg: ModelConfig, k: int = 10, float_dtype: str = "float32") -> GraphSpec:
    """One new token per hypothesis; see ``export/graphs.py`` for the computation.

    Inputs: tokens [rows]; step [] (the token fed at step t sits at position t + first_position);
    reorder [rows] (row of the past each row continues: beam reorder and dropped sentences,
    applied to the past inside the graph); sent_index [sents] (row of the encoder batch for each
    live sentence, applied to cross K/V and src_padding inside the graph; rows = sents * group,
    grouped by sentence); src_padding [batch, src_len] bool; past K/V per layer
    [past_rows, heads, past_len, head_dim] (past_len 0 on the first step); cross K/V per layer;
    and the search rules that must hold before top-k: forced_tokens [rows] (-1: none), ban_eos [],
    only_eos [], unk_penalty [].

    Outputs: topk_scores / topk_ids [rows, k] (rules applied: the fast path, O(rows * k) to the
    host), log_probs [rows, vocab] float32 (raw, before the rules: for sampling, n-gram blocking
    and parity; fetched only when asked for) and present K/V per layer [rows, heads, total_len,
    head_dim]."""
    h, hd = cfg.heads, cfg.head_dim
    inputs = [
        TensorSpec("tokens", "int64", ("rows",)),
        TensorSpec("step", "int64", ()),
        TensorSpec("reorder", "int64", ("rows",)),
        TensorSpec("sent_index", "int64", ("sents",)),
        TensorSpec("src_padding", "bool", ("batch", "src_len")),
    ]
    for i in range(cfg.decoder_layers):
        for name in past_names(i):
            inputs.append(TensorSpec(name, float_dtype, ("past_rows", h, "past_len", hd)))
    for i in range(cfg.decoder_layers):
        for name in cross_names(i):
            inputs.append(TensorSpec(name, float_dtype, ("batch", h, "src_len", hd)))
    inputs += [
        TensorSpec("forced_tokens", "int64", ("rows",)),
        TensorSpec("ban_eos", "bool", ()),
        TensorSpec("only_eos", "bool", ()),
        TensorSpec("unk_penalty", "float32", ()),
    ]
    outputs = [
        TensorSpec("topk_scores", "float32", ("rows", k)),
        TensorSpec("topk_ids", "int64", ("rows", k)),
        TensorSpec("log_probs", "float32", ("rows", cfg.vocab_size)),
    ]
    for i in range(cfg.decoder_layers):
        for name in present_names(i):
            outputs.append(TensorSpec(name, float_dtype, ("rows", h, "total_len", hd)))
    return GraphSpec("decoder_step", tuple(inputs), tuple(outputs))


SHORTLIST_STEP = "decoder_step_shortlist"


def decoder_step_shortlist_spec(cfg: ModelConfig, k: int = 10, float_dtype: str = "float32") -> GraphSpec:
    """The decoder step over a vocabulary shortlist: ``decoder_step``'s inputs plus ``candidates``
    [cands] (token ids, ascending and distinct, at least k + 3 of them, eos and every forced
    token among them). The output projection and the log-softmax cover the candidates only (the
    log-probs are normalized over them: an approximation of the full step); ``topk_ids`` are
    token ids; ``log_probs`` is [rows, cands], column j for token ``candidates[j]``."""
    full = decoder_step_spec(cfg, k, float_dtype)
    inputs = full.inputs + (TensorSpec("candidates", "int64", ("cands",)),)
    outputs = tuple(TensorSpec(t.name, t.dtype, ("rows", "cands")) if t.name == "log_probs" else t
                    for t in full.outputs)
    return GraphSpec(SHORTLIST_STEP, inputs, outputs)
