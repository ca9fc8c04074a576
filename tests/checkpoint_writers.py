"""Write a canonical model (``export/model.py`` names) in each real on-disk checkpoint format, with
the real key names and the real surrounding objects (``shared/DELTALM.md`` §5):

- A: a fairseq checkpoint dict whose ``cfg`` pickles as omegaconf's ``DictConfig`` tree (2.0
  layout: ``_metadata`` / ``_parent`` / ``_content``, leaves ``AnyNode``, the legacy model args
  an ``argparse.Namespace`` inside it), or an older one with ``args`` as a Namespace;
- B: unilm's ``{"weights": ...}`` with extra embedding rows (the 250104-row pretrained table);
- C: a Hugging Face directory written by transformers (safetensors) or a ``pytorch_model.bin``;
- D: an XLM dict (``model``, ``params``, ``dico_*``).

omegaconf is not installed: stand-in classes named ``omegaconf.dictconfig.DictConfig`` etc. are put
in ``sys.modules`` only while pickling, so the stream references them exactly as the real ones.
The name mappings here are written from DELTALM.md independently of ``export/checkpoints.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
import typing
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import torch

# --- random weights -------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: LayerNorm weights around 1, biases and matrices non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model.eval()


def canonical(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- fake omegaconf (pickles like omegaconf 2.0) --------------------------------------------------


class _Plain:
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


class FakeMetadata(_Plain):
    pass


class FakeContainerMetadata(_Plain):
    pass


class FakeAnyNode(_Plain):
    pass


class FakeDictConfig(_Plain):
    pass


class FakeListConfig(_Plain):
    pass


_FAKES = {
    "omegaconf.base": {"Metadata": FakeMetadata, "ContainerMetadata": FakeContainerMetadata},
    "omegaconf.nodes": {"AnyNode": FakeAnyNode},
    "omegaconf.dictconfig": {"DictConfig": FakeDictConfig},
    "omegaconf.listconfig": {"ListConfig": FakeListConfig},
}
for _module, _classes in _FAKES.items():
    for _name, _cls in _classes.items():
        _cls.__module__, _cls.__qualname__, _cls.__name__ = _module, _name, _name


@contextlib.contextmanager
def fake_omegaconf():
    """Make ``omegaconf.*`` importable (for pickle's global lookup) while the block runs."""
    names = ["omegaconf", *_FAKES]
    saved = {n: sys.modules.get(n) for n in names}
    if saved["omegaconf"] is not None and not getattr(saved["omegaconf"], "_is_fake", False):
        raise RuntimeError("a real omegaconf is imported; the fake would shadow it")
    root = types.ModuleType("omegaconf")
    root._is_fake = True
    sys.modules["omegaconf"] = root
    for module, classes in _FAKES.items():
        m = types.ModuleType(module)
        for name, cls in classes.items():
            setattr(m, name, cls)
        sys.modules[module] = m
        setattr(root, module.split(".")[1], m)
    try:
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def _node_metadata(key, container: bool, flags=None):
    common = dict(
        ref_type=typing.Any,
        object_type=None,
        optional=True,
        key=key,
        flags=dict(flags or {}),
        resolver_cache=defaultdict(dict),
    )
    if container:
        return FakeContainerMetadata(**common, key_type=typing.Any, element_type=typing.Any)
    return FakeMetadata(**common)


def to_dictconfig(value, key=None, parent=None, flags=None):
    """A plain dict / list / value as the node tree ``OmegaConf.create`` builds."""
    if isinstance(value, dict):
        node = FakeDictConfig(_metadata=_node_metadata(key, True, flags), _parent=parent)
        meta = node._metadata
        meta.object_type = dict
        node._content = {k: to_dictconfig(v, k, node) for k, v in value.items()}
        return node
    if isinstance(value, list):
        node = FakeListConfig(_metadata=_node_metadata(key, True, flags), _parent=parent)
        node._content = [to_dictconfig(v, i, node) for i, v in enumerate(value)]
        return node
    return FakeAnyNode(_metadata=_node_metadata(key, False), _parent=parent, _val=value)


def save(obj, path: str | Path, **kwargs) -> Path:
    """``torch.save`` with the fake omegaconf importable (kwargs: e.g. legacy format)."""
    path = Path(path)
    with fake_omegaconf():
        torch.save(obj, path, **kwargs)
    return path


# --- A: fairseq fine-tuned DeltaLM ----------------------------------------------------------------


def deltalm_model_args(cfg, **extra) -> dict:
    """The flat args fairseq records for ``--arch deltalm_base`` (resized to ``cfg``)."""
    return {
        "_name": "deltalm_base",
        "arch": "deltalm_base",
        "task": "translation",
        "data": "data-bin",
        "source_lang": "src",
        "target_lang": "tgt",
        "criterion": "label_smoothed_cross_entropy",
        "label_smoothing": 0.1,
        "optimizer": "adam",
        "adam_betas": "(0.9, 0.98)",
        "lr": [1e-4],
        "lr_scheduler": "inverse_sqrt",
        "warmup_updates": 4000,
        "fp16": True,
        "seed": 1,
        "encoder_embed_dim": cfg.embed_dim,
        "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_layers": cfg.encoder_layers,
        "encoder_attention_heads": cfg.heads,
        "encoder_normalize_before": False,
        "encoder_learned_pos": True,
        "decoder_embed_dim": cfg.embed_dim,
        "decoder_ffn_embed_dim": cfg.ffn_dim,
        "decoder_layers": cfg.decoder_layers,
        "decoder_attention_heads": cfg.heads,
        "decoder_normalize_before": False,
        "decoder_learned_pos": True,
        "decoder_output_dim": cfg.embed_dim,
        "decoder_input_dim": cfg.embed_dim,
        "activation_fn": "gelu",
        "no_scale_embedding": True,
        "layernorm_embedding": cfg.layernorm_embedding,
        "max_positions": cfg.max_positions,
        "max_source_positions": cfg.max_positions,
        "max_target_positions": cfg.max_positions,
        "share_all_embeddings": True,
        "share_decoder_input_output_embed": True,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "adaptive_softmax_cutoff": None,
        "cross_self_attention": False,
        "no_token_positional_embeddings": False,
        "pretrained_deltalm_checkpoint": "deltalm-base.pt",
        "eval_bleu_args": '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}',
        **extra,
    }


def _fairseq_cfg(model_args: dict) -> FakeDictConfig:
    namespace = argparse.Namespace(**model_args)
    plain = {
        "_name": None,
        "common": {"_name": None, "fp16": True, "seed": 1, "log_format": "simple", "user_dir": None},
        "distributed_training": {"_name": None, "distributed_world_size": 1, "ddp_backend": "pytorch_ddp"},
        "dataset": {"_name": None, "max_tokens": 1024, "batch_size": None, "num_workers": 1},
        "optimization": {
            "_name": None,
            "max_epoch": 100,
            "max_update": 400000,
            "lr": [0.0001],
            "update_freq": [1],
            "clip_norm": 0.0,
        },
        "checkpoint": {
            "_name": None,
            "save_dir": "checkpoints",
            "no_save_optimizer_state": False,
            "best_checkpoint_metric": "bleu",
            "maximize_best_checkpoint_metric": True,
        },
        "generation": {"_name": None, "beam": 5, "lenpen": 1.0, "max_len_a": 0.0, "max_len_b": 200},
        "model": namespace,  # legacy (argparse) architecture: the whole Namespace, as fairseq stores it
        "task": argparse.Namespace(**{**model_args, "_name": "translation"}),
        "criterion": argparse.Namespace(**{**model_args, "_name": "label_smoothed_cross_entropy"}),
        "optimizer": {"_name": "adam", "adam_betas": "(0.9, 0.98)", "adam_eps": 1e-8, "lr": [0.0001]},
        "lr_scheduler": {"_name": "inverse_sqrt", "warmup_updates": 4000, "lr": [0.0001]},
        "scoring": {"_name": "bleu"},
        "bpe": None,
        "tokenizer": None,
    }
    return to_dictconfig(plain, flags={"struct": True})


def fairseq_checkpoint(model, *, style: str = "cfg", dtype: torch.dtype = torch.float32, **arg_overrides) -> dict:
    """Format A. ``style="cfg"``: fairseq >= 0.10 (``args`` None, ``cfg`` a DictConfig);
    ``style="args"``: older fairseq (``args`` a Namespace, no ``cfg``)."""
    cfg = model.cfg
    weights = OrderedDict()
    weights["encoder.version"] = torch.tensor([3.0])
    for k, v in canonical(model).items():
        weights[k] = v.to(dtype)
    weights["decoder.version"] = torch.tensor([3.0])
    # share_all_embeddings: the three names are one tensor in the saved file
    weights["decoder.embed_tokens.weight"] = weights["encoder.embed_tokens.weight"]
    weights["decoder.output_projection.weight"] = weights["encoder.embed_tokens.weight"]
    model_args = deltalm_model_args(cfg, **arg_overrides)
    first = next(iter(model.parameters()))
    state = {
        "args": argparse.Namespace(**model_args) if style == "args" else None,
        "model": weights,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "FP16Optimizer",
                "lr_scheduler_state": {"best": np.float64(27.5)},
                "num_updates": 1200,
            }
        ],
        "extra_state": {
            "epoch": 3,
            "train_iterator": {"epoch": 3, "iterations_in_epoch": 0, "shuffle": True},
            "val_loss": np.float64(3.25),
            "best": np.float64(27.5),
            "metrics": OrderedDict(
                default=[(0, "loss", "AverageMeter", {"val": 3.2, "sum": 32.0, "count": 10, "round": 3})]
            ),
            "previous_training_time": 123.4,
        },
        "last_optimizer_state": {
            "state": {
                0: {
                    "step": torch.tensor(1200.0),
                    "exp_avg": torch.zeros_like(first),
                    "exp_avg_sq": torch.zeros_like(first),
                }
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}],
            "loss_scale": 64.0,
        },
        "task_state": {},
    }
    if style == "cfg":
        state["cfg"] = _fairseq_cfg(model_args)
    return state


