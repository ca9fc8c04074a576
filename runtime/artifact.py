"""Artifact directories: everything a runtime needs, described by ``manifest.json``.

Layout: encoder.onnx, decoder_step.onnx, weights.data (the weights of both graphs, each tensor
once; artifacts of earlier versions have one .onnx.data per graph, or none), spm.model, dict.txt,
parity.json, manifest.json, and optionally engines/ (TensorRT). Every file listed in the
manifest is sha256-checked when the artifact is opened (a file already checked on this machine
and unchanged since is not read again: ``VerifiedFiles``).

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
from dataclasses import dataclass
from pathlib import Path

from .atomic import _stale_work_dir
from .config import ModelConfig
from .errors import ArtifactError, DeltaLMError
from .graphs import GraphSpec
from .manifest import DECODER_FORMAT, FORMAT_VERSION, MANIFEST, GraphEntry, Manifest

__all__ = [
    "Artifact",
    "open_artifact",
    "check_can_decode",
    "read_manifest",
    "verify_files",
    "hash_files",
    "sha256_file",
    "describe_artifact",
    "Manifest",
    "FORMAT_VERSION",
    "MANIFEST",
]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_can_decode(artifact: Artifact) -> None:
    """ArtifactError in one line unless this runtime can translate with ``artifact``: an
    encoder-decoder model whose decoder step has this runtime's interface (format >= DECODER_FORMAT)."""
    cfg = artifact.config
    if not cfg.is_encoder_decoder:
        raise ArtifactError(f"{artifact.path}: an encoder-only model ({cfg.kind}) cannot translate")
    version = artifact.manifest.format_version
    if version < DECODER_FORMAT:
        source = artifact.manifest.source.checkpoint or "CHECKPOINT"
        tokenizer = artifact.manifest.tokenizer
        spm = artifact.path / tokenizer["spm"] if "spm" in tokenizer else "SPM_MODEL"
        dictionary = artifact.path / tokenizer["dict"] if "dict" in tokenizer else "DICT_TXT"
        raise ArtifactError(
            f"{artifact.path} was exported by an older deltalm (artifact format {version}); this version decodes "
            f"format {DECODER_FORMAT} (a decoder step with per-row positions): export it again with "
            f"`deltalm export {source} --spm {spm} --dict {dictionary} --out NEW_DIR`"
        )


@dataclass
class Artifact:
    """An opened artifact directory: ``path`` and its typed ``manifest``."""

    path: Path
    manifest: Manifest

    @property
    def config(self) -> ModelConfig:
        return self.manifest.model

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def topk(self) -> int:
        """k of the decoder step's in-graph top-k (beams up to k // 2 take the fast path)."""
        return self.manifest.topk

    def graph(self, name: str) -> GraphEntry:
        try:
            return self.manifest.graphs[name]
        except KeyError:
            raise ArtifactError(f"{self.path}: the manifest has no graph {name!r}") from None

    def graph_spec(self, name: str) -> GraphSpec:
        return self.graph(name).spec

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name).file

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.graphs

    @property
    def spm_path(self) -> Path:
        return self.path / self.manifest.tokenizer["spm"]

    @property
    def dict_path(self) -> Path:
        return self.path / self.manifest.tokenizer["dict"]

    @property
    def parity(self) -> dict | None:
        """The export's parity report (parity.json), or None when there is none."""
        path = self.path / "parity.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


# --- reading --------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> Manifest:
    """The typed manifest of an artifact directory, its structure checked (not its files)."""
    path = Path(path)
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
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: not an artifact directory (no {MANIFEST}); create one with `deltalm export`")
    return Manifest.read(path)


def require_directory_not_checkpoint(path: str | Path, command: str) -> None:
    """A file given where ``deltalm COMMAND`` wants an artifact directory: one line saying to
    export it first, with the command that does."""
    if Path(path).is_file():
        raise ArtifactError(
            f"{path} is a file (a checkpoint?), not an artifact directory: export it first with "
            f"`deltalm export {path} --spm SPM --dict DICT --out DIR`, then run `deltalm {command} DIR`"
        )


def verify_files(path: Path, manifest: Manifest, names: list[str]) -> None:
    """Presence and sha256 of ``names`` (those the manifest lists; others are not checked).
    A file this machine already verified and that has not changed since (``VerifiedFiles``) is
    not read again."""
    verified = VerifiedFiles.open()
    for name in names:
        digest = manifest.files.get(name)
        if digest is None:
            continue
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: missing file {name} (listed in {MANIFEST})")
        before = VerifiedFiles.identity(f)
        if verified.known(f, digest, before):
            continue
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch with {MANIFEST}: the file was modified or is corrupt")
        verified.add(f, digest, before)
    verified.save()


