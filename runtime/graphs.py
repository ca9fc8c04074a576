"""One declaration of each exported graph's interface.

Used by the exporter (input/output names, dynamic axes), the validator (shapes of every output),
the manifest (written as JSON) and the runtime backends (feed names). Pure data: no torch.

Symbolic axes: ``batch`` (sentences given to the encoder), ``src_len``, ``sents`` (sentences of a
decoder step), ``rows`` (their hypotheses, grouped by sentence: ``rows = sents * group``),
``new_len`` (tokens fed per row: 1 in a search step, a whole target when scoring), ``cache_len``
(capacity of the self-attention cache), ``score_width`` (token ids scored per position), ``vocab``
(the full vocabulary, or 0 when the log-probs are not asked for), ``cands`` (the vocabulary
shortlist's candidate ids).
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
    def from_dict(cls, d: dict) -> GraphSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]))


def cross_names(i: int) -> tuple[str, str]:
    return f"cross_key_{i}", f"cross_value_{i}"


def cache_names(i: int) -> tuple[str, str]:
    return f"cache_key_{i}", f"cache_value_{i}"


def new_kv_names(i: int) -> tuple[str, str]:
    return f"new_key_{i}", f"new_value_{i}"


# The in-graph top-k looks at the raw top-(k + RULES_MARGIN): the search rules change at most three
# columns of a row (pad and eos can only drop out, unk can only fall), so the ruled top-k lies
# within them. A vocabulary shortlist must therefore hold at least k + RULES_MARGIN ids.
RULES_MARGIN = 3


def per_layer(cfg: ModelConfig, names) -> list[str]:
    """The names ``names(i)`` gives for every decoder layer, flat and in order (k0, v0, k1, ...)."""
    return [name for i in range(cfg.decoder_layers) for name in names(i)]


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
    """The decoder on new tokens of many rows at once, each row at its own position; see
    ``export/graphs.py`` for the computation.

    Inputs:
    - ``tokens`` [rows, new_len]: the tokens fed (one per row in a search step; a whole shifted
      target when scoring);
    - ``positions`` [rows]: how many tokens of the row the cache already holds (= the step at
      which ``tokens[:, 0]`` is fed: it sits at decoder position ``positions + first_position``);
    - ``cache_key_i`` / ``cache_value_i`` [rows, heads, cache_len, head_dim]: the self-attention
      keys / values of the row's earlier tokens, valid at [0, positions); entries beyond are
      ignored (they must be finite). The caller owns this cache and writes the step's
      ``new_key_i`` / ``new_value_i`` into it: no cache is copied inside the graph;
    - ``cross_key_i`` / ``cross_value_i`` [sents, heads, src_len, head_dim] and ``src_padding``
      [sents, src_len] (True at padding): the encoder's K/V of each sentence; rows are grouped by
      sentence, ``rows = sents * group``;
    - the search rules that must hold before the top-k, per row: ``forced_tokens`` (-1: none),
      ``ban_eos``, ``only_eos``, ``unk_penalty``;
    - ``score_ids`` [rows, new_len, score_width]: token ids whose log-probs are wanted (a target
      when scoring, the next tokens of lexical constraints);
    - ``want_log_probs`` []: whether to return the full log-probs.

    Outputs: ``topk_scores`` / ``topk_ids`` [rows, new_len, k] (rules applied: the fast path);
    ``token_scores`` [rows, new_len, score_width] (raw log-probs of ``score_ids``); ``log_probs``
    [rows, new_len, vocab] float32, raw, with ``vocab`` 0 unless ``want_log_probs`` (a [rows,
    vocabulary] tensor is only built when asked for); ``new_key_i`` / ``new_value_i`` [rows, heads,
    new_len, head_dim], the self-attention K/V of the fed tokens."""
    h, hd = cfg.heads, cfg.head_dim
    inputs = [
        TensorSpec("tokens", "int64", ("rows", "new_len")),
        TensorSpec("positions", "int64", ("rows",)),
    ]
    for i in range(cfg.decoder_layers):
        for name in cache_names(i):
            inputs.append(TensorSpec(name, float_dtype, ("rows", h, "cache_len", hd)))
    for i in range(cfg.decoder_layers):
        for name in cross_names(i):
            inputs.append(TensorSpec(name, float_dtype, ("sents", h, "src_len", hd)))
    inputs += [
        TensorSpec("src_padding", "bool", ("sents", "src_len")),
        TensorSpec("forced_tokens", "int64", ("rows",)),
        TensorSpec("ban_eos", "bool", ("rows",)),
        TensorSpec("only_eos", "bool", ("rows",)),
        TensorSpec("unk_penalty", "float32", ("rows",)),
        TensorSpec("score_ids", "int64", ("rows", "new_len", "score_width")),
        TensorSpec("want_log_probs", "bool", ()),
    ]
    outputs = [
        TensorSpec("topk_scores", "float32", ("rows", "new_len", k)),
        TensorSpec("topk_ids", "int64", ("rows", "new_len", k)),
        TensorSpec("token_scores", "float32", ("rows", "new_len", "score_width")),
        TensorSpec("log_probs", "float32", ("rows", "new_len", "vocab")),
    ]
    for i in range(cfg.decoder_layers):
        for name in new_kv_names(i):
            outputs.append(TensorSpec(name, float_dtype, ("rows", h, "new_len", hd)))
    return GraphSpec("decoder_step", tuple(inputs), tuple(outputs))


SHORTLIST_STEP = "decoder_step_shortlist"


def decoder_step_shortlist_spec(cfg: ModelConfig, k: int = 10, float_dtype: str = "float32") -> GraphSpec:
    """The decoder step over a vocabulary shortlist: ``decoder_step``'s inputs plus ``candidates``
    [cands] (token ids, ascending and distinct, at least k + RULES_MARGIN of them, eos and every
    forced token among them). The output projection and the log-softmax cover the candidates only
    (the log-probs are normalized over them: an approximation of the full step); ``topk_ids`` and
    ``score_ids`` are token ids (a scored id that is not a candidate gets -inf); ``log_probs`` is
    [rows, new_len, cands or 0], column j for token ``candidates[j]``."""
    full = decoder_step_spec(cfg, k, float_dtype)
    inputs = full.inputs + (TensorSpec("candidates", "int64", ("cands",)),)
    outputs = tuple(
        TensorSpec(t.name, t.dtype, ("rows", "new_len", "cands")) if t.name == "log_probs" else t for t in full.outputs
    )
    return GraphSpec(SHORTLIST_STEP, inputs, outputs)