def write_fairseq_deltalm(model, path, **kwargs) -> Path:
    return save(fairseq_checkpoint(model, **kwargs), path)


# --- B: unilm pretrained DeltaLM ------------------------------------------------------------------

_UNILM_DECODER_FFN = {".fc3.": ".ffn_1.fc1.", ".fc4.": ".ffn_1.fc2.", ".fc1.": ".ffn_2.fc1.", ".fc2.": ".ffn_2.fc2."}


def unilm_checkpoint(model, *, extra_rows: int = 7, seed: int = 1) -> dict:
    """Format B: the pretrained release (``src_embedding`` / ``tgt_embedding``, ``ffn`` / ``ffn_1`` /
    ``ffn_2``), its token table ``extra_rows`` longer than the fine-tuning dictionary."""
    g = torch.Generator().manual_seed(seed)
    weights = OrderedDict()
    for k, v in canonical(model).items():
        if k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            continue
        if k == "encoder.embed_tokens.weight":
            v = torch.cat([v, 0.5 * torch.randn(extra_rows, v.shape[1], generator=g)])
            weights["src_embedding.embed_tokens.weight"] = v
            weights["tgt_embedding.embed_tokens.weight"] = v.clone()  # stored twice, equal
            continue
        side, _, rest = k.partition(".")
        if not rest.startswith("layers."):
            emb = "src_embedding." if side == "encoder" else "tgt_embedding."
            weights[emb + rest.replace("layernorm_embedding", "emb_layer_norm")] = v
            continue
        if side == "encoder":
            k = k.replace(".fc1.", ".ffn.fc1.").replace(".fc2.", ".ffn.fc2.")
        else:
            for ours, theirs in _UNILM_DECODER_FFN.items():
                if ours in k:
                    k = k.replace(ours, theirs)
                    break
        weights[k] = v
    return {"weights": weights}


