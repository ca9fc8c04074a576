"""Artifact directories: everything a runtime needs, described by ``manifest.json``.

Layout: encoder.onnx, decoder_step.onnx (+ .data external weights for large models), spm.model,
dict.txt, parity.json, manifest.json, and optionally engines/ (TensorRT). Every file listed in the
manifest is sha256-checked when the artifact is opened.

An export writes into a hidden sibling ``.NAME.partial-PID`` and renames it to ``NAME`` when
complete; replacing an artifact sets the old one aside as ``.NAME.old-PID`` for the moment of the
swap. A process killed mid-way can leave either behind: such *work directories* of a process that
is gone are refused by ``read_manifest`` (they are never an artifact), and
``clean_stale_work_dirs`` removes them (restoring a set-aside artifact whose replacement never
arrived).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import _stale_work_dir
from .config import ModelConfig
from .errors import ArtifactError, DeltaLMError
from .graphs import GraphSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


# --- reading --------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (no such directory)")
    stale = _stale_work_dir(path.absolute())
    if stale:
        name, kind, pid = stale
        if kind == "old" and not (path.parent / name).exists():
            raise ArtifactError(
                f"{path}: the previous {name}, set aside by an export (process {pid}) that was interrupted "
                f"while replacing it; rename it back to {name} to use it"
            )
        what = "an unfinished export" if kind == "partial" else f"a replaced copy of {name}"
        raise ArtifactError(f"{path}: not an artifact: {what}, left by process {pid}, which is gone; delete it")
    if not mpath.exists():
        raise ArtifactError(f"{path}: not an artifact directory (no {MANIFEST}); create one with `deltalm export`")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"{mpath}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{mpath}: not a deltalm manifest (no format_version)")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{mpath}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: manifest format version {version} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade deltalm-deploy"
        )
    return manifest


def _check_structure(path: Path, manifest: dict) -> None:
    """Everything the runtime reads from the manifest is there, of the right type, and every file
    it names is a hashed file inside the directory, so that a hand-edited or foreign manifest is
    one ArtifactError instead of a KeyError deep in a backend."""
    mpath = path / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
    ):
        raise ArtifactError(f"{mpath}: 'files' must map file names to sha256 hex digests")
    for name in files:
        parts = PurePosixPath(name).parts
        if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise ArtifactError(f"{mpath}: file {name!r} is outside the artifact directory")
    try:
        ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{mpath}: no valid 'model' section ({type(e).__name__}: {e})") from None
    except DeltaLMError as e:
        raise ArtifactError(f"{mpath}: 'model' section: {e}") from None
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        raise ArtifactError(f"{mpath}: no 'graphs' section")
    referenced = []
    for name, entry in graphs.items():
        try:
            GraphSpec.from_dict(entry["spec"])
            referenced += [entry["file"], *entry.get("files", [])]
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(
                f"{mpath}: graph {name!r} is not described completely ({type(e).__name__}: {e})"
            ) from None
    tokenizer = manifest.get("tokenizer", {})
    if not isinstance(tokenizer, dict):
        raise ArtifactError(f"{mpath}: 'tokenizer' must map spm / dict to file names")
    referenced += list(tokenizer.values())
    unhashed = sorted({str(f) for f in referenced} - set(files))
    if unhashed:
        raise ArtifactError(f"{mpath}: {', '.join(unhashed)} not listed (with a sha256) in 'files'")


def verify_files(path: Path, manifest: dict, names: list[str]) -> None:
    """Presence and sha256 of ``names`` (those the manifest lists; others are not checked)."""
    for name in names:
        digest = manifest.get("files", {}).get(name)
        if digest is None:
            continue
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: missing file {name} (listed in {MANIFEST})")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch with {MANIFEST}: the file was modified or is corrupt")


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory: manifest version and structure, presence and (with
    ``verify``) sha256 of every file. Any problem is an ArtifactError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_structure(path, manifest)
    for name in manifest["files"]:  # every file there before any is hashed: a missing one fails fast
        if not (path / name).is_file():
            raise ArtifactError(f"{path}: missing file {name} (listed in {MANIFEST})")
    if verify:
        verify_files(path, manifest, list(manifest["files"]))
    return Artifact(path, manifest)


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(root / n) for n in sorted(names)}


def describe_artifact(artifact: Artifact) -> dict:
    """What ``deltalm inspect DIR`` shows: model, precision, graphs, in-graph k, engines, parity."""
    m = artifact.manifest
    cfg = artifact.config
    info = {
        "artifact": str(artifact.path),
        "format_version": m.get("format_version"),
        "created": m.get("created"),
        "model": f"{cfg.kind}, {cfg.embed_dim}d, {cfg.encoder_layers}+{cfg.decoder_layers if cfg.is_encoder_decoder else 0} "
                 f"layers, {cfg.heads} heads, vocab {cfg.vocab_size}, {cfg.max_positions} positions",
        "precision": artifact.precision,
        "topk": (m.get("export_options") or {}).get("topk"),
        "graphs": {name: ", ".join(entry.get("files", [entry.get("file")])) for name, entry in m.get("graphs", {}).items()},
        "size_mb": round(sum((artifact.path / f).stat().st_size for f in m.get("files", {})
                             if (artifact.path / f).is_file()) / 2**20, 1),
        "source": (m.get("source") or {}).get("checkpoint"),
        "engines": "none" if not m.get("engines") else
                   f"{m['engines'].get('precision')} (TensorRT {m['engines'].get('tensorrt')}, {m['engines'].get('gpu')})",
    }
    parity_path = artifact.path / "parity.json"
    if parity_path.is_file():
        try:
            report = json.loads(parity_path.read_text())
            info["parity"] = "passed" if report.get("passed") else f"FAILED ({len(report.get('failures', []))} failures)"
            e2e = report.get("end_to_end") or []
            if e2e:
                info["parity"] += "; " + ", ".join(f"beam {r['beam']}: {r['identical_ids']:.0%} identical" for r in e2e)
        except (OSError, ValueError, KeyError, TypeError):
            info["parity"] = "unreadable parity.json"
    else:
        info["parity"] = "no parity.json"
    return info
