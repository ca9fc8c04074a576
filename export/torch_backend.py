"""The PyTorch reference backend: runs ``EncoderGraph`` / ``DecoderStepGraph`` eagerly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deltalm.graphs import cross_names, past_names

from .graphs import DecoderStepGraph, EncoderGraph

DEFAULT_TOPK = 10


@dataclass
class TorchState:
    cross: list[torch.Tensor]  # flat [k0, v0, k1, v1, ...], each [batch, H, S, hd]
    src_padding: torch.Tensor  # [batch, S] bool
    past: list[torch.Tensor] | None  # flat, each [rows, H, P, hd]


class TorchBackend:
    def __init__(self, model: torch.nn.Module, topk: int = DEFAULT_TOPK, threads: int | None = None):
        if not model.cfg.is_encoder_decoder:
            from deltalm.errors import InputError

            raise InputError(f"an encoder-only model ({model.cfg.kind}) cannot translate")
        self.cfg = model.cfg
        self.model = model.eval()
        self.encoder = EncoderGraph(model)
        self.decoder = DecoderStepGraph(model, topk)
        self.topk = self.decoder.k
        layers = range(self.cfg.decoder_layers)
        self._past_names = [name for i in layers for name in past_names(i)]
        self._cross_names = [name for i in layers for name in cross_names(i)]
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def from_source(cls, source, config=None, dict_path=None, threads=None, device="cpu", **_) -> "TorchBackend":
        """source: an nn.Module with .cfg, a LoadedCheckpoint, a checkpoint path, or an artifact
        directory (whose manifest names the checkpoint it was exported from)."""
        from pathlib import Path

        from .checkpoints import LoadedCheckpoint, build_model

        if device != "cpu":
            from deltalm.errors import InputError

            raise InputError("--backend torch runs on the CPU here; use --backend ort --device cuda for a GPU")
        if isinstance(source, torch.nn.Module):
            return cls(source, threads=threads)
        if isinstance(source, LoadedCheckpoint):
            return cls(build_model(source), threads=threads)
        path = Path(source)
        if path.is_dir() and (path / "manifest.json").exists():
            from deltalm.artifact import open_artifact
            from deltalm.errors import InputError

            artifact = open_artifact(path)
            src = artifact.manifest.source
            path = Path(src.checkpoint or "")
            if not path.exists():
                raise InputError(f"the checkpoint {str(path)!r} recorded in {source}/manifest.json is not available")
            config, dict_path = src.config, artifact.dict_path
        from .checkpoints import load_for_export

        return cls(build_model(load_for_export(str(path), config, str(dict_path) if dict_path else None)), threads=threads)

    @torch.inference_mode()
    def encode(self, src_tokens: np.ndarray) -> TorchState:
        src = torch.from_numpy(np.ascontiguousarray(src_tokens, dtype=np.int64))
        outs = self.encoder(src)
        return TorchState(cross=list(outs[1:]), src_padding=src.eq(self.cfg.pad), past=None)

    @torch.inference_mode()
    def step(self, state: TorchState, tokens, step, reorder, sent_index, rules, want="topk"):
        cfg = self.cfg
        rows = tokens.shape[0]
        if state.past is None:
            empty = torch.zeros(rows, cfg.heads, 0, cfg.head_dim, dtype=state.cross[0].dtype)
            state.past = [empty] * (2 * cfg.decoder_layers)
        feeds = {
            "tokens": torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
            "step": torch.tensor(step, dtype=torch.int64),
            "reorder": torch.from_numpy(np.asarray(reorder, dtype=np.int64)),
            "sent_index": torch.from_numpy(np.asarray(sent_index, dtype=np.int64)),
            "src_padding": state.src_padding,
            "forced_tokens": torch.from_numpy(np.asarray(rules.forced_tokens, dtype=np.int64)),
            "ban_eos": torch.tensor(bool(rules.ban_eos)),
            "only_eos": torch.tensor(bool(rules.only_eos)),
            "unk_penalty": torch.tensor(float(rules.unk_penalty), dtype=torch.float32),
        }
        feeds |= dict(zip(self._past_names, state.past, strict=True)) | dict(zip(self._cross_names, state.cross, strict=True))
        outs = self.decoder(*self.decoder.inputs(feeds))
        state.past = list(outs[3:])
        if want == "topk":
            return outs[0].numpy(), outs[1].numpy()
        return outs[2].numpy()