class VerifiedFiles:
    """The files whose sha256 this machine has checked, with their identity at the time (device,
    inode, size, mtime and ctime in ns), in ``$XDG_CACHE_HOME/deltalm/verified.json``: a service
    restarted on the same artifact does not read 1.5 GB again to hash it. A file whose identity
    changed in any way (rewritten, copied, replaced, touched) is hashed again; ctime cannot be set
    from user space, so bytes cannot change under an unchanged identity except below the file
    system. Like git's index, a file changed within ``RACY_S`` of its check is not recorded (a
    second write in the same clock tick could keep its times). ``DELTALM_VERIFY=full`` hashes
    every time; a cache that cannot be read or written is ignored."""

    RACY_S = 2.0

    def __init__(self, path: Path | None, entries: dict):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def open(cls) -> VerifiedFiles:
        import os

        if os.environ.get("DELTALM_VERIFY") == "full":
            return cls(None, {})
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = root / "deltalm" / "verified.json"
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries)

    @staticmethod
    def identity(f: Path) -> list[int]:
        st = f.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def known(self, f: Path, digest: str, identity: list[int]) -> bool:
        entry = self.entries.get(str(f.resolve()))
        return self.path is not None and entry == {"sha256": digest, "identity": identity}

    def add(self, f: Path, digest: str, identity: list[int]) -> None:
        """Record ``f`` as matching ``digest``, hashed while it had ``identity``: not recorded if it
        changed meanwhile (the bytes hashed may be a mix of two versions) or too recently."""
        import time

        if self.path is None or self.identity(f) != identity:
            return
        if time.time_ns() - max(identity[3], identity[4]) < self.RACY_S * 1e9:
            return
        self.entries[str(f.resolve())] = {"sha256": digest, "identity": identity}
        self.changed = True

    def save(self) -> None:
        if not self.changed or self.path is None:  # add() records nothing without a path
            return
        from .atomic import atomic_output

        try:
            entries = {k: v for k, v in self.entries.items() if Path(k).exists()}  # forget removed files
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.path) as f:
                f.write(json.dumps(entries).encode())
        except (OSError, DeltaLMError):  # a read-only home, a full disk: the next load hashes again
            pass


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory: manifest version and structure, presence and (with
    ``verify``) sha256 of every file. Any problem is an ArtifactError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in manifest.files:  # every file there before any is hashed: a missing one fails fast
        if not (path / name).is_file():
            raise ArtifactError(f"{path}: missing file {name} (listed in {MANIFEST})")
    if verify:
        verify_files(path, manifest, list(manifest.files))
    return Artifact(path, manifest)


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file, each file read once (a name listed twice is hashed once)."""
    return {n: sha256_file(root / n) for n in sorted(set(names))}


def describe_artifact(artifact: Artifact) -> dict:
    """What ``deltalm inspect DIR`` shows: model, precision, graphs, in-graph k, engines, parity."""
    m = artifact.manifest
    cfg = artifact.config
    engines = m.engines
    info = {
        "artifact": str(artifact.path),
        "format_version": m.format_version,
        "created": m.created,
        "model": f"{cfg.kind}, {cfg.embed_dim}d, {cfg.encoder_layers}+{cfg.decoder_layers if cfg.is_encoder_decoder else 0} "
        f"layers, {cfg.heads} heads, vocab {cfg.vocab_size}, {cfg.max_positions} positions",
        "precision": m.precision,
        "topk": m.topk,
        "graphs": {name: ", ".join(g.files) for name, g in m.graphs.items()},
        "size_mb": round(
            sum((artifact.path / f).stat().st_size for f in m.files if (artifact.path / f).is_file()) / 2**20, 1
        ),
        "source": m.source.checkpoint,
        "engines": "none" if engines is None else f"{engines.precision} (TensorRT {engines.tensorrt}, {engines.gpu})",
    }
    report = artifact.parity
    if report is None:
        parity = "no parity report"
    else:
        parity = "passed" if report.get("passed") else f"FAILED ({len(report.get('failures', []))} failures)"
        for r in report.get("end_to_end") or []:
            parity += f"; beam {r['beam']}: {r['identical_ids']:.0%} identical"
    info["parity"] = parity
    return info
