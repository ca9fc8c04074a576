"""Checkpoint formats -> the canonical state dict of ``export/model.py`` (``shared/DELTALM.md`` §5).

Each format is one declarative table of ``(source pattern, target)`` rows, first match wins.
Patterns hold placeholders: ``{n}`` a layer number, ``{w}`` weight|bias, ``{fc}`` fc1|fc2,
``{rest}`` any dotted remainder. A target is a canonical name (with the same placeholders) or:

- ``Skip(why)``: a known non-parameter (format version, buffer, unused head), dropped by name;
- ``Tied(name)``: a copy of the canonical tensor ``name``; it must be equal (the model shares it);
- ``FoldInto(name)``: row 0 is added to every row of ``name`` (XLM-R's single token type);
- ``Unsupported(why)``: present in the file but not representable by the model.

A key that matches no row is never dropped: unexpected, missing and wrongly shaped tensors are
collected and reported together, by name, in one :class:`CheckpointError`. Beyond the tables
there are only a few transforms: embedding rows truncated / extended to the dictionary size,
the XLM-R token-type fold, and the XLM-R-seeded DeltaLM decoder (``SEED_DECODER_LAYER``).

The architecture comes from what the file records (fairseq ``cfg.model`` / ``args``, a Hugging
Face ``config.json``, XLM ``params``), else from the tensor shapes (heads = dim // 64, DeltaLM's
head size); an override dict replaces fields; the result must agree with every tensor shape.
"""

from __future__ import annotations

import json
import numbers
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltalm.config import ConfigError, ModelConfig, config_overrides
from deltalm.errors import CheckpointError, DeltaLMError, InputError
from deltalm.export.model import build_model as _build_canonical
from deltalm.export.safe_load import load_safetensors, safe_torch_load, to_plain

__all__ = [
    "FORMATS",
    "LoadedCheckpoint",
    "detect_format",
    "load_checkpoint",
    "load_for_export",
    "build_model",
    "describe",
    "Skip",
    "Tied",
    "FoldInto",
    "Unsupported",
    "FAIRSEQ_DELTALM",
    "UNILM_DELTALM",
    "UNILM_DELTALM_LEGACY",
    "HF_XLMR",
    "XLM",
    "SEED_DECODER_LAYER",
    "apply_table",
]

FORMATS = ("fairseq-deltalm", "unilm-deltalm", "hf-xlmr", "xlm")


# --- the tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    why: str


@dataclass(frozen=True)
class Tied:
    to: str


@dataclass(frozen=True)
class FoldInto:
    to: str


@dataclass(frozen=True)
class Unsupported:
    why: str


# A. fairseq fine-tuned DeltaLM: the canonical names themselves.
FAIRSEQ_DELTALM = [
    ("encoder.version", Skip("fairseq format version")),
    ("decoder.version", Skip("fairseq format version")),
    ("decoder.embed_tokens.weight", Tied("encoder.embed_tokens.weight")),
    ("decoder.output_projection.weight", Tied("encoder.embed_tokens.weight")),
    ("{rest}", "{rest}"),
]


def _unilm_table(ffn_order: str) -> list:
    # Current reference loader: ffn_1 (after self-attn, with ffn_layer_norm) -> fc3/fc4,
    # ffn_2 (after cross-attn, with final_layer_norm) -> fc1/fc2. "legacy" is the older release.
    first, second = ("fc3", "fc4"), ("fc1", "fc2")
    if ffn_order == "legacy":
        first, second = second, first
    return [
        ("src_embedding.embed_tokens.weight", "encoder.embed_tokens.weight"),
        ("src_embedding.embed_positions.weight", "encoder.embed_positions.weight"),
        ("src_embedding.emb_layer_norm.{w}", "encoder.layernorm_embedding.{w}"),
        ("tgt_embedding.embed_tokens.weight", Tied("encoder.embed_tokens.weight")),
        ("tgt_embedding.embed_positions.weight", "decoder.embed_positions.weight"),
        ("tgt_embedding.emb_layer_norm.{w}", "decoder.layernorm_embedding.{w}"),
        ("encoder.layers.{n}.ffn.{fc}.{w}", "encoder.layers.{n}.{fc}.{w}"),
        ("decoder.layers.{n}.ffn_1.fc1.{w}", "decoder.layers.{n}." + first[0] + ".{w}"),
        ("decoder.layers.{n}.ffn_1.fc2.{w}", "decoder.layers.{n}." + first[1] + ".{w}"),
        ("decoder.layers.{n}.ffn_2.fc1.{w}", "decoder.layers.{n}." + second[0] + ".{w}"),
        ("decoder.layers.{n}.ffn_2.fc2.{w}", "decoder.layers.{n}." + second[1] + ".{w}"),
        ("encoder.layers.{n}.{rest}", "encoder.layers.{n}.{rest}"),
        ("decoder.layers.{n}.{rest}", "decoder.layers.{n}.{rest}"),
    ]


