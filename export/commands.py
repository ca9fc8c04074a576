"""``deltalm inspect | export | parity | engines``: the export side of the CLI."""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

from deltalm.artifact import FORMAT_VERSION, MANIFEST, hash_files, open_artifact
from deltalm.atomic import atomic_directory, write_json_atomic
from deltalm.config import config_overrides
from deltalm.errors import ArtifactError, ExportError, InputError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dictionary_size(dict_path) -> int | None:
    if not dict_path:
        return None
    from deltalm.tokenizer import Dictionary

    return len(Dictionary.load(dict_path))


def load_for_export(checkpoint: str, config: str | None, dict_path: str | None, as_deltalm: bool = False):
    from .checkpoints import load_checkpoint

    if not Path(checkpoint).exists():
        raise InputError(f"{checkpoint}: no such checkpoint file or directory")
    overrides = config_overrides(config) if config else None
    return load_checkpoint(checkpoint, overrides=overrides, vocab_size=_dictionary_size(dict_path), as_deltalm=as_deltalm,
                           vocab_source=dict_path)


def inspect_command(args) -> int:
    from .checkpoints import describe

    loaded = load_for_export(args.checkpoint, args.config, args.dict)
    info = describe(loaded)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        elif isinstance(value, list):
            print(f"{key}: {'none' if not value else ''}")
            for v in value:
                print(f"  - {v}")
        else:
            print(f"{key}: {value}")
    return 0


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def export_command(args) -> int:
    out = Path(args.out)
    precision = args.precision
    topk = args.topk
    if topk < 2:
        raise InputError(f"--topk must be >= 2, got {topk}")
    t0 = time.perf_counter()
    loaded = load_for_export(args.checkpoint, args.config, args.dict, args.as_deltalm)
    cfg = loaded.config
    if cfg.is_encoder_decoder and not (args.spm and args.dict):
        raise InputError("exporting a DeltaLM needs --spm and --dict (the tokenizer travels with the artifact)")
    spm = args.spm
    if not spm and loaded.format == "hf-xlmr":
        candidate = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
        if (candidate / "sentencepiece.bpe.model").exists():
            spm = str(candidate / "sentencepiece.bpe.model")
    if spm and not Path(spm).exists():
        raise InputError(f"{spm}: no such sentencepiece model")
    if args.dict and not Path(args.dict).exists():
        raise InputError(f"{args.dict}: no such dictionary")
    if spm and args.dict:  # fail on a bad tokenizer before the long part
        from deltalm.tokenizer import Tokenizer

        Tokenizer(spm, args.dict)

    from .checkpoints import build_model
    from .onnx_export import export_graphs, ort_fusions
    from .parity import end_to_end, format_table, graph_parity, summarize

    model = build_model(loaded)
    versions = _versions()  # imports onnxruntime before any file is written
    t_load = time.perf_counter() - t0
    _log(f"loaded {loaded.format} checkpoint ({cfg.kind}, {cfg.embed_dim}d, "
         f"{cfg.encoder_layers}+{cfg.decoder_layers if cfg.is_encoder_decoder else 0} layers, vocab {cfg.vocab_size}) in {t_load:.1f}s")
    with atomic_directory(out, args.force) as tmp:
        t1 = time.perf_counter()
        graphs = export_graphs(model, tmp, precision, topk)
        t_export = time.perf_counter() - t1
        _log(f"exported {', '.join(graphs)} ({precision}) in {t_export:.1f}s")
        files = [f for g in graphs.values() for f in g["files"]]
        tokenizer = {}
        if spm:
            shutil.copyfile(spm, tmp / "spm.model")
            files.append("spm.model")
            tokenizer["spm"] = "spm.model"
        if args.dict:
            shutil.copyfile(args.dict, tmp / "dict.txt")
            files.append("dict.txt")
            tokenizer["dict"] = "dict.txt"
        fusions = {} if args.no_optimize else {name: ort_fusions(tmp / g["file"]) for name, g in graphs.items()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": cfg.to_dict(),
            "vocab": {"size": cfg.vocab_size, "bos": cfg.bos, "pad": cfg.pad, "eos": cfg.eos, "unk": cfg.unk},
            "precision": precision,
            "export_options": {"topk": topk, "opset": 17, "exporter": "torch.onnx (dynamo=False)",
                               "tolerance": args.tolerance, "ort_graph_optimization": "ORT_ENABLE_ALL at session creation",
                               "ort_fusions": fusions},
            "graphs": graphs,
            "tokenizer": tokenizer,
            "source": {"checkpoint": str(Path(args.checkpoint).resolve()), "format": loaded.format,
                       "dtype": loaded.source_dtype, "config": args.config,
                       "as_deltalm": bool(args.as_deltalm)},
            "versions": versions,
            "files": {},
        }
        manifest["files"] = hash_files(tmp, files)
        write_json_atomic(tmp / MANIFEST, manifest)
        artifact = open_artifact(tmp, verify=False)  # hashes were computed just above
        t2 = time.perf_counter()
        rows = graph_parity(model, artifact)
        e2e = end_to_end(model, artifact) if cfg.is_encoder_decoder and spm else []
        ok, failures = summarize(rows, precision, args.tolerance, e2e)
        report = {"precision": precision, "tolerance": args.tolerance, "passed": ok, "failures": failures,
                  "graphs": rows, "end_to_end": e2e,
                  "timings_s": {"load": round(t_load, 2), "export": round(t_export, 2), "parity": round(time.perf_counter() - t2, 2)}}
        write_json_atomic(tmp / "parity.json", report)
        manifest["files"] |= hash_files(tmp, ["parity.json"])  # the other files have not changed
        write_json_atomic(tmp / MANIFEST, manifest)
        _log(format_table(rows))
        for r in e2e:
            _log(f"end to end, beam {r['beam']}: identical ids {r['identical_ids']:.0%} of {r['sentences']} sentences, "
                 f"max score diff {r['max_score_diff']:.1e}")
        if not ok:
            for line in failures:
                _log(f"  {line}")
            if getattr(args, "allow_parity_failure", False):
                _log("parity check failed; the artifact is written anyway (--allow-parity-failure; parity.json says passed: false)")
            else:
                raise ExportError(f"parity check failed for {len(failures)} output(s) (listed above; first: {failures[0]}); nothing written")
    _log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def parity_command(args) -> int:
    from .checkpoints import build_model, load_checkpoint
    from .parity import end_to_end, format_table, graph_parity, summarize

    artifact = open_artifact(args.dir)
    src = artifact.manifest.get("source", {})
    checkpoint = args.checkpoint or src.get("checkpoint")
    if not checkpoint or not Path(checkpoint).exists():
        raise InputError(f"the checkpoint {checkpoint!r} recorded in the manifest is not available; pass --checkpoint")
    overrides = config_overrides(src["config"]) if src.get("config") else None
    loaded = load_checkpoint(checkpoint, overrides=overrides, vocab_size=artifact.config.vocab_size,
                             as_deltalm=src.get("as_deltalm", False))
    if loaded.config.to_dict() != artifact.config.to_dict():
        raise ArtifactError(f"{checkpoint} does not describe the model in {args.dir} (architecture differs)")
    model = build_model(loaded)
    tolerance = args.tolerance if args.tolerance is not None else artifact.manifest["export_options"]["tolerance"]
    rows = graph_parity(model, artifact)
    e2e = end_to_end(model, artifact) if artifact.config.is_encoder_decoder else []
    ok, failures = summarize(rows, artifact.precision, tolerance, e2e)
    print(format_table(rows))
    for r in e2e:
        print(f"end to end, beam {r['beam']}: identical ids {r['identical_ids']:.0%} of {r['sentences']} sentences")
    if not ok:
        for line in failures:
            print(f"  {line}")
        raise ExportError(f"parity check failed for {len(failures)} output(s) (listed above; first: {failures[0]})")
    print("parity: passed")
    return 0


def engines_command(args) -> int:
    from .engines import engines_command as run

    return run(args)


__all__ = ["inspect_command", "export_command", "parity_command", "engines_command"]
