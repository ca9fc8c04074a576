"""Artifact directories: everything a runtime needs, described by ``manifest.json``.

Layout: encoder.onnx, decoder_step.onnx (+ .data external weights for large models), spm.model,
dict.txt, parity.json, manifest.json, and optionally engines/ (TensorRT). Every file listed in the
manifest is sha256-checked when the artifact is opened.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import ArtifactError
from .graphs import GraphSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def graph_spec(self, name: str) -> GraphSpec:
        try:
            return GraphSpec.from_dict(self.manifest["graphs"][name]["spec"])
        except KeyError:
            raise ArtifactError(f"{self.path}: the manifest has no graph {name!r}") from None

    def graph_path(self, name: str) -> Path:
        try:
            return self.path / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise ArtifactError(f"{self.path}: the manifest has no graph {name!r}") from None

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.get("graphs", {})

    @property
    def spm_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["spm"]

    @property
    def dict_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["dict"]


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (no such directory)")
    if not mpath.exists():
        raise ArtifactError(f"{path}: not an artifact directory (no {MANIFEST}); create one with `deltalm export`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{mpath}: not a deltalm manifest (no format_version)")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: manifest format version {version} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade deltalm-deploy"
        )
    return manifest


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory: manifest version, presence and sha256 of every file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise ArtifactError(f"{path}: missing file {name} (listed in {MANIFEST})")
        if verify and sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch with {MANIFEST}: the file was modified or is corrupt")
    return Artifact(path, manifest)


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(root / n) for n in sorted(names)}
