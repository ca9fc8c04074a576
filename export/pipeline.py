"""The export side as a library: inspect a checkpoint, export it to an artifact directory, re-check
an artifact's parity. Plain arguments in, typed results out; the ``deltalm`` command's
``inspect`` / ``export`` / ``parity`` are thin shells over these functions.

    from deltalm.export import export_checkpoint

    artifact = export_checkpoint("checkpoint_best.pt", "model_dir", spm="spm.model", dictionary="dict.txt")
    print(artifact.precision, artifact.parity["passed"])
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from deltalm.artifact import Artifact, hash_files, open_artifact
from deltalm.atomic import atomic_directory, check_artifact_destination, write_json_atomic
from deltalm.compare import Thresholds
from deltalm.config import config_overrides
from deltalm.errors import ArtifactError, ExportError, InputError
from deltalm.manifest import ExportOptions, GraphEntry, Manifest, Source

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_TOPK = 10


logger = logging.getLogger(__name__)


def _log_to(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """``log`` if given, else this module's logger at INFO: a library is silent unless its caller
    configures logging (the ``deltalm`` command prints these lines on stderr)."""
    return log if log is not None else logger.info


def inspect_checkpoint(checkpoint: str | Path, config: str | None = None, dictionary: str | Path | None = None) -> dict:
    """Format, architecture, parameter counts and key problems of a checkpoint."""
    from .checkpoints import describe, load_for_export

    return describe(load_for_export(checkpoint, config, dictionary))


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    spm: str | Path | None = None,
    dictionary: str | Path | None = None,
    precision: str = "fp32",
    config: str | None = None,
    topk: int = DEFAULT_TOPK,
    tolerance: float | None = None,
    as_deltalm: bool = False,
    optimize: bool = True,
    force: bool = False,
    allow_parity_failure: bool = False,
    parity_corpus: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> Artifact:
    """Export ``checkpoint`` to the artifact directory ``out`` (ONNX graphs, tokenizer, manifest,
    parity report) and return it opened. The directory appears only complete and only when the
    parity verdict passes (``ExportError`` otherwise, nothing written); an existing ``out`` is
    replaced only with ``force``. ``topk``: k of the in-graph top-k (>= 2 x the largest beam for
    the fast path). ``tolerance``: fp32 parity limit on log-probs (max abs, default 1e-4); reduced
    precisions have a verdict of their own (``deltalm.compare.Thresholds``) and refuse it.
    ``allow_parity_failure`` writes the artifact even when the verdict fails (parity.json then says
    ``passed: false``): for benchmarks of random-weight models only. ``parity_corpus``: a text file
    of the user's sentences (one a line) for the check, instead of text sampled from ``spm``
    (``deltalm.export.parity.parity_text``). ``log`` receives one line per stage, with its time and
    peak RSS, and the parity verdict with a short summary (default: the logger
    ``deltalm.export.pipeline`` at INFO, silent unless configured); ``verbose`` adds the parity
    table (every output and case; parity.json always holds it)."""
    log = _log_to(log)
    out = Path(out)
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if topk < 2:
        raise InputError(f"--topk must be >= 2, got {topk}")
    if tolerance is not None and precision != "fp32":
        raise InputError(
            f"--tolerance applies to fp32 exports; {precision} has its own verdict "
            "(top-1 agreement and identical sentences, see docs/export.md)"
        )
    check_artifact_destination(out, force)  # before the slow load
    if parity_corpus:
        from .parity import corpus_lines

        corpus_lines(parity_corpus)
    from .file_pages import mapped_files, release
    from .stage_meter import StageMeter

    t0 = time.perf_counter()
    # wall time and peak RSS of each stage (parity.json's "memory"); DELTALM_STAGE_PEAKS=1: each
    # stage's own peak (the process's mark is then reset per stage: see deltalm.export.stage_meter)
    meter = StageMeter(exact_stages=os.environ.get("DELTALM_STAGE_PEAKS") == "1")
    with meter.active(), meter.stage("load") as stage:
        loaded, model, spm, versions = _load_model(checkpoint, config, dictionary, as_deltalm, spm)
    cfg = loaded.config
    t_load = stage.seconds
    log(
        f"loaded {loaded.format} checkpoint ({cfg.kind}, {cfg.embed_dim}d, "
        f"{cfg.encoder_layers}+{cfg.decoder_layers if cfg.is_encoder_decoder else 0} layers, vocab {cfg.vocab_size}) "
        f"in {t_load:.1f}s, {_peak(stage)}"
    )
    from .onnx_export import export_graphs, ort_fusions
    from .parity import end_to_end_checks, format_summary, format_table, graph_parity, parity_text, summarize

    text = parity_text(spm, dictionary, parity_corpus)  # a bad corpus file fails here, before the export
    limits = Thresholds.for_precision(precision, tolerance)
    with atomic_directory(out, force) as tmp:
        with meter.active(), meter.stage("export") as stage:
            graphs = export_graphs(model, tmp, precision, topk)
        t_export = stage.seconds
        log(f"exported {', '.join(graphs)} ({precision}) in {t_export:.1f}s, {_peak(stage)}")
        # the checkpoint's pages, all read to write weights.data, are given back (its mapping stays)
        release(mapped_files(t.data_ptr() for t in model.parameters()))
        files = sorted({f for g in graphs.values() for f in g["files"]})  # weights.data is shared
        tokenizer = {}
        if spm:
            shutil.copyfile(spm, tmp / "spm.model")
            files.append("spm.model")
            tokenizer["spm"] = "spm.model"
        if dictionary:
            shutil.copyfile(dictionary, tmp / "dict.txt")
            files.append("dict.txt")
            tokenizer["dict"] = "dict.txt"
        with meter.stage("fusions") as stage:
            fusions = {name: ort_fusions(tmp / g["file"]) for name, g in graphs.items()} if optimize else {}
        if optimize:
            log(f"listed ONNX Runtime's fusions in {stage.seconds:.1f}s, {_peak(stage)}")
        manifest = Manifest(
            model=cfg,
            precision=precision,
            graphs={name: GraphEntry.from_dict(g) for name, g in graphs.items()},
            tokenizer=tokenizer,
            export_options=ExportOptions(
                topk=topk,
                opset=17,
                exporter="torch.onnx (dynamo=False)",
                tolerance=limits.max_abs,
                ort_graph_optimization="ORT_ENABLE_ALL at session creation",
                ort_fusions=fusions,
            ),
            files=hash_files(tmp, files),
            source=Source(
                checkpoint=str(Path(checkpoint).resolve()),
                format=loaded.format,
                dtype=loaded.source_dtype,
                config=config,
                as_deltalm=bool(as_deltalm),
            ),
            versions=versions,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest.write(tmp)
        artifact = open_artifact(tmp, verify=False)  # hashes were computed just above
        with meter.active(), meter.stage("parity") as parity_stage:
            with meter.stage("graphs"):
                rows = graph_parity(model, artifact, text=text)
            with meter.stage("end to end"):
                e2e, teacher = (
                    end_to_end_checks(model, artifact, text) if cfg.is_encoder_decoder and spm else ([], None)
                )
        ok, failures = summarize(rows, precision, tolerance, e2e, teacher)
        report = {
            "precision": precision,
            "tolerance": limits.max_abs,
            "thresholds": limits.__dict__,
            "passed": ok,
            "failures": failures,
            "sources": text.origin if text else "random ids",
            "graphs": rows,
            "end_to_end": e2e,
            "teacher_forced": teacher,
            "timings_s": {
                "load": round(t_load, 2),
                "export": round(t_export, 2),
                "parity": round(parity_stage.seconds, 2),
            },
            "memory": meter.report(),
        }
        write_json_atomic(tmp / "parity.json", report)
        manifest.files |= hash_files(tmp, ["parity.json"])  # the other files have not changed
        manifest.write(tmp)
        if verbose:
            log(format_table(rows))
        for line in end_to_end_lines(e2e, teacher, text):
            log(line)
        if not ok:
            for line in failures:
                log(f"  {line}")
            if not allow_parity_failure:
                raise ExportError(
                    f"parity check failed for {len(failures)} output(s) (listed above; first: "
                    f"{failures[0]}); nothing written"
                )
            log(
                "parity check failed; the artifact is written anyway (--allow-parity-failure; parity.json says passed: false)"
            )
        else:
            log(f"parity: passed ({_verdict_text(limits)}) in {parity_stage.seconds:.1f}s, {_peak(parity_stage)}")
        log(format_summary(rows, out / "parity.json", verbose))
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s, peak RSS {meter.peak_mb:.0f} MB")
    return open_artifact(out, verify=False)


def _load_model(checkpoint, config, dictionary, as_deltalm, spm):
    """The checkpoint loaded and checked, its model built; (loaded, model, spm, versions)."""
    from .checkpoints import build_model, load_for_export

    loaded = load_for_export(checkpoint, config, dictionary, as_deltalm)
    cfg = loaded.config
    if cfg.is_encoder_decoder and not (spm and dictionary):
        raise InputError("exporting a DeltaLM needs --spm and --dict (the tokenizer travels with the artifact)")
    if not spm and loaded.format == "hf-xlmr":
        candidate = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        if (candidate / "sentencepiece.bpe.model").exists():
            spm = candidate / "sentencepiece.bpe.model"
    if spm and not Path(spm).exists():
        raise InputError(f"{spm}: no such sentencepiece model")
    if dictionary and not Path(dictionary).exists():
        raise InputError(f"{dictionary}: no such dictionary")
    if spm and dictionary:  # fail on a bad tokenizer before the long part
        from deltalm.tokenizer import Tokenizer

        Tokenizer(spm, dictionary)
    model = build_model(loaded)
    versions = _versions()  # imports onnxruntime before any file is written
    return loaded, model, spm, versions


def _peak(stage) -> str:
    return f"peak RSS {stage.peak_mb:.0f} MB"  # the stage's own or the process's so far (StageMeter)


def _verdict_text(limits: Thresholds) -> str:
    parts = []
    if limits.max_abs is not None:
        parts.append(f"float outputs within {limits.max_abs:.0e}")
    if limits.min_top1 is not None:
        parts.append(f"decisive top-1 agreement >= {limits.min_top1} (teacher-forced)")
    if limits.min_identical is not None:
        parts.append(f"identical sentences >= {limits.min_identical:.0%}")
    if limits.min_graph_top1 is not None:
        parts.append(f"graph top-1 >= {limits.min_graph_top1}")
    return ", ".join(parts)


def end_to_end_lines(e2e: list[dict], teacher: dict | None, text) -> list[str]:
    """The end-to-end results of the check, one line each."""
    lines = [
        f"end to end, beam {r['beam']}: identical ids {r['identical_ids']:.0%} of {r['sentences']} "
        f"sentences, max score diff {r['max_score_diff']:.1e}"
        for r in e2e
    ]
    if teacher is not None:
        lines.append(
            f"end to end, teacher-forced {teacher['steps']} steps x {teacher['rows']} sentences: top-1 "
            f"agreement {teacher['top1_agreement']:.3f}, decisive {teacher['decisive_top1_agreement']:.3f} "
            f"of {teacher['decisive_rows']}"
        )
    if e2e:
        lines.append(f"end to end sources: {text.origin if text else 'random ids'}")
    return lines


def check_parity(
    artifact_dir: str | Path,
    checkpoint: str | Path | None = None,
    tolerance: float | None = None,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
    parity_corpus: str | Path | None = None,
) -> dict:
    """Re-run the parity checks of an artifact against its checkpoint (by default the one its
    manifest records), on text sampled from the artifact's sentencepiece model or the sentences of
    ``parity_corpus``. Returns the report (``passed``, ``failures``, ``graphs``, ``end_to_end``);
    raises ``ExportError`` when the verdict fails. ``log`` / ``verbose``: as ``export_checkpoint``
    (the verdict and a summary; the table with ``verbose``)."""
    log = _log_to(log)
    from .checkpoints import build_model, load_checkpoint
    from .parity import end_to_end_checks, format_summary, format_table, graph_parity, parity_text, summarize

    artifact = open_artifact(artifact_dir)
    if tolerance is not None and artifact.precision != "fp32":
        raise InputError(
            f"--tolerance applies to fp32 artifacts; this one is {artifact.precision}, whose verdict is "
            "top-1 agreement and identical sentences (see docs/export.md)"
        )
    src = artifact.manifest.source
    checkpoint = checkpoint or src.checkpoint
    if not checkpoint or not Path(checkpoint).exists():
        raise InputError(
            f"the checkpoint {str(checkpoint)!r} recorded in the manifest is not available; pass --checkpoint"
        )
    overrides = config_overrides(src.config) if src.config else None
    loaded = load_checkpoint(
        str(checkpoint), overrides=overrides, vocab_size=artifact.config.vocab_size, as_deltalm=src.as_deltalm
    )
    if loaded.config.to_dict() != artifact.config.to_dict():
        raise ArtifactError(f"{checkpoint} does not describe the model in {artifact_dir} (architecture differs)")
    model = build_model(loaded)
    if tolerance is None and artifact.precision == "fp32":
        tolerance = artifact.manifest.export_options.tolerance
    limits = Thresholds.for_precision(artifact.precision, tolerance)
    spm, dictionary = (
        artifact.path / artifact.manifest.tokenizer[k] if k in artifact.manifest.tokenizer else None
        for k in ("spm", "dict")
    )
    text = parity_text(spm, dictionary, parity_corpus)
    rows = graph_parity(model, artifact, text=text)
    e2e, teacher = end_to_end_checks(model, artifact, text) if artifact.config.is_encoder_decoder else ([], None)
    ok, failures = summarize(rows, artifact.precision, tolerance, e2e, teacher)
    if verbose:
        log(format_table(rows))
    for line in end_to_end_lines(e2e, teacher, text):
        log(line)
    if not ok:
        for line in failures:
            log(f"  {line}")
        raise ExportError(f"parity check failed for {len(failures)} output(s) (listed above; first: {failures[0]})")
    log(f"parity: passed ({artifact.precision}: {_verdict_text(limits)})")
    log(format_summary(rows, None, verbose))
    return {
        "precision": artifact.precision,
        "passed": ok,
        "failures": failures,
        "graphs": rows,
        "end_to_end": e2e,
        "teacher_forced": teacher,
        "sources": text.origin if text else "random ids",
    }


__all__ = ["export_checkpoint", "inspect_checkpoint", "check_parity", "PRECISIONS"]
