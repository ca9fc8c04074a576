"""The models a run measures: the demo checkpoint (tiny), a random deltalm-base-sized checkpoint
(base), or an artifact directory given by path; their exported artifacts per precision; and the
bytes of the files each backend loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .children import run_cli
from .progress import log

PRECISIONS = ("fp32", "fp16", "int8")
BASE_VOCAB = 250001


@dataclass(frozen=True)
class ModelFiles:
    name: str  # tiny | base
    checkpoint: Path
    spm: Path
    dict: Path

    def export_args(self, out: Path, precision: str) -> list[str]:
        """The arguments of ``deltalm export`` that write these files' artifact in ``precision``
        into ``out`` (replacing an artifact there)."""
        return [
            "export",
            str(self.checkpoint),
            "--spm",
            str(self.spm),
            "--dict",
            str(self.dict),
            "--out",
            str(out),
            "--precision",
            precision,
            "--force",
        ]


def write_filler_dictionary(dict_path: Path, symbols: int) -> int:
    """Extend a toy fairseq dict.txt with filler symbols ``<fill_N>`` until the Dictionary (4
    specials + one symbol per line) has exactly ``symbols`` entries. Returns the number of lines."""
    lines = dict_path.read_text(encoding="utf-8").splitlines()
    want = symbols - 4
    if len(lines) > want:
        raise ValueError(f"{dict_path} already has {len(lines)} lines, more than {want}")
    lines += [f"<fill_{i}> 0" for i in range(want - len(lines))]
    dict_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def prepare_tiny(model_dir: Path) -> ModelFiles:
    """The demo checkpoint (the tiny DeltaLM fitted on the copy task), built once under model_dir."""
    ckpt = model_dir / "checkpoint_best.pt"
    if not ckpt.exists():
        import torch

        from deltalm.export.toy_model import build_demo_checkpoint

        torch.set_num_threads(os.cpu_count() or 1)
        log(f"building the demo checkpoint in {model_dir}/")
        build_demo_checkpoint(model_dir)
    return ModelFiles("tiny", ckpt, model_dir / "spm.model", model_dir / "dict.txt")


def prepare_base(model_dir: Path, seed: int = 0, std: float = 0.02) -> ModelFiles:
    """A random deltalm-base-sized checkpoint (768 / 12 + 6 layers / 250001 vocab, weights
    N(0, std), biases 0, LayerNorms 1) saved as a fairseq checkpoint, and the toy sentencepiece
    model with a dict.txt padded with filler symbols to 250001 Dictionary entries. Cached."""
    ckpt = model_dir / "checkpoint_best.pt"
    spm, dict_path = model_dir / "spm.model", model_dir / "dict.txt"
    if ckpt.exists() and spm.exists() and dict_path.exists():
        return ModelFiles("base", ckpt, spm, dict_path)
    import torch

    from deltalm.config import ModelConfig
    from deltalm.export.model import DeltaLM
    from deltalm.export.toy_data import build_toy_tokenizer
    from deltalm.export.toy_model import save_fairseq_checkpoint

    model_dir.mkdir(parents=True, exist_ok=True)
    build_toy_tokenizer(model_dir)
    write_filler_dictionary(dict_path, BASE_VOCAB)
    cfg = ModelConfig.from_name("deltalm-base").replace(vocab_size=BASE_VOCAB)
    log(f"building a random deltalm-base checkpoint in {model_dir}/")
    torch.manual_seed(seed)
    with torch.no_grad():
        model = DeltaLM(cfg)
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
    tmp = ckpt.with_name(ckpt.name + ".partial")
    save_fairseq_checkpoint(model, tmp)
    os.replace(tmp, ckpt)
    return ModelFiles("base", ckpt, spm, dict_path)


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(name)
    return Path(spec.origin)


def export_code_fingerprint() -> str:
    """sha256 over the sources that decide what an export writes (the modules of deltalm.export,
    and the runtime's config and graph declarations), found through the import system so that an
    installed package fingerprints its own files: an artifact exported by other code is redone,
    so every backend of a run measures graphs of the same version."""
    export_dir = _module_file("deltalm.export").parent
    paths = sorted(export_dir.glob("*.py")) + [_module_file("deltalm.config"), _module_file("deltalm.graphs")]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def export_artifacts(files: ModelFiles, art_root: Path, precisions=PRECISIONS) -> dict:
    """``deltalm export`` per precision into art_root/PRECISION, each in a child process (wall time,
    peak RSS). An artifact that exists and was exported by the current export code is kept, with
    the figures of the run that exported it. Every export must pass its parity verdict (on text
    sampled from the model's sentencepiece model: see deltalm.export.parity); one that fails stops
    the run, with the export's message."""
    record_path = art_root / "exports.json"
    records = json.loads(record_path.read_text()) if record_path.exists() else {}
    code = export_code_fingerprint()
    for precision in precisions:
        out = art_root / precision
        if (out / "manifest.json").exists() and records.get(precision, {}).get("export_code") == code:
            records[precision]["reused"] = True
            continue
        log(f"exporting {files.name} {precision} -> {out}")
        peak, res = run_cli(
            files.export_args(out, precision),
            art_root / f".export-{precision}.json",
        )
        if res.returncode != 0:
            raise RuntimeError(f"export {precision} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        parity = json.loads((out / "parity.json").read_text())
        records[precision] = {
            "wall_s": round(res.wall_s, 1),
            "peak_rss_mb": round(peak),
            "timings_s": parity.get("timings_s"),
            "reused": False,
            "export_code": code,
            "end_to_end": parity.get("end_to_end"),
            "parity_passed": parity.get("passed"),
            "parity_failures": parity.get("failures", []),
        }
        art_root.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(records, indent=2) + "\n")
    return records


def given_artifact(path: Path) -> dict[str, Path]:
    """``--model DIR``: {precision: DIR} for an artifact directory (its manifest says the
    precision). Raises InputError naming what is wrong otherwise."""
    from deltalm.artifact import read_manifest
    from deltalm.errors import InputError

    if not path.exists():
        raise InputError(f"--model {path}: no such artifact directory (or use tiny | base)")
    if not path.is_dir():
        raise InputError(f"--model {path}: a file, not an artifact directory (export it first: deltalm export)")
    if not (path / "manifest.json").exists():
        raise InputError(
            f"--model {path}: no manifest.json, not an artifact directory (export one with deltalm export)"
        )
    manifest = read_manifest(path)
    return {manifest.precision: path.resolve()}


def loaded_files_bytes(artifact_dir: Path, kind: str) -> int:
    """Bytes of the files a backend of ``kind`` loads from an artifact: the ONNX graphs (weights
    included) and tokenizer files for ort, the engines and tokenizer files for trt, the
    checkpoint the manifest names and the tokenizer files for torch."""
    from deltalm.artifact import read_manifest

    manifest = read_manifest(artifact_dir)
    names = [manifest.tokenizer["spm"], manifest.tokenizer["dict"]]
    if kind == "torch":
        ckpt = Path(manifest.source.checkpoint or "")
        files = [ckpt] if not ckpt.is_dir() else [p for p in ckpt.rglob("*") if p.is_file()]
        return sum(f.stat().st_size for f in files if f.exists()) + sum(
            (artifact_dir / n).stat().st_size for n in names
        )
    if kind == "trt":
        engines = Path(artifact_dir) / "engines"
        return sum(p.stat().st_size for p in engines.rglob("*") if p.is_file()) + sum(
            (artifact_dir / n).stat().st_size for n in names
        )
    return graph_bytes(artifact_dir) + sum((Path(artifact_dir) / n).stat().st_size for n in names)


def graph_bytes(artifact_dir: Path) -> int:
    """Bytes of the ONNX files (weights included) the ort backend loads: encoder + decoder_step."""
    from deltalm.artifact import read_manifest

    graphs = read_manifest(artifact_dir).graphs
    return sum(
        (Path(artifact_dir) / f).stat().st_size
        for f in {f for g in ("encoder", "decoder_step") for f in graphs[g].files}
    )