def write_unilm_deltalm(model, path, **kwargs) -> Path:
    return save(unilm_checkpoint(model, **kwargs), path)


# --- C: Hugging Face XLM-R ------------------------------------------------------------------------


def hf_state_dict(model, *, token_type_seed: int = 2) -> tuple[dict[str, torch.Tensor], object]:
    """Canonical encoder-only (kind xlmr, roberta head) -> (XLMRobertaForMaskedLM state dict,
    XLMRobertaConfig). A random token-type row is split off the position table, so that
    HF's positions + token type 0 equal the canonical positions."""
    from transformers import XLMRobertaConfig

    cfg, sd = model.cfg, canonical(model)
    g = torch.Generator().manual_seed(token_type_seed)
    token_type = 0.3 * torch.randn(1, cfg.embed_dim, generator=g)
    hf = {
        "roberta.embeddings.word_embeddings.weight": sd["encoder.embed_tokens.weight"],
        "roberta.embeddings.position_embeddings.weight": sd["encoder.embed_positions.weight"] - token_type,
        "roberta.embeddings.token_type_embeddings.weight": token_type,
        "roberta.embeddings.LayerNorm.weight": sd["encoder.layernorm_embedding.weight"],
        "roberta.embeddings.LayerNorm.bias": sd["encoder.layernorm_embedding.bias"],
    }
    names = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for i in range(cfg.encoder_layers):
        for ours, theirs in names.items():
            for w in ("weight", "bias"):
                hf[f"roberta.encoder.layer.{i}.{theirs}.{w}"] = sd[f"encoder.layers.{i}.{ours}.{w}"]
    g2 = torch.Generator().manual_seed(token_type_seed + 1)
    hf["roberta.pooler.dense.weight"] = 0.1 * torch.randn(cfg.embed_dim, cfg.embed_dim, generator=g2)
    hf["roberta.pooler.dense.bias"] = 0.1 * torch.randn(cfg.embed_dim, generator=g2)
    if cfg.mlm_head:
        for part in ("dense", "layer_norm"):
            for w in ("weight", "bias"):
                hf[f"lm_head.{part}.{w}"] = sd[f"mlm_head.{part}.{w}"]
        hf["lm_head.bias"] = sd["mlm_head.bias"]
        hf["lm_head.decoder.weight"] = sd["encoder.embed_tokens.weight"]
        hf["lm_head.decoder.bias"] = sd["mlm_head.bias"]
    config = XLMRobertaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act="gelu",
        max_position_embeddings=cfg.max_positions + cfg.pad + 1,
        type_vocab_size=1,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad,
        bos_token_id=cfg.bos,
        eos_token_id=cfg.eos,
    )
    return hf, config