# B. unilm pretrained DeltaLM (``{"weights": ...}``).
UNILM_DELTALM = _unilm_table("current")
UNILM_DELTALM_LEGACY = _unilm_table("legacy")

_HF_LAYER = "roberta.encoder.layer.{n}."
_LAYER = "encoder.layers.{n}."

# C. Hugging Face XLM-R (``XLMRobertaForMaskedLM`` / ``XLMRobertaModel``, prefix normalised).
HF_XLMR = [
    ("roberta.embeddings.word_embeddings.weight", "encoder.embed_tokens.weight"),
    ("roberta.embeddings.position_embeddings.weight", "encoder.embed_positions.weight"),
    ("roberta.embeddings.token_type_embeddings.weight", FoldInto("encoder.embed_positions.weight")),
    ("roberta.embeddings.LayerNorm.{w}", "encoder.layernorm_embedding.{w}"),
    ("roberta.embeddings.position_ids", Skip("buffer (position ids)")),
    ("roberta.embeddings.token_type_ids", Skip("buffer (token type ids)")),
    (_HF_LAYER + "attention.self.query.{w}", _LAYER + "self_attn.q_proj.{w}"),
    (_HF_LAYER + "attention.self.key.{w}", _LAYER + "self_attn.k_proj.{w}"),
    (_HF_LAYER + "attention.self.value.{w}", _LAYER + "self_attn.v_proj.{w}"),
    (_HF_LAYER + "attention.output.dense.{w}", _LAYER + "self_attn.out_proj.{w}"),
    (_HF_LAYER + "attention.output.LayerNorm.{w}", _LAYER + "self_attn_layer_norm.{w}"),
    (_HF_LAYER + "intermediate.dense.{w}", _LAYER + "fc1.{w}"),
    (_HF_LAYER + "output.dense.{w}", _LAYER + "fc2.{w}"),
    (_HF_LAYER + "output.LayerNorm.{w}", _LAYER + "final_layer_norm.{w}"),
    ("roberta.pooler.dense.{w}", Skip("pooler (sentence classification), unused")),
    ("lm_head.dense.{w}", "mlm_head.dense.{w}"),
    ("lm_head.layer_norm.{w}", "mlm_head.layer_norm.{w}"),
    ("lm_head.bias", "mlm_head.bias"),
    ("lm_head.decoder.weight", Tied("encoder.embed_tokens.weight")),
    ("lm_head.decoder.bias", Tied("mlm_head.bias")),
]

# D. facebookresearch/XLM (``module.`` prefix removed first).
XLM = [
    ("embeddings.weight", "encoder.embed_tokens.weight"),
    ("position_embeddings.weight", "encoder.embed_positions.weight"),
    ("layer_norm_emb.{w}", "encoder.layernorm_embedding.{w}"),
    ("attentions.{n}.q_lin.{w}", _LAYER + "self_attn.q_proj.{w}"),
    ("attentions.{n}.k_lin.{w}", _LAYER + "self_attn.k_proj.{w}"),
    ("attentions.{n}.v_lin.{w}", _LAYER + "self_attn.v_proj.{w}"),
    ("attentions.{n}.out_lin.{w}", _LAYER + "self_attn.out_proj.{w}"),
    ("layer_norm1.{n}.{w}", _LAYER + "self_attn_layer_norm.{w}"),
    ("ffns.{n}.lin1.{w}", _LAYER + "fc1.{w}"),
    ("ffns.{n}.lin2.{w}", _LAYER + "fc2.{w}"),
    ("layer_norm2.{n}.{w}", _LAYER + "final_layer_norm.{w}"),
    ("pred_layer.proj.weight", Tied("encoder.embed_tokens.weight")),
    ("pred_layer.proj.bias", "mlm_head.bias"),
    ("lang_embeddings.weight", Unsupported("language embeddings (multilingual XLM) are not supported")),
]

# DeltaLM decoder layer i seeded from XLM-R encoder layers 2i (+0) and 2i+1 (+1):
# (decoder module prefix, encoder layer offset, encoder module prefix).
SEED_DECODER_LAYER = [
    ("self_attn.", 0, "self_attn."),
    ("self_attn_layer_norm.", 0, "self_attn_layer_norm."),
    ("fc3.", 0, "fc1."),
    ("fc4.", 0, "fc2."),
    ("ffn_layer_norm.", 0, "final_layer_norm."),
    ("encoder_attn.", 1, "self_attn."),
    ("encoder_attn_layer_norm.", 1, "self_attn_layer_norm."),
    ("fc1.", 1, "fc1."),
    ("fc2.", 1, "fc2."),
    ("final_layer_norm.", 1, "final_layer_norm."),
]

