"""The built-in demo model: a tiny DeltaLM fitted on a copy task over the toy multilingual corpus,
saved as a real fairseq fine-tuned checkpoint (format A), so the demo and the tests exercise the
same path as a user's ``checkpoint_best.pt``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from deltalm.config import ModelConfig

from .model import DeltaLM


def fairseq_model_cfg(cfg: ModelConfig) -> dict:
    """The architecture as fairseq 0.12 records it in ``cfg["model"]``."""
    return {
        "_name": "deltalm",
        "arch": "deltalm_base",
        "encoder_embed_dim": cfg.embed_dim,
        "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_layers": cfg.encoder_layers,
        "encoder_attention_heads": cfg.heads,
        "encoder_normalize_before": False,
        "decoder_embed_dim": cfg.embed_dim,
        "decoder_ffn_embed_dim": cfg.ffn_dim,
        "decoder_layers": cfg.decoder_layers,
        "decoder_attention_heads": cfg.heads,
        "decoder_normalize_before": False,
        "layernorm_embedding": cfg.layernorm_embedding,
        "no_scale_embedding": True,
        "share_all_embeddings": True,
        "max_source_positions": cfg.max_positions,
        "max_target_positions": cfg.max_positions,
        "activation_fn": "gelu",
        "dropout": 0.1,
    }


def save_fairseq_checkpoint(model: DeltaLM, path: Path) -> None:
    """Write ``model`` as fairseq writes a fine-tuned checkpoint: ``cfg`` (here a plain dict, which
    fairseq 0.12 turns into a DictConfig on load), ``model`` with fairseq's keys, and the training
    bookkeeping entries."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["encoder.version"] = torch.tensor([3.0])
    state["decoder.version"] = torch.tensor([3.0])
    checkpoint = {
        "args": None,
        "cfg": {
            "_name": None,
            "model": fairseq_model_cfg(model.cfg),
            "task": {"_name": "translation", "source_lang": "src", "target_lang": "tgt"},
        },
        "model": state,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "Adam",
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "extra_state": {"epoch": 1},
        "last_optimizer_state": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def train_copy_model(
    tokenizer, cfg: ModelConfig, steps: int = 300, batch_size: int = 32, seed: int = 0, log=None
) -> DeltaLM:
    """Fit ``cfg`` to copy the toy corpus (target = source), so greedy and beam search produce
    real, confident output. Deterministic for a given seed and thread count."""
    from .toy_data import toy_corpus

    torch.manual_seed(seed)
    model = DeltaLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.05)
    sentences = [tokenizer.encode(s) for s in toy_corpus()]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(sentences), (batch_size,), generator=g).tolist()
        batch = [sentences[i] for i in idx]
        src = torch.from_numpy(tokenizer.collate(batch))
        width = max(len(s) for s in batch)
        tgt = torch.full((batch_size, width), cfg.pad, dtype=torch.int64)
        prev = torch.full((batch_size, width), cfg.pad, dtype=torch.int64)
        for r, s in enumerate(batch):  # targets right-padded; prev = </s> + target[:-1]
            tgt[r, : len(s)] = torch.tensor(s)
            prev[r, : len(s)] = torch.tensor([cfg.eos] + s[:-1])
        lp = model(src, prev)
        loss = torch.nn.functional.nll_loss(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), ignore_index=cfg.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    return model.eval()


def build_demo_checkpoint(workdir: Path, steps: int = 300, log=None) -> tuple[Path, Path, Path]:
    """workdir/{spm.model, dict.txt, checkpoint_best.pt}; returns their paths."""
    from deltalm.tokenizer import Tokenizer

    from .toy_data import build_toy_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    spm, dict_path = build_toy_tokenizer(workdir)
    tokenizer = Tokenizer(spm, dict_path)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=len(tokenizer))
    model = train_copy_model(tokenizer, cfg, steps=steps, log=log)
    ckpt = workdir / "checkpoint_best.pt"
    save_fairseq_checkpoint(model, ckpt)
    return spm, dict_path, ckpt