def write_hf_xlmr(model, directory, *, weights: str = "safetensors") -> Path:
    """Format C as a directory. ``weights="safetensors"``: written by ``save_pretrained``;
    ``"bin"``: ``pytorch_model.bin`` as older releases ship it (tied copies and the
    ``position_ids`` buffer included) beside ``config.json``."""
    from transformers import XLMRobertaForMaskedLM, XLMRobertaModel

    directory = Path(directory)
    sd, config = hf_state_dict(model)
    if weights == "bin":
        directory.mkdir(parents=True, exist_ok=True)
        config.to_json_file(str(directory / "config.json"))
        sd = dict(sd)
        sd["roberta.embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
        torch.save(sd, directory / "pytorch_model.bin")
        return directory
    if model.cfg.mlm_head:
        hf_model = XLMRobertaForMaskedLM(config)  # has no pooler; the released .bin files do
        sd = {k: v for k, v in sd.items() if not k.startswith("roberta.pooler.")}
    else:
        hf_model = XLMRobertaModel(config, add_pooling_layer=True)
        sd = {k.removeprefix("roberta."): v for k, v in sd.items()}
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m], (missing, unexpected)
    hf_model.save_pretrained(str(directory))
    return directory


# --- D: XLM ---------------------------------------------------------------------------------------