# What each format fixes regardless of the file (special ids, position convention, eps).
_FORMAT_BASE = {
    "fairseq-deltalm": dict(
        kind="deltalm", layer_norm_eps=1e-5, bos=0, pad=1, eos=2, unk=3, first_position=2, pad_position=1
    ),
    "unilm-deltalm": dict(
        kind="deltalm", layer_norm_eps=1e-5, bos=0, pad=1, eos=2, unk=3, first_position=2, pad_position=1
    ),
    "hf-xlmr": dict(
        kind="xlmr",
        layer_norm_eps=1e-5,
        bos=0,
        pad=1,
        eos=2,
        unk=3,
        first_position=2,
        pad_position=1,
        layernorm_embedding=True,
    ),
    "xlm": dict(
        kind="xlm",
        layer_norm_eps=1e-12,
        bos=0,
        eos=1,
        pad=2,
        unk=3,
        first_position=0,
        pad_position=0,
        layernorm_embedding=True,
    ),
}

# fairseq model args that change the computation in ways the model does not implement.
_FAIRSEQ_UNSUPPORTED = [
    ("encoder_normalize_before", lambda v: v is True, "pre-LN encoder layers"),
    ("decoder_normalize_before", lambda v: v is True, "pre-LN decoder layers"),
    ("no_scale_embedding", lambda v: v is False, "embeddings scaled by sqrt(embed_dim)"),
    ("encoder_learned_pos", lambda v: v is False, "sinusoidal encoder positions"),
    ("decoder_learned_pos", lambda v: v is False, "sinusoidal decoder positions"),
    ("no_token_positional_embeddings", lambda v: v is True, "no positional embeddings"),
    ("cross_self_attention", lambda v: v is True, "cross+self attention"),
    ("activation_fn", lambda v: v is not None and v != "gelu", "an activation other than exact GELU"),
]
# ModelConfig field <- fairseq model arg; the decoder-side twin must agree when present.
_FAIRSEQ_FIELDS = [
    ("embed_dim", "encoder_embed_dim", "decoder_embed_dim"),
    ("ffn_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim"),
    ("heads", "encoder_attention_heads", "decoder_attention_heads"),
    ("encoder_layers", "encoder_layers", None),
    ("decoder_layers", "decoder_layers", None),
    ("max_positions", "max_source_positions", "max_target_positions"),
    ("layernorm_embedding", "layernorm_embedding", None),
]


# --- table application ----------------------------------------------------------------------------

_PLACEHOLDER = {"n": r"\d+", "w": r"weight|bias", "fc": r"fc1|fc2", "rest": r".+"}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDER.get(p, r'[^.]+')})" for i, p in enumerate(parts)
    )
    return re.compile(regex + r"\Z")


@dataclass
class _Mapped:
    tensors: dict = field(default_factory=dict)  # canonical name -> tensor
    source: dict = field(default_factory=dict)  # canonical name -> source key
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def apply_table(table: list, raw: dict[str, torch.Tensor], kept_rows: int | None = None) -> _Mapped:
    """Map ``raw`` (source key -> tensor) through ``table``. Direct rows first, then ``Tied`` rows
    (checked for equality, or used when the canonical tensor is absent), then ``FoldInto``.
    ``kept_rows``: token tables are cut to this many rows later (the dictionary's), so tied tables
    only need to agree on those rows."""
    rules = [(_compile(src), dst) for src, dst in table]
    out = _Mapped()
    tied, folds, skipped, unexpected = [], [], [], []
    for key, tensor in raw.items():
        for regex, target in rules:
            m = regex.match(key)
            if m is None:
                continue
            if isinstance(target, str):
                name = target.format(**m.groupdict())
                if name in out.tensors:
                    out.problems.append(f"{key} and {out.source[name]} both map to {name}")
                out.tensors[name], out.source[name] = tensor, key
            elif isinstance(target, Tied):
                tied.append((key, target.to, tensor))
            elif isinstance(target, FoldInto):
                folds.append((key, target.to, tensor))
            elif isinstance(target, Skip):
                skipped.append(key)
            else:
                out.problems.append(f"{key}: {target.why}")
            break
        else:
            unexpected.append(key)
    for key, name, tensor in tied:
        have = out.tensors.get(name)
        if have is None:
            out.tensors[name], out.source[name] = tensor, key
            continue
        a, b = have, tensor
        if (
            kept_rows is not None
            and a.dim() == b.dim() == 2
            and a.shape[1] == b.shape[1]
            and min(len(a), len(b)) >= kept_rows
        ):
            a, b = a[:kept_rows], b[:kept_rows]  # rows past the dictionary are cut off anyway
        if a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
            out.problems.append(
                f"{key} differs from {out.source[name]} (untied embeddings are not supported: "
                "the model shares one table)"
            )
    for key, name, tensor in folds:
        if name not in out.tensors:
            out.problems.append(f"{key} has nothing to fold into ({name} is missing)")
            continue
        target = out.tensors[name]
        if tensor.dim() != 2 or tensor.shape[1] != target.shape[1]:
            out.problems.append(f"{key}: shape {_shape(tensor)} cannot fold into {name} {_shape(target)}")
            continue
        out.tensors[name] = target + tensor[0].to(target.dtype)
        out.notes.append(f"{key} row 0 folded into {name} (every token has type 0)")
        if tensor.shape[0] > 1:
            out.notes.append(f"{key} has {tensor.shape[0]} types; only type 0 is used")
    if skipped:
        out.notes.append(f"skipped {len(skipped)} non-parameter tensors: {_names(skipped)}")
    if unexpected:
        out.problems.append(f"unexpected tensors: {_names(unexpected)}")
    return out


