"""``deltalm bench --export-memory``: the peak RSS and wall time of every stage of ``deltalm export``
on fairseq checkpoints written here, each export in a child process of its own.

Shapes: ``base`` and ``large`` (the ``deltalm-base`` / ``deltalm-large`` presets with DeltaLM's
vocabulary of 250001, random weights N(0, 0.02), biases 0, LayerNorms 1) saved as fairseq saves a
fine-tuned model: ``cfg.model``, the ``model`` state dict with the embedding table stored once
(encoder, decoder and output projection share one storage), no optimizer state; the toy
sentencepiece model with a dictionary padded to 250001 entries. Cached under ``OUT/models``.

Each export runs with ``DELTALM_STAGE_PEAKS=1`` (every stage's own peak, ``deltalm.export.
stage_meter``) and without ``--allow-parity-failure``: its verdict must pass. The figures come from
the export's parity.json (``memory``); the machine's load and free memory are recorded with them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .children import run_cli
from .models import BASE_VOCAB, ModelFiles, write_filler_dictionary
from .progress import log

SHAPES = {"base": "deltalm-base", "large": "deltalm-large"}
DEFAULT_SHAPES = ("base", "large")
DEFAULT_PRECISIONS = ("fp32", "int8")
TARGET_RATIO = 2.5  # the goal: peak RSS <= 2.5 x the checkpoint file


def write_shaped_checkpoint(shape: str, model_dir: Path, seed: int = 0, std: float = 0.02) -> ModelFiles:
    """The ``shape`` checkpoint (see the module docstring) under ``model_dir``, written once
    (writing deltalm-large holds its 3.4 GB once, and takes a few minutes)."""
    ckpt = model_dir / "checkpoint_best.pt"
    spm, dict_path = model_dir / "spm.model", model_dir / "dict.txt"
    if ckpt.exists() and spm.exists() and dict_path.exists():
        return ModelFiles(shape, ckpt, spm, dict_path)
    import torch

    from deltalm.config import ModelConfig
    from deltalm.export.model import DeltaLM
    from deltalm.export.toy_data import build_toy_tokenizer
    from deltalm.export.toy_model import fairseq_model_cfg

    model_dir.mkdir(parents=True, exist_ok=True)
    build_toy_tokenizer(model_dir)
    write_filler_dictionary(dict_path, BASE_VOCAB)
    cfg = ModelConfig.from_name(SHAPES[shape]).replace(vocab_size=BASE_VOCAB)
    log(f"writing a random {SHAPES[shape]}-shaped fairseq checkpoint in {model_dir}/")
    model = DeltaLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, std, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    state = dict(model.state_dict())  # tied names share one storage: torch.save writes it once
    state["encoder.version"] = torch.tensor([3.0])
    state["decoder.version"] = torch.tensor([3.0])
    checkpoint = {
        "args": None,
        "cfg": {
            "_name": None,
            "model": fairseq_model_cfg(cfg),
            "task": {"_name": "translation", "source_lang": "src", "target_lang": "tgt"},
        },
        "model": state,
        "optimizer_history": [],
        "extra_state": {"epoch": 1},
        "last_optimizer_state": None,
    }
    tmp = ckpt.with_name(ckpt.name + ".partial")
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt)
    return ModelFiles(shape, ckpt, spm, dict_path)


def machine_state() -> dict:
    """Load average (1, 5, 15 min) and available memory now."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                available = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "loadavg": [round(x, 2) for x in load],
        "mem_available_gib": available,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def measure_export(files: ModelFiles, precision: str, out: Path) -> dict:
    """``deltalm export`` of ``files`` in ``precision`` into ``out``, in a child: every stage's time
    and own peak RSS (parity.json), the process's peak, its ratio to the checkpoint file."""
    before = machine_state()
    record = out.parent / f".{out.name}.peak.json"
    env = {"DELTALM_STAGE_PEAKS": "1"}
    _, res = run_cli(
        files.export_args(out, precision),
        record,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"export {files.name} {precision} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    parity = json.loads((out / "parity.json").read_text())
    memory = parity["memory"]
    size_mib = files.checkpoint.stat().st_size / 2**20
    return {
        "shape": files.name,
        "precision": precision,
        "checkpoint_mib": round(size_mib),
        "peak_rss_mib": memory["peak_rss_mb"],
        "ratio": round(memory["peak_rss_mb"] / size_mib, 2),
        "stage_peaks": memory.get("stage_peaks"),
        "stages": memory["stages"],
        "wall_s": round(res.wall_s, 1),
        "others_cpu_share": round(res.others_cpu_share, 3),
        "passed": parity["passed"],
        "sources": parity.get("sources"),
        "machine_before": before,
        "machine_after": machine_state(),
    }


def run_export_memory(out: Path, shapes=DEFAULT_SHAPES, precisions=DEFAULT_PRECISIONS) -> dict:
    """Every shape x precision; results as written to OUT/export-memory.json."""
    from .floors import machine_info

    results = {
        "machine": machine_info(),
        "command": f"deltalm bench --export-memory --shapes {','.join(shapes)} --precisions {','.join(precisions)}",
        "runs": [],
    }
    for shape in shapes:
        files = write_shaped_checkpoint(shape, out / "models" / shape)
        for precision in precisions:
            log(f"export-memory: {shape} {precision}")
            run = measure_export(files, precision, out / "artifacts" / f"{shape}-{precision}")
            log(
                f"export-memory: {shape} {precision}: peak {run['peak_rss_mib']} MiB = {run['ratio']}x the "
                f"checkpoint ({run['checkpoint_mib']} MiB) in {run['wall_s']:.0f}s"
            )
            results["runs"].append(run)
            (out / "export-memory.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_export_memory(results: dict) -> str:
    """The markdown report: one summary table, then each run's stages."""
    from .report import machine_line

    lines = [
        "# deltalm bench --export-memory",
        "",
        machine_line(results["machine"]),
        "",
        f"Command: `{results['command']}`. Peak RSS in MiB (VmHWM, each stage its own: DELTALM_STAGE_PEAKS=1); "
        f"ratio = peak / checkpoint file; target <= {TARGET_RATIO}x.",
        "",
        "| shape | precision | checkpoint MiB | peak RSS MiB | ratio | target | wall s | verdict | load avg (1 min) before | others' CPU share |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['shape']} | {r['precision']} | {r['checkpoint_mib']} | {r['peak_rss_mib']} | {r['ratio']:.2f} | "
            f"{'met' if r['ratio'] <= TARGET_RATIO else 'missed'} | {r['wall_s']:.0f} | "
            f"{'passed' if r['passed'] else 'FAILED'} | {r['machine_before']['loadavg'][0]} | "
            f"{r['others_cpu_share']:.0%} |"
        )
    for r in results["runs"]:
        lines += [
            "",
            f"## {r['shape']} {r['precision']} (started {r['machine_before']['time']}, "
            f"{r['machine_before']['mem_available_gib']} GiB available)",
            "",
            "| stage | time s | peak RSS MiB | RSS after MiB |",
            "|---|---:|---:|---:|",
        ]
        for s in r["stages"]:
            name = "&nbsp;&nbsp;" * s["depth"] + s["name"]
            lines.append(f"| {name} | {s['seconds']:.1f} | {s['peak_rss_mb']} | {s['rss_after_mb']} |")
    return "\n".join(lines) + "\n"


__all__ = ["write_shaped_checkpoint", "measure_export", "run_export_memory", "format_export_memory", "SHAPES"]