def xlm_checkpoint(model, *, module_prefix: bool = False) -> dict:
    """Format D: ``model`` (XLM names), ``params`` (a plain dict, as XLM's trainer saves it, numpy
    array and tensor included), ``dico_id2word`` / ``dico_word2id`` / ``dico_counts``."""
    cfg, sd = model.cfg, canonical(model)
    w = OrderedDict()
    w["position_embeddings.weight"] = sd["encoder.embed_positions.weight"]
    w["embeddings.weight"] = sd["encoder.embed_tokens.weight"]
    w["layer_norm_emb.weight"] = sd["encoder.layernorm_embedding.weight"]
    w["layer_norm_emb.bias"] = sd["encoder.layernorm_embedding.bias"]
    parts = [
        ("attentions.{i}.q_lin", "self_attn.q_proj"),
        ("attentions.{i}.k_lin", "self_attn.k_proj"),
        ("attentions.{i}.v_lin", "self_attn.v_proj"),
        ("attentions.{i}.out_lin", "self_attn.out_proj"),
        ("layer_norm1.{i}", "self_attn_layer_norm"),
        ("ffns.{i}.lin1", "fc1"),
        ("ffns.{i}.lin2", "fc2"),
        ("layer_norm2.{i}", "final_layer_norm"),
    ]
    for theirs, ours in parts:  # XLM's ModuleLists: all attentions, then all layer_norm1, ...
        for i in range(cfg.encoder_layers):
            for suffix in ("weight", "bias"):
                w[f"{theirs.format(i=i)}.{suffix}"] = sd[f"encoder.layers.{i}.{ours}.{suffix}"]
    if cfg.mlm_head:
        w["pred_layer.proj.weight"] = sd["encoder.embed_tokens.weight"]
        w["pred_layer.proj.bias"] = sd["mlm_head.bias"]
    if module_prefix:
        w = OrderedDict(("module." + k, v) for k, v in w.items())
    words = ["<s>", "</s>", "<pad>", "<unk>"] + [f"<special{i}>" for i in range(10)]
    words += [f"w{i}" for i in range(cfg.vocab_size - len(words))]
    counts = {word: (0 if i < 14 else 1000 - i) for i, word in enumerate(words)}
    params = {
        "dump_path": "./dumped/mlm_en",
        "exp_name": "mlm_en",
        "emb_dim": cfg.embed_dim,
        "n_layers": cfg.encoder_layers,
        "n_heads": cfg.heads,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "gelu_activation": True,
        "share_inout_emb": True,
        "sinusoidal_embeddings": False,
        "use_lang_emb": True,
        "asm": False,
        "encoder_only": True,
        "n_langs": 1,
        "langs": ["en"],
        "lang2id": {"en": 0},
        "id2lang": {0: "en"},
        "mlm_steps": [("en", None)],
        "n_words": cfg.vocab_size,
        "bos_index": 0,
        "eos_index": 1,
        "pad_index": 2,
        "unk_index": 3,
        "mask_index": 5,
        "word_pred": 0.15,
        "sample_alpha": 0.0,
        "lambda_mlm": "1",
        "pred_probs": torch.FloatTensor([0.8, 0.1, 0.1]),
        "mask_scores": np.maximum(np.array(list(counts.values()), dtype=np.float64), 1) ** -0.0,
    }
    return {
        "model": w,
        "dico_id2word": dict(enumerate(words)),
        "dico_word2id": {word: i for i, word in enumerate(words)},
        "dico_counts": counts,
        "params": params,
    }


def write_xlm(model, path, **kwargs) -> Path:
    return save(xlm_checkpoint(model, **kwargs), path)