# --- reading files --------------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    obj: object  # what the weights file holds
    hf_config: dict | None = None  # config.json beside / inside, for format C
    hf_config_path: Path | None = None


_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_weights(path: Path) -> object:
    if path.name.endswith(".index.json"):  # sharded Hugging Face checkpoint
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e})") from None
        merged: dict = {}
        for shard in sorted(set(weight_map.values())):
            merged.update(_read_weights(path.parent / shard))
        return merged
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return safe_torch_load(path)


def _read_source(path: str | Path) -> _Source:
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in _HF_WEIGHTS if (path / n).exists()), None)
        if weights is None or not (path / "config.json").exists():
            raise CheckpointError(
                f"{path}: a directory, but not a Hugging Face model (expected config.json and one of "
                f"{', '.join(_HF_WEIGHTS)})"
            )
        source = _Source(weights, _read_weights(weights))
    else:
        source = _Source(path, _read_weights(path))
    config_path = source.path.parent / "config.json"
    if config_path.exists() and _looks_like_hf(source.obj):
        try:
            source.hf_config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        source.hf_config_path = config_path
    return source


def _looks_like_hf(obj) -> bool:
    return isinstance(obj, dict) and any(
        isinstance(k, str) and k.removeprefix("roberta.").startswith("embeddings.word_embeddings.") for k in obj
    )


def _detect(obj) -> str:
    if isinstance(obj, dict):
        model = obj.get("model")
        if isinstance(obj.get("weights"), dict) and any(
            str(k).startswith(("src_embedding.", "tgt_embedding.")) for k in obj["weights"]
        ):
            return "unilm-deltalm"
        if isinstance(model, dict) and "params" in obj and ("dico_id2word" in obj or "dico_word2id" in obj):
            return "xlm"
        if isinstance(model, dict) and ("args" in obj or "cfg" in obj):
            keys = [str(k) for k in model]
            if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
                return "fairseq-deltalm"
        if _looks_like_hf(obj):
            return "hf-xlmr"
        seen = ", ".join(sorted(str(k) for k in obj)[:12]) or "none"
        raise CheckpointError(
            f"unrecognized checkpoint format (supported: {', '.join(FORMATS)}); top-level keys: {seen}"
        )
    raise CheckpointError(
        f"unrecognized checkpoint format (supported: {', '.join(FORMATS)}); the file holds a "
        f"{type(obj).__name__}, not a dict"
    )


def detect_format(obj_or_path) -> str:
    """One of ``FORMATS`` for a loaded checkpoint object or a path (file or HF directory);
    CheckpointError listing the supported formats and the top-level keys seen otherwise."""
    if isinstance(obj_or_path, (str, Path)):
        source = _read_source(obj_or_path)
        try:
            return _detect(source.obj)
        except CheckpointError as e:
            raise CheckpointError(f"{source.path}: {e}") from None
    return _detect(obj_or_path)


# --- per-format extraction: raw tensors, declared architecture, metadata --------------------------


