"""The PyTorch reference backend: runs ``EncoderGraph`` / ``DecoderStepGraph`` eagerly, on the
same feeds as the exported graphs (``deltalm.backends.Backend``)."""

from __future__ import annotations

import numpy as np
import torch

from deltalm.backends.interface import BatchLimits, Encoded, StepOutput
from deltalm.config import ModelConfig
from deltalm.errors import InputError

from .graphs import DecoderStepGraph, EncoderGraph

DEFAULT_TOPK = 10


class TorchBackend:
    def __init__(self, model: torch.nn.Module, topk: int = DEFAULT_TOPK, threads: int | None = None):
        if not model.cfg.is_encoder_decoder:
            raise InputError(f"an encoder-only model ({model.cfg.kind}) cannot translate")
        self.cfg: ModelConfig = model.cfg  # the model's own attribute: torch types it Tensor | Module
        self.model = model.eval()
        self.encoder = EncoderGraph(model)
        self.decoder = DecoderStepGraph(model, topk)
        self.topk = self.decoder.k
        self.step_spec = self.decoder.spec()
        self.float_dtype = np.dtype(np.float32)
        self.limits = BatchLimits()
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def from_source(cls, source, config=None, dict_path=None, threads=None, device="cpu", **_) -> TorchBackend:
        """source: an nn.Module with .cfg, a LoadedCheckpoint, a checkpoint path, or an artifact
        directory (whose manifest names the checkpoint it was exported from)."""
        from pathlib import Path

        from .checkpoints import LoadedCheckpoint, build_model

        if device != "cpu":
            raise InputError("--backend torch runs on the CPU here; use --backend ort --device cuda for a GPU")
        if isinstance(source, torch.nn.Module):
            return cls(source, threads=threads)
        if isinstance(source, LoadedCheckpoint):
            return cls(build_model(source), threads=threads)
        path = Path(source)
        if path.is_dir() and (path / "manifest.json").exists():
            from deltalm.artifact import open_artifact

            artifact = open_artifact(path)
            src = artifact.manifest.source
            path = Path(src.checkpoint or "")
            if not path.exists():
                raise InputError(f"the checkpoint {str(path)!r} recorded in {source}/manifest.json is not available")
            config, dict_path = src.config, artifact.dict_path
        from .checkpoints import load_for_export

        return cls(
            build_model(load_for_export(str(path), config, str(dict_path) if dict_path else None)), threads=threads
        )

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def encode(self, src_tokens: np.ndarray) -> Encoded:
        src = torch.from_numpy(np.ascontiguousarray(src_tokens, dtype=np.int64))
        outs = self.encoder(src)
        return Encoded(cross=[t.numpy() for t in outs[1:]], padding=src.eq(self.cfg.pad).numpy())

    @torch.inference_mode()
    def run_step(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        outs = self.decoder(*self.decoder.inputs({name: torch.from_numpy(np.asarray(a)) for name, a in feeds.items()}))
        return StepOutput.from_outputs(self.cfg, {t.name: o.numpy() for t, o in zip(self.step_spec.outputs, outs)})
