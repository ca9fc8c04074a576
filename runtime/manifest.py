"""``manifest.json``, declared once: the typed schema every writer and reader goes through.

An artifact directory is described by one ``Manifest``: the model's configuration, the precision,
each graph (its files and its interface, a ``GraphSpec``), the tokenizer files, what the export
was given and ran with, the TensorRT engines when built, and the sha256 of every file.
``Manifest.from_dict`` checks the structure and names the first problem (a hand-edited or
foreign manifest is one ``ArtifactError``, not a KeyError deep in a backend); ``to_dict`` writes
the same JSON layout as format version 1 had, so older artifacts stay readable (format 2
changed the decoder step's interface, not the layout).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .atomic import write_json_atomic
from .config import ModelConfig
from .errors import ArtifactError, DeltaLMError
from .graphs import GraphSpec

# 2: the decoder step takes per-row positions and rules and a cache the caller owns (continuous
# decoding); a format-1 artifact can be inspected but not decoded: it must be exported again.
FORMAT_VERSION = 2
DECODER_FORMAT = 2  # the oldest format whose decoder step this runtime runs
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GraphEntry:
    file: str  # the .onnx file
    files: tuple[str, ...]  # the .onnx file and its external data, if any
    spec: GraphSpec

    def to_dict(self) -> dict:
        return {"file": self.file, "files": list(self.files), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> GraphEntry:
        return cls(d["file"], tuple(d.get("files", [d["file"]])), GraphSpec.from_dict(d["spec"]))


@dataclass(frozen=True)
class ExportOptions:
    topk: int  # k of the decoder step's in-graph top-k
    opset: int = 17
    exporter: str = ""
    tolerance: float | None = None  # fp32 parity limit (max abs); None for reduced precisions
    ort_graph_optimization: str = ""
    ort_fusions: dict = field(default_factory=dict)  # graph -> {fused op: count}, as ORT applies them


@dataclass(frozen=True)
class Source:
    """What the artifact was exported from (``deltalm parity`` and the torch backend reopen it)."""

    checkpoint: str | None = None
    format: str | None = None
    dtype: str | None = None
    config: str | None = None
    as_deltalm: bool = False


@dataclass(frozen=True)
class Engines:
    """TensorRT engines built for this artifact (``deltalm engines``)."""

    metadata: str  # engines/engines.json: per-engine profiles, sources and build details
    precision: str
    tensorrt: str
    gpu: str
    compute_capability: str
    files: dict[str, str]  # graph -> engine file


@dataclass
class Manifest:
    model: ModelConfig
    precision: str  # fp32 | fp16 | int8
    graphs: dict[str, GraphEntry]
    tokenizer: dict[str, str]  # "spm" / "dict" -> file name
    export_options: ExportOptions
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    source: Source = field(default_factory=Source)
    versions: dict[str, str] = field(default_factory=dict)  # torch, onnx, onnxruntime, python at export
    created: str = ""
    engines: Engines | None = None
    format_version: int = FORMAT_VERSION

    @property
    def topk(self) -> int:
        return self.export_options.topk

    def to_dict(self) -> dict:
        cfg = self.model
        d = {
            "format_version": self.format_version,
            "created": self.created,
            "model": cfg.to_dict(),
            "vocab": {"size": cfg.vocab_size, "bos": cfg.bos, "pad": cfg.pad, "eos": cfg.eos, "unk": cfg.unk},
            "precision": self.precision,
            "export_options": dataclasses.asdict(self.export_options),
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "tokenizer": dict(self.tokenizer),
            "source": dataclasses.asdict(self.source),
            "versions": dict(self.versions),
            "files": dict(sorted(self.files.items())),
        }
        if self.engines is not None:
            d["engines"] = dataclasses.asdict(self.engines)
        return d

    def write(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def from_dict(cls, d, where: str = MANIFEST) -> Manifest:
        """Check and type a parsed manifest; every problem is an ArtifactError naming ``where``."""
        if not isinstance(d, dict) or "format_version" not in d:
            raise ArtifactError(f"{where}: not a deltalm manifest (no format_version)")
        version = d["format_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"{where}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: manifest format version {version} is newer than this runtime supports "
                f"({FORMAT_VERSION}); upgrade deltalm-deploy"
            )
        files = d.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
        ):
            raise ArtifactError(f"{where}: 'files' must map file names to sha256 hex digests")
        for name in files:
            parts = PurePosixPath(name).parts
            if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
                raise ArtifactError(f"{where}: file {name!r} is outside the artifact directory")
        try:
            model = ModelConfig.from_dict(d["model"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where}: no valid 'model' section ({type(e).__name__}: {e})") from None
        except DeltaLMError as e:
            raise ArtifactError(f"{where}: 'model' section: {e}") from None
        raw_graphs = d.get("graphs")
        if not isinstance(raw_graphs, dict):
            raise ArtifactError(f"{where}: no 'graphs' section")
        graphs = {}
        for name, entry in raw_graphs.items():
            try:
                graphs[name] = GraphEntry.from_dict(entry)
            except (KeyError, TypeError, AttributeError) as e:
                raise ArtifactError(
                    f"{where}: graph {name!r} is not described completely ({type(e).__name__}: {e})"
                ) from None
        tokenizer = d.get("tokenizer", {})
        if not isinstance(tokenizer, dict) or not all(isinstance(v, str) for v in tokenizer.values()):
            raise ArtifactError(f"{where}: 'tokenizer' must map spm / dict to file names")
        referenced = [f for g in graphs.values() for f in (g.file, *g.files)] + list(tokenizer.values())
        unhashed = sorted(set(referenced) - set(files))
        if unhashed:
            raise ArtifactError(f"{where}: {', '.join(unhashed)} not listed (with a sha256) in 'files'")
        try:
            options = d.get("export_options") or {}
            export_options = ExportOptions(**{"topk": _topk_of(graphs), **options})
            source = Source(**(d.get("source") or {}))
            engines = Engines(**d["engines"]) if d.get("engines") else None
        except TypeError as e:
            raise ArtifactError(f"{where}: unexpected field ({e})") from None
        return cls(
            model=model,
            precision=str(d.get("precision", "fp32")),
            graphs=graphs,
            tokenizer=dict(tokenizer),
            export_options=export_options,
            files=dict(files),
            source=source,
            versions=dict(d.get("versions") or {}),
            created=str(d.get("created", "")),
            engines=engines,
            format_version=version,
        )

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ArtifactError(f"{path}: corrupt manifest ({type(e).__name__}: {e})") from None
        return cls.from_dict(data, str(path))


def _topk_of(graphs: dict[str, GraphEntry]) -> int:
    """k from the step graph's first output (manifests that predate ``export_options.topk``)."""
    step = graphs.get("decoder_step")
    k = step.spec.outputs[0].shape[-1] if step else 0
    return k if isinstance(k, int) else 0