def _tensors_only(d: dict, where: str) -> dict[str, torch.Tensor]:
    bad = [str(k) for k, v in d.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {_names(bad)}")
    return dict(d)


def _fairseq_args(obj: dict) -> tuple[dict, str]:
    cfg = to_plain(obj.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], "cfg.model"
    args = to_plain(obj.get("args"))
    if isinstance(args, dict):
        return args, "args"
    return {}, ""


def _arg(args: dict, name: str):
    """A flat fairseq arg (``encoder_embed_dim``) or its nested dataclass form (``encoder.embed_dim``)."""
    if name in args:
        return args[name]
    side, _, rest = name.partition("_")
    if side in ("encoder", "decoder") and isinstance(args.get(side), dict):
        return args[side].get(rest)
    return None


def _number(convert, value, where: str, name: str):
    """``convert(value)`` (int, float or bool) for an architecture field, or a CheckpointError
    naming the field and the value found."""
    if convert is not bool and (isinstance(value, bool) or not isinstance(value, (numbers.Real, str))):
        raise CheckpointError(f"{where}: {name} is a {type(value).__name__}, expected a number")
    if convert is bool and not isinstance(value, (bool, numbers.Integral)):
        raise CheckpointError(f"{where}: {name} is a {type(value).__name__}, expected true / false")
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{where}: {name} = {str(value)[:40]!r} is not a number") from None


def _fairseq_declared(args: dict, where: str, notes: list) -> dict:
    bad = [why for name, is_bad, why in _FAIRSEQ_UNSUPPORTED if is_bad(_arg(args, name))]
    if bad:
        raise CheckpointError(f"{where} asks for {', '.join(bad)}, which the model does not implement")
    declared = {}
    for field_name, enc, dec in _FAIRSEQ_FIELDS:
        value = _arg(args, enc)
        if value is None:
            continue
        twin = _arg(args, dec) if dec else None
        if twin is not None and twin != value:
            raise CheckpointError(f"{where}: {dec} = {twin} differs from {enc} = {value}; the model needs one value")
        declared[field_name] = _number(bool if field_name == "layernorm_embedding" else int, value, where, enc)
    if _arg(args, "no_scale_embedding") is None and args:
        notes.append(f"{where} does not record no_scale_embedding; assuming DeltaLM's (no scaling)")
    return declared


def _hf_declared(cfg: dict, where: str) -> dict:
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only exact GELU)")
    ptype = cfg.get("position_embedding_type", "absolute")
    if ptype != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type {ptype!r} is not supported")
    if cfg.get("is_decoder"):
        raise CheckpointError(f"{where}: is_decoder models (causal XLM-R) are not supported")
    declared = {}
    for field_name, key in [
        ("embed_dim", "hidden_size"),
        ("ffn_dim", "intermediate_size"),
        ("encoder_layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("vocab_size", "vocab_size"),
        ("pad", "pad_token_id"),
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
    ]:
        if cfg.get(key) is not None:
            declared[field_name] = _number(int, cfg[key], where, key)
    if cfg.get("layer_norm_eps") is not None:
        declared["layer_norm_eps"] = _number(float, cfg["layer_norm_eps"], where, "layer_norm_eps")
    pad = declared.get("pad", 1)
    declared["first_position"], declared["pad_position"] = pad + 1, pad
    if cfg.get("max_position_embeddings") is not None:
        positions = _number(int, cfg["max_position_embeddings"], where, "max_position_embeddings")
        declared["max_positions"] = positions - (pad + 1)
    return declared


def _xlm_declared(params: dict, where: str) -> dict:
    if params.get("gelu_activation") is False:
        raise CheckpointError(f"{where}: gelu_activation is False (ReLU), which the model does not implement")
    if params.get("asm"):
        raise CheckpointError(f"{where}: asm (adaptive softmax) is not supported")
    declared = {}
    for field_name, key in [
        ("embed_dim", "emb_dim"),
        ("encoder_layers", "n_layers"),
        ("heads", "n_heads"),
        ("vocab_size", "n_words"),
        ("pad", "pad_index"),
        ("eos", "eos_index"),
        ("bos", "bos_index"),
        ("unk", "unk_index"),
    ]:
        if params.get(key) is not None:
            declared[field_name] = _number(int, params[key], where, key)
    if "embed_dim" in declared:
        declared["ffn_dim"] = 4 * declared["embed_dim"]  # XLM's TransformerModel: hidden_dim = 4 * dim
    return declared


def _extract(fmt: str, source: _Source, unilm_ffn_order: str):
    """-> (raw tensors by source key, table, declared fields, metadata, notes)."""
    obj, path = source.obj, source.path
    notes: list[str] = []
    if fmt == "fairseq-deltalm":
        args, where = _fairseq_args(obj)
        declared = _fairseq_declared(args, where, notes) if args else {}
        if not args:
            notes.append("no cfg.model / args in the checkpoint: architecture inferred from tensor shapes")
        metadata = {"model_args": args, "args_from": where}
        return _tensors_only(obj["model"], f"{path}: model"), FAIRSEQ_DELTALM, declared, metadata, notes
    if fmt == "unilm-deltalm":
        if unilm_ffn_order not in ("current", "legacy"):
            raise CheckpointError(f"unilm_ffn_order must be 'current' or 'legacy', not {unilm_ffn_order!r}")
        table = UNILM_DELTALM if unilm_ffn_order == "current" else UNILM_DELTALM_LEGACY
        notes.append(f"unilm pretrained checkpoint: no architecture recorded; ffn order {unilm_ffn_order!r}")
        return _tensors_only(obj["weights"], f"{path}: weights"), table, {}, {}, notes
    if fmt == "hf-xlmr":
        raw = _tensors_only(obj, str(path))
        if not any(k.startswith("roberta.") for k in raw):  # XLMRobertaModel saves without the prefix
            raw = {k if k.startswith("lm_head.") else "roberta." + k: v for k, v in raw.items()}
        declared, hf = {}, source.hf_config
        if hf is not None:
            declared = _hf_declared(hf, str(source.hf_config_path))
            if hf.get("tie_word_embeddings") is False:
                notes.append("config.json says tie_word_embeddings=false; the head must still equal the embeddings")
        else:
            notes.append("no config.json beside the weights: heads = dim // 64, eps 1e-5 assumed")
        return raw, HF_XLMR, declared, {"hf_config": hf or {}}, notes
    # xlm
    model = _tensors_only(obj["model"], f"{path}: model")
    if model and all(k.startswith("module.") for k in model):
        model = {k[len("module.") :]: v for k, v in model.items()}
    params = to_plain(obj.get("params")) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: params is a {type(params).__name__}, expected a dict")
    declared = _xlm_declared(params, f"{path}: params")
    metadata = {
        "params": {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "id2word": to_plain(obj.get("dico_id2word")),
    }
    return model, XLM, declared, metadata, notes


# --- transforms -----------------------------------------------------------------------------------


def _resize_rows(mapped: _Mapped, name: str, rows: int, why: str) -> None:
    t = mapped.tensors.get(name)
    if t is None or t.shape[0] == rows:
        return
    have = t.shape[0]
    if rows < have:
        mapped.tensors[name] = t[:rows]
        mapped.notes.append(f"{name}: kept the first {rows} of {have} rows ({why})")
    else:
        mapped.tensors[name] = torch.cat([t, t.new_zeros(rows - have, *t.shape[1:])])
        mapped.notes.append(f"{name}: {have} rows extended to {rows} with zero rows ({why})")


def _layer_count(tensors: dict, prefix: str) -> int:
    found = [int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _seed_decoder(mapped: _Mapped, decoder_layers: int) -> None:
    """XLM-R encoder -> DeltaLM: decoder layer i from encoder layers 2i and 2i+1 (SEED_DECODER_LAYER);
    the decoder's embeddings are the encoder's."""
    t = mapped.tensors
    enc_layers = _layer_count(t, "encoder.layers.")
    if decoder_layers < 1 or 2 * decoder_layers > enc_layers:
        raise CheckpointError(
            f"cannot seed {decoder_layers} decoder layers from {enc_layers} encoder layers "
            "(decoder layer i takes encoder layers 2i and 2i+1)"
        )
    head = sorted(k for k in t if k.startswith("mlm_head."))
    for k in head:
        del t[k]
    if head:
        mapped.notes.append("MLM head dropped (a DeltaLM has no MLM head)")
    for k in [k for k in t if k.startswith("encoder.") and not k.startswith("encoder.layers.")]:
        dec = "decoder." + k[len("encoder.") :]
        if not dec.startswith("decoder.embed_tokens."):
            t[dec] = t[k]
            mapped.source[dec] = mapped.source.get(k, k)
    for i in range(decoder_layers):
        for dec_prefix, offset, enc_prefix in SEED_DECODER_LAYER:
            enc = f"encoder.layers.{2 * i + offset}.{enc_prefix}"
            for k in [k for k in t if k.startswith(enc)]:
                name = f"decoder.layers.{i}.{dec_prefix}{k[len(enc) :]}"
                t[name] = t[k]
                mapped.source[name] = mapped.source.get(k, k)
    mapped.notes.append(
        f"DeltaLM seeded from XLM-R: decoder layer i from encoder layers 2i, 2i+1 ({decoder_layers} layers)"
    )


# --- config, validation ---------------------------------------------------------------------------


def _shape_fields(t: dict, base: dict) -> dict:
    """Architecture fields read off canonical tensor shapes."""
    fields: dict = {}
    tok = t.get("encoder.embed_tokens.weight")
    if tok is not None and tok.dim() == 2:
        fields["vocab_size"], fields["embed_dim"] = int(tok.shape[0]), int(tok.shape[1])
        fields["heads"] = max(1, fields["embed_dim"] // 64)
    pos = t.get("encoder.embed_positions.weight")
    if pos is not None and pos.dim() == 2:
        fields["max_positions"] = int(pos.shape[0]) - base["first_position"]
    fc1 = t.get("encoder.layers.0.fc1.weight")
    if fc1 is not None and fc1.dim() == 2:
        fields["ffn_dim"] = int(fc1.shape[0])
    fields["encoder_layers"] = _layer_count(t, "encoder.layers.")
    if base["kind"] == "deltalm":
        fields["decoder_layers"] = _layer_count(t, "decoder.layers.")
    fields["layernorm_embedding"] = "encoder.layernorm_embedding.weight" in t
    if base["kind"] == "xlmr":
        fields["mlm_head"] = "roberta" if "mlm_head.dense.weight" in t else ""
    elif base["kind"] == "xlm":
        fields["mlm_head"] = "xlm" if "mlm_head.bias" in t else ""
    return fields


def _make_config(fields: dict, overrides: dict | None) -> ModelConfig:
    overrides = dict(overrides or {})
    known = set(ModelConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown config fields in the override: {', '.join(unknown)}")
    merged = {**ModelConfig().to_dict(), **fields, **overrides}
    if merged["kind"] != "deltalm":
        merged["decoder_layers"] = 0
    return ModelConfig.from_dict(merged)


def _expected(cfg: ModelConfig) -> tuple[dict[str, torch.Size], list[list[str]]]:
    """Canonical names and shapes for ``cfg`` (model built on the meta device: no memory), and the
    groups of names that are one shared parameter."""
    with torch.device("meta"):
        model = _build_canonical(cfg)
    shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return shapes, [g for g in groups.values() if len(g) > 1]


def _finish(mapped: _Mapped, cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    # Layer counts first: the expected model is built (on the meta device) from the config, and a
    # damaged config asking for 10**9 layers must not get that far.
    for side, want in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        have = _layer_count(mapped.tensors, f"{side}.layers.")
        if want != have:
            raise CheckpointError(
                f"{path}: the configuration says {want} {side} layers, the checkpoint holds tensors for {have}"
            )
    shapes, tied_groups = _expected(cfg)
    t = dict(mapped.tensors)
    problems = list(mapped.problems)
    for group in tied_groups:  # one table under several canonical names
        present = [n for n in group if n in t]
        if present:
            for n in group:
                t.setdefault(n, t[present[0]])
                mapped.source.setdefault(n, mapped.source.get(present[0], present[0]))
    missing = [n for n in shapes if n not in t]
    unexpected = [n for n in t if n not in shapes]
    wrong = [
        f"{_label(n, mapped)}: checkpoint {_shape(t[n])}, config expects {list(shapes[n])}"
        for n in shapes
        if n in t and t[n].shape != shapes[n]
    ]
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(
            f"tensors the {cfg.kind} model does not have: {_names([_label(n, mapped) for n in unexpected])}"
        )
    if wrong:
        problems.append(
            "wrong shapes: " + "; ".join(wrong[:8]) + (f"; ... and {len(wrong) - 8} more" if len(wrong) > 8 else "")
        )
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    converted: dict[int, torch.Tensor] = {}
    out = {}
    for n in shapes:  # float32, aliases kept as one tensor
        src = t[n]
        out[n] = converted.setdefault(id(src), src.detach().to(torch.float32).contiguous())
    return out


def _label(name: str, mapped: _Mapped) -> str:
    src = mapped.source.get(name)
    return name if src in (None, name) else f"{name} (from {src})"


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _dtype_name(raw: dict[str, torch.Tensor]) -> str:
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in raw.values() if t.is_floating_point())
    if not counts:
        return "none"
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed(" + ", ".join(f"{d}: {n}" for d, n in counts.most_common()) + ")"


# --- public API -----------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint mapped onto the canonical model: ``state_dict`` is float32 under the names of
    ``export/model.py`` (tied names share one tensor); ``source_dtype`` is what the file stored."""

    format: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source_dtype: str
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def load_checkpoint(
    path: str | Path,
    *,
    overrides: dict | None = None,
    vocab_size: int | None = None,
    as_deltalm: bool = False,
    unilm_ffn_order: str = "current",
    vocab_source: str | Path | None = None,
) -> LoadedCheckpoint:
    """Read any supported checkpoint (file, or Hugging Face directory) into the canonical form.

    ``vocab_size`` is the dictionary size (dict.txt): a fine-tuned fairseq checkpoint must match it
    exactly (the error names ``vocab_source``, the file it was counted in); unilm pretrained
    embeddings (and XLM-R seeding a DeltaLM) are truncated or extended to it. ``as_deltalm`` seeds
    a DeltaLM from an XLM-R encoder; otherwise XLM-R / XLM load as encoder-only models.
    ``overrides`` replaces ModelConfig fields; every tensor must then have the shape the config
    implies. All problems raise CheckpointError (one line, naming tensors)."""
    source = _read_source(path)
    try:
        return _interpret(source, overrides, vocab_size, as_deltalm, unilm_ffn_order, vocab_source)
    except CheckpointError as e:
        if str(source.path) in str(e) or (source.hf_config_path and str(source.hf_config_path) in str(e)):
            raise
        raise CheckpointError(f"{source.path}: {e}") from None  # every checkpoint error names the file
    except DeltaLMError:
        raise
    except Exception as e:  # noqa: BLE001 - a value of a type no real checkpoint holds, deep in a mapping
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{source.path}: cannot interpret the checkpoint's contents ({type(e).__name__}: {detail})"
        ) from e


def _interpret(source: _Source, overrides, vocab_size, as_deltalm, unilm_ffn_order, vocab_source) -> LoadedCheckpoint:
    try:
        fmt = _detect(source.obj)
    except CheckpointError as e:
        raise CheckpointError(f"{source.path}: {e}") from None
    raw, table, declared, metadata, notes = _extract(fmt, source, unilm_ffn_order)
    dict_rows = vocab_size if vocab_size is not None else (overrides or {}).get("vocab_size")
    mapped = apply_table(table, raw, kept_rows=int(dict_rows) if fmt == "unilm-deltalm" and dict_rows else None)
    base = dict(_FORMAT_BASE[fmt])
    if fmt == "hf-xlmr" and source.hf_config is not None and "pad_token_id" in source.hf_config:
        pad = int(source.hf_config["pad_token_id"])
        base.update(first_position=pad + 1, pad_position=pad)
    seeding = as_deltalm and fmt == "hf-xlmr"
    if as_deltalm and fmt == "xlm":
        raise CheckpointError(f"{source.path}: an XLM checkpoint cannot seed a DeltaLM (only XLM-R can)")

    if seeding:
        enc_layers = _layer_count(mapped.tensors, "encoder.layers.")
        dec_layers = int((overrides or {}).get("decoder_layers", enc_layers // 2))
        _seed_decoder(mapped, dec_layers)
        base.update(kind="deltalm", layernorm_embedding=True)
        declared = {**declared, "decoder_layers": dec_layers}
    if fmt == "unilm-deltalm" or seeding:
        if dict_rows is not None:
            _resize_rows(mapped, "encoder.embed_tokens.weight", int(dict_rows), "the dictionary size")
        declared.pop("vocab_size", None)  # the table now has the dictionary's rows
    elif vocab_size is not None:
        rows = mapped.tensors.get("encoder.embed_tokens.weight")
        if rows is not None and rows.shape[0] != vocab_size:
            where = f" ({vocab_source})" if vocab_source else ""
            raise CheckpointError(
                f"{source.path}: checkpoint has {rows.shape[0]} rows, dict.txt has {vocab_size}{where} "
                f"(4 specials + {vocab_size - 4} lines): the dictionary does not belong to this checkpoint"
            )

    source_dtype = _dtype_name(mapped.tensors)  # parameters only: skipped buffers do not count
    fields = {**base, **_shape_fields(mapped.tensors, base), **declared}
    cfg = _make_config(fields, overrides)
    state_dict = _finish(mapped, cfg, source.path)
    return LoadedCheckpoint(
        format=fmt,
        config=cfg,
        state_dict=state_dict,
        source_dtype=source_dtype,
        notes=notes + mapped.notes,
        metadata={**metadata, "path": str(source.path)},
    )


def build_model(loaded: LoadedCheckpoint) -> torch.nn.Module:
    """The canonical PyTorch model for ``loaded``, in eval mode, its parameters *being* the tensors
    of ``loaded.state_dict`` (no copy: the model is built on the meta device and the tensors are
    assigned; a memory-mapped checkpoint stays mapped). Tied parameters stay one parameter.
    Every parameter must be given, with its shape."""
    with torch.device("meta"):
        model = _build_canonical(loaded.config)
    state = loaded.state_dict
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    expected = {n for names in owners.values() for n in names} | {n for n, _ in model.named_buffers()}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(
            f"state dict does not fit the model: missing {_names(missing)}; unexpected {_names(unexpected)}"
        )
    for names in owners.values():
        tensor = state[names[0]]
        shape = model.get_parameter(names[0]).shape
        if tensor.shape != shape:
            raise CheckpointError(f"{names[0]}: shape {list(tensor.shape)}, the model expects {list(shape)}")
        param = torch.nn.Parameter(tensor, requires_grad=False)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)
    for name, _ in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, state[name])
    return model.eval()


def describe(loaded: LoadedCheckpoint) -> dict:
    """What ``deltalm inspect`` prints: format, architecture, parameter count, vocab, dtype, notes."""
    cfg = loaded.config
    unique = {(t.data_ptr(), tuple(t.shape)): t.numel() for t in loaded.state_dict.values()}
    arch = {
        k: getattr(cfg, k)
        for k in (
            "kind",
            "embed_dim",
            "ffn_dim",
            "encoder_layers",
            "decoder_layers",
            "heads",
            "max_positions",
            "layernorm_embedding",
            "layer_norm_eps",
            "mlm_head",
        )
    }
    return {
        "format": loaded.format,
        "architecture": arch,
        "parameters": sum(unique.values()),
        "vocab_size": cfg.vocab_size,
        "special_ids": {"bos": cfg.bos, "pad": cfg.pad, "eos": cfg.eos, "unk": cfg.unk},
        "positions": {"first": cfg.first_position, "pad": cfg.pad_position},
        "dtype": loaded.source_dtype,
        "notes": list(loaded.notes),
    }


def _dictionary_size(dict_path) -> int | None:
    if not dict_path:
        return None
    from deltalm.tokenizer import Dictionary

    return len(Dictionary.load(dict_path))


def load_for_export(
    checkpoint: str | Path, config: str | None = None, dict_path: str | Path | None = None, as_deltalm: bool = False
):
    """The checkpoint as a ``LoadedCheckpoint`` (canonical tensors + config), its vocabulary
    checked against ``dict_path`` when given."""
    if not Path(checkpoint).exists():
        raise InputError(f"{checkpoint}: no such checkpoint file or directory")
    overrides = config_overrides(config) if config else None
    return load_checkpoint(
        str(checkpoint),
        overrides=overrides,
        vocab_size=_dictionary_size(dict_path),
        as_deltalm=as_deltalm,
        vocab_source=str(dict_path) if dict_path else None,
    )
