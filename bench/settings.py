"""The plan of a run, as data: per model size the forced length, source lengths, time budgets
and repetitions; the backends there are and which of them this machine and these artifacts
allow."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

BACKEND_KINDS = ("torch", "ort-fp32", "ort-fp16", "ort-int8", "ort-cuda", "trt")
GPU_KINDS = ("ort-cuda", "trt")


@dataclass(frozen=True)
class BenchSettings:
    n: int  # tokens forced per sentence (n + 1 steps with </s>)
    src_lens: tuple[int, ...]
    budget_s: dict  # seconds of measurement per cell: workload key -> s, "default" -> s
    max_reps: int
    min_reps: int
    profile_steps: int
    memory_lines: int  # sentences translated by the memory check
    memory_len: int
    skip: tuple = ()  # (backend, workload key) cells not run, to keep the run's time reasonable
    quiet_wait_s: float = 0.0  # before each cell, wait up to this long for other processes to go idle
    gemm_n: int = 3072  # floors: GEMM size and bytes summed
    read_bytes: int = 1 << 30
    compare_reps: int = 3  # --compare: interleaved repetitions per cell and engine
    # decoding control (bench/control.py): beam 5 x this batch at the middle source length, the
    # variants interleaved this many times; per-sentence prefix / constraints of these lengths
    control_batch: int = 8
    control_reps: int = 3
    control_prefix_len: int = 4
    control_constraints: int = 2
    control_constraint_len: int = 2


def settings_for(model: str, quick: bool) -> BenchSettings:
    """Presets as data. base: the full grid in about 25 minutes on 2 cores; the beam 5 x batch 32
    cells get the largest budgets, the torch baseline there is measured over fewer steps."""
    if model == "tiny":
        if quick:
            return BenchSettings(
                8,
                (10, 30),
                {"default": 0.3},
                3,
                2,
                6,
                8,
                8,
                gemm_n=2048,
                read_bytes=1 << 29,
                compare_reps=2,
                control_batch=4,
                control_reps=1,
            )
        return BenchSettings(50, (10, 30, 100), {"default": 0.5}, 5, 3, 20, 32, 20, gemm_n=2048, read_bytes=1 << 29)
    if quick:
        return BenchSettings(10, (30,), {"default": 10.0}, 2, 2, 4, 8, 8, quiet_wait_s=30.0, control_reps=2)
    budgets = {"default": 10.0}
    for s in (10, 30, 100):
        budgets[f"b5-n32-s{s}"] = 45.0
        budgets[f"b1-n32-s{s}"] = 25.0
    # batch 32 at src ~10 and ~100 only through ort fp32 / int8: a torch or fp16 step there costs
    # seconds, and the source length changes little but the encoder (measured at every length anyway)
    skip = tuple((k, f"b{beam}-n32-s{s}") for k in ("torch", "ort-fp16") for beam in (1, 5) for s in (10, 100))
    return BenchSettings(50, (10, 30, 100), budgets, 3, 3, 8, 32, 20, skip, quiet_wait_s=90.0, compare_reps=5)


def size_of(config: dict) -> str:
    """The preset whose settings suit a model: base from 512 dimensions up, else tiny."""
    return "base" if config["embed_dim"] >= 512 else "tiny"


def artifact_for(kind: str, artifacts: dict) -> Path:
    """The artifact a backend runs on: its precision's for ort-fp16 / ort-int8, else fp32 (or,
    for a single given artifact, that one)."""
    precision = {"ort-fp16": "fp16", "ort-int8": "int8"}.get(kind, "fp32")
    return Path(artifacts.get(precision) or next(iter(artifacts.values())))


def backend_availability(kind: str, artifacts: dict) -> tuple[bool, str]:
    """Whether ``kind`` can run here on ``artifacts`` ({precision: artifact dir}), and why not."""
    import onnxruntime as ort

    if kind == "torch":
        if importlib.util.find_spec("torch") is None:
            return False, "not available here (no torch: install the export extra)"
        from deltalm.artifact import read_manifest

        ckpt = read_manifest(artifact_for(kind, artifacts)).source.checkpoint
        if not ckpt or not Path(ckpt).exists():
            return False, f"checkpoint {ckpt!r} named by the manifest is not available"
        return True, ""
    if kind in ("ort-fp32", "ort-fp16", "ort-int8"):
        ok = kind.split("-")[1] in artifacts
        return ok, "" if ok else "artifact missing"
    if kind == "ort-cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True, ""
        return False, f"not available here (onnxruntime {ort.__version__}: no CUDAExecutionProvider)"
    if kind == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return False, "not available here (no TensorRT)"
        if not (artifact_for(kind, artifacts) / "engines").exists():
            return False, "not available here (no engines: run `deltalm engines` on the fp32 artifact)"
        return True, ""
    raise ValueError(kind)
