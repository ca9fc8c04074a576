"""Model configuration: one dataclass, presets as data in ``configs/*.json``.

Shared by the exporter (to build the PyTorch model) and the runtime (read back from an
artifact's manifest), so it must not import torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import DeltaLMError

# configs/ in the source tree, deltalm/configs/ in an installed wheel: the same package either way.
CONFIG_DIR = Path(str(resources.files("deltalm.configs")))


class ConfigError(DeltaLMError):
    """A configuration file or field is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeltaLM (encoder + interleaved decoder) or of an encoder-only model.

    ``kind``: "deltalm" (encoder-decoder), "xlmr" or "xlm" (encoder only, with optional MLM head).
    Positions follow fairseq: a real token's position is ``first_position`` + its index among the
    non-pad tokens of its row; pad tokens get ``pad_position``.
    """

    kind: str = "deltalm"
    embed_dim: int = 768
    ffn_dim: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 6
    heads: int = 12
    vocab_size: int = 250001
    max_positions: int = 512  # usable positions; the table has max_positions + first_position rows
    layernorm_embedding: bool = True
    layer_norm_eps: float = 1e-5
    bos: int = 0
    pad: int = 1
    eos: int = 2
    unk: int = 3
    first_position: int = 2
    pad_position: int = 1
    # Encoder-only heads: "roberta" (dense, gelu, layer_norm, tied decoder + bias),
    # "xlm" (tied projection + bias) or "" (no head).
    mlm_head: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("deltalm", "xlmr", "xlm"):
            raise ConfigError(f"unknown model kind {self.kind!r} (expected deltalm, xlmr or xlm)")
        if self.embed_dim % self.heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.mlm_head not in ("", "roberta", "xlm"):
            raise ConfigError(f"unknown mlm_head {self.mlm_head!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.kind == "deltalm"

    @property
    def position_rows(self) -> int:
        return self.max_positions + self.first_position

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, default = data[f.name], f.default
            ok = (
                isinstance(value, bool)
                if isinstance(default, bool)
                else isinstance(value, int) and not isinstance(value, bool)
                if isinstance(default, int)
                else isinstance(value, (int, float)) and not isinstance(value, bool)
                if isinstance(default, float)
                else isinstance(value, str)
            )
            if not ok:
                raise ConfigError(f"config field {f.name} must be a {type(default).__name__}, got {value!r}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        data = _read_json_object(Path(path))
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset from ``configs/NAME.json`` (deltalm-base, deltalm-large, tiny, ...)."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.exists():
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise ConfigError(f"unknown preset {name!r} (available: {presets})")
        return cls.from_file(path)


def resolve_config(spec: str | Path) -> ModelConfig:
    """A preset name or a path to a JSON config file."""
    p = Path(spec)
    if p.suffix == ".json" or p.exists():
        return ModelConfig.from_file(p)
    return ModelConfig.from_name(str(spec))


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_overrides(spec: str | Path) -> dict:
    """The fields a config file sets (used to override what a checkpoint says)."""
    p = Path(spec)
    if p.suffix == ".json" or p.exists():
        data = _read_json_object(p)
        try:
            ModelConfig.from_dict({**ModelConfig().to_dict(), **data})  # validate
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        return data
    return ModelConfig.from_name(str(spec)).to_dict()


__all__ = ["ModelConfig", "ConfigError", "resolve_config", "config_overrides", "CONFIG_DIR"]
