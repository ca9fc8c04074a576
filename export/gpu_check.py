"""``python -m deltalm.export.gpu_check`` (``bash scripts/gpu_check.sh``): every GPU check in one run.

Writes ``OUT/gpu_report.json`` (saved after every stage, so a run cut short still reports) and
``OUT/gpu_report.md`` (the summary table). Without a GPU (no GPU from nvidia-smi, no CUDA device
in torch) it prints "no GPU found: GPU checks skipped", writes ``{"gpu": null, "status": "skipped
(no GPU)", ...}`` and exits 0.

With a GPU:
  1. builds the demo checkpoint (tiny DeltaLM fitted on the copy task) and a random
     deltalm-base-sized fairseq checkpoint (toy sentencepiece model, its dict.txt padded with filler
     symbols to the 250001 rows of the embedding table);
  2. exports both with ``deltalm export`` in fp32 and fp16 (each export runs its own parity
     verdict against PyTorch on the CPU);
  3. ONNX Runtime CUDA against ONNX Runtime CPU on the same graphs, with the one comparator
     (``deltalm.compare``): teacher-forced steps (``compare_steps``: top-1 agreement, log-prob
     max abs) and, on the demo model, greedy and beam-5 translations (``compare_translations``);
  4. decoder-step latency over the backend contract (``run_step`` on ``DecoderBatch.feeds``: the
     caches live on the host and are copied to the device by each run, as in a search), median of
     60 runs after 10 warm-up runs, batch 1 and batch 8 x beam 5, every row at position 32;
  5. if ``import tensorrt`` works: ``deltalm engines`` (strongly typed, in the precision of each
     export: demo fp32 and fp16, base fp16), the engines against ONNX Runtime CPU on the same
     graphs with the same comparator, and the same latency measurements through the TRT backend.
Verdicts are ``deltalm.compare.Thresholds``: ``DEVICE_THRESHOLDS`` per precision (the same
graph on two devices must agree closely; the export's own fp16 verdict is looser because it
compares fp16 with fp32). Exit status 0 when everything ran and the demo model's verdicts hold
(the base-size model's are recorded: its random weights make near-ties), 1 otherwise.

Environment (each also an option): OUT (report folder, default gpu_report), GPU_CHECK_WORK (scratch
folder, default /tmp/deltalm_gpu_check; checkpoints and artifacts are reused from there),
GPU_CHECK_BUDGET_S (default 420: later stages are skipped once it is spent), GPU_CHECK_BASE=0
(skip the base-size model), GPU_CHECK_DEMO_STEPS (default 300), GPU_CHECK_SELFTEST=1 (no GPU
needed: the CPU stands in for it, TensorRT is skipped; tests this module itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from deltalm.atomic import atomic_output, write_json_atomic
from deltalm.compare import Thresholds, compare_steps, compare_translations

# The same graph on the device and on the CPU: fp32 to 1e-3 in log-probs (CUDA kernels sum in
# another order, TF32 is off) and identical translations; fp16 to 5e-2, identical top-1 on
# every teacher-forced step and >= 90% identical translations (near-ties may flip).
DEVICE_THRESHOLDS = {
    "fp32": Thresholds(max_abs=1e-3, min_top1=1.0, min_identical=1.0),
    "fp16": Thresholds(max_abs=5e-2, min_top1=1.0, min_identical=0.9),
}
STEPS = 8  # teacher-forced steps per parity check
CONFIGS = (("batch1", 1, 1), ("batch8_beam5", 8, 5))
POSITION, SRC_LEN, WARMUP, RUNS = 32, 32, 10, 60


def detect_gpu() -> str | None:
    """Name of GPU 0 from nvidia-smi, else from torch's CUDA runtime; None without one."""
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        name = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
        if name:
            return name
    try:  # no nvidia-smi in some containers
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU
        return None


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime

        return onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        return []


# ---------------------------------------------------------------------------------------------
# parity with the one comparator


def parity(
    reference, candidate, sources: list[np.ndarray], precision: str, translations: bool = True, max_len_b: int = 64
) -> dict:
    """``candidate`` against ``reference`` (two backends of the common interface): teacher-forced
    steps over the first batch of ``sources`` and, with ``translations``, greedy and beam-5
    searches over all of them. Returns {"steps", "translations", "failures"}; ``failures`` lists
    what misses ``DEVICE_THRESHOLDS[precision]``."""
    limits = DEVICE_THRESHOLDS[precision]
    steps = compare_steps(reference, candidate, sources[0], STEPS)
    failures = limits.failures(
        "teacher-forced steps", {"max_abs": steps["log_probs_max_abs"], "top1_agreement": steps["top1_agreement"]}
    )
    rows = []
    if translations:
        rows = compare_translations(reference, candidate, sources, beams=(1, 5), max_len_b=max_len_b)
        for r in rows:
            failures += limits.failures(f"beam {r['beam']} translations", r)
    return {"steps": steps, "translations": rows, "failures": failures}


def summary_line(result: dict) -> str:
    s = result["steps"]
    line = f"log-probs max abs {s['log_probs_max_abs']:.2e}, top-1 {s['top1_agreement']:.3f}"
    for r in result.get("translations", []):
        line += f", beam {r['beam']} {r['identical_ids']:.0%} identical"
    return line


# ---------------------------------------------------------------------------------------------
# the run


class Run:
    """One GPU check run: the stages, their results and the report files."""

    def __init__(
        self, out: Path, work: Path, gpu: str | None, selftest: bool, budget_s: float, with_base: bool, demo_steps: int
    ):
        self.out, self.work, self.gpu, self.selftest = out, work, gpu, selftest
        self.device = "cpu" if selftest else "cuda"
        self.budget_s, self.with_base, self.demo_steps = budget_s, with_base, demo_steps
        self.t0 = time.time()
        self.report = {
            "gpu": gpu,
            "status": "running",
            "selftest": selftest,
            "device": self.device,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {},
            "stages": {},
            "verdicts": {},
            "failures": [],
            "errors": [],
            "skipped": [],
        }

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        write_report(self.out, self.report)

    def stage(self, name: str, fn, *args, need_s: float = 0.0):
        """Run one check; its result (or its error) goes into the report, which is saved at once."""
        left = self.budget_s - (time.time() - self.t0)
        if left < need_s:
            self.report["skipped"].append(f"{name}: time budget spent ({left:.0f}s left, needs ~{need_s:.0f}s)")
            self.log(f"skip {name}: time budget")
            self.save()
            return None
        self.log(f"start {name}")
        t = time.time()
        try:
            result = fn(*args)
            self.report["stages"][name] = {"ok": True, "seconds": round(time.time() - t, 1), "result": result}
            return result
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - every stage reports its own failure and the run goes on
            self.report["stages"][name] = {
                "ok": False,
                "seconds": round(time.time() - t, 1),
                "error": f"{type(e).__name__}: {e}",
            }
            self.report["errors"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None
        finally:
            self.log(f"end {name} ({time.time() - t:.1f}s)")
            self.save()

    def verdict(self, name: str, result: dict | None, enforced: bool = True) -> None:
        """Record a parity result's verdict; an ``enforced`` one that fails fails the run (the
        base-size model's random weights make near-ties, so its verdicts are recorded only)."""
        if result is None:
            return
        ok = not result["failures"]
        self.report["verdicts"][name] = {
            "ok": ok,
            "enforced": enforced,
            "detail": summary_line(result),
            "failures": result["failures"],
        }
        if enforced:
            self.report["failures"] += [f"{name}: {f}" for f in result["failures"]]

    # -- stages ---------------------------------------------------------------------------

    def versions(self) -> dict:
        import onnxruntime
        import torch

        v = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "onnxruntime": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(),
            "cpu_count": os.cpu_count(),
        }
        for module in ("tensorrt", "polygraphy"):
            try:
                v[module] = __import__(module).__version__
            except Exception as e:  # noqa: BLE001
                v[module], v[f"{module}_missing"] = None, str(e)
        if shutil.which("nvidia-smi"):
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            v["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        self.report["versions"] = v
        return v

    def demo_checkpoint(self) -> dict:
        import torch

        from deltalm.export.toy_model import build_demo_checkpoint

        d = self.work / "demo"
        if not (d / "checkpoint_best.pt").exists():
            torch.set_num_threads(min(8, os.cpu_count() or 1))
            build_demo_checkpoint(d, steps=self.demo_steps)
        return {"dir": str(d)}

    def base_checkpoint(self) -> dict:
        """Random deltalm-base (768d, 12+6 layers, 250001 rows) as a fairseq checkpoint; the toy
        sentencepiece model with its dict.txt padded by filler symbols to 250001 entries (export
        checks the dictionary size against the embedding rows; nothing else needs a real one)."""
        import torch

        from deltalm.config import ModelConfig
        from deltalm.export.model import DeltaLM
        from deltalm.export.toy_data import build_toy_tokenizer
        from deltalm.export.toy_model import save_fairseq_checkpoint
        from deltalm.tokenizer import Dictionary

        d = self.work / "base"
        if (d / "checkpoint.pt").exists():
            return {"dir": str(d)}
        d.mkdir(parents=True, exist_ok=True)
        build_toy_tokenizer(d)
        cfg = ModelConfig.from_name("deltalm-base")
        have = len(Dictionary.load(d / "dict.txt"))
        with open(d / "dict.txt", "a") as f:
            f.writelines(f"madeupword{i:06d} 0\n" for i in range(cfg.vocab_size - have))
        torch.manual_seed(0)
        model = DeltaLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(std=0.05)
        save_fairseq_checkpoint(model.eval(), d / "checkpoint.pt")
        return {"dir": str(d), "parameters": sum(p.numel() for p in model.parameters())}

    def export(self, model_dir: Path, ckpt: str, precision: str) -> dict:
        from deltalm.cli import main

        out = self.work / f"{model_dir.name}-{precision}"
        if (out / "manifest.json").exists():
            return {"artifact": str(out), "reused": True}
        rc = main(
            [
                "export",
                str(model_dir / ckpt),
                "--spm",
                str(model_dir / "spm.model"),
                "--dict",
                str(model_dir / "dict.txt"),
                "--out",
                str(out),
                "--precision",
                precision,
                "--force",
            ]
        )
        if rc == 130:  # interrupted: stop everything, not just this stage
            raise KeyboardInterrupt
        if rc != 0:
            raise RuntimeError(f"deltalm export exited with {rc}")
        verdict = json.loads((out / "parity.json").read_text())
        return {
            "artifact": str(out),
            "torch_parity_passed": verdict["passed"],
            "end_to_end_vs_torch": verdict["end_to_end"],
        }

    def demo_sources(self) -> list[np.ndarray]:
        from deltalm.export.toy_data import toy_corpus
        from deltalm.tokenizer import Tokenizer

        tok = Tokenizer(self.work / "demo" / "spm.model", self.work / "demo" / "dict.txt")
        lines = toy_corpus()[::25]  # 16 sentences, all four languages
        return [tok.collate([tok.encode(s) for s in lines[i : i + 8]]) for i in range(0, len(lines), 8)]

    def random_sources(self, cfg) -> list[np.ndarray]:
        from deltalm.export.parity import make_sources

        return [make_sources(cfg, (9, 4, 13), np.random.default_rng(2))]

    def on_device(self, backend) -> None:
        """ONNX Runtime falls back to the CPU when the CUDA provider cannot load: refuse that."""
        if self.device == "cuda" and backend.decoder.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(
                f"the CUDA execution provider did not load (providers: {backend.decoder.get_providers()})"
            )

    def ort_parity(self, artifact: str, precision: str, demo: bool) -> dict:
        from deltalm.backends.ort import OrtBackend

        reference = OrtBackend.from_artifact(artifact, device="cpu")
        device = OrtBackend.from_artifact(artifact, device=self.device)
        self.on_device(device)
        sources = self.demo_sources() if demo else self.random_sources(reference.cfg)
        return parity(reference, device, sources, precision, translations=demo)

    def trt_engines(self, artifact: str) -> dict:
        from deltalm.export.engines import build_engines

        meta = build_engines(artifact, max_batch=8, max_beam=5, max_src_len=64, max_tgt_len=72)
        return {
            g: {k: m[k] for k in ("precision", "tensorrt", "build_seconds", "layers") if k in m}
            for g, m in meta["engines"].items()
        }

    def trt_parity(self, artifact: str, precision: str, demo: bool) -> dict:
        from deltalm.backends.ort import OrtBackend
        from deltalm.backends.trt import TrtBackend

        reference = OrtBackend.from_artifact(artifact, device="cpu")
        trt = TrtBackend.from_artifact(artifact)
        try:
            sources = self.demo_sources() if demo else self.random_sources(reference.cfg)
            return parity(reference, trt, sources, precision, translations=demo)
        finally:
            trt.close()

    def ort_latency(self, artifact: str) -> dict:
        from deltalm.backends.ort import OrtBackend

        backend = OrtBackend.from_artifact(artifact, device=self.device)
        self.on_device(backend)
        return {name: step_latency(backend, batch, beam) for name, batch, beam in CONFIGS}

    def trt_latency(self, artifact: str) -> dict:
        from deltalm.backends.trt import TrtBackend

        backend = TrtBackend.from_artifact(artifact)
        try:
            return {name: step_latency(backend, batch, beam) for name, batch, beam in CONFIGS}
        finally:
            backend.close()

    # -- the whole run --------------------------------------------------------------------

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        self.stage("versions", self.versions)
        models = []
        if self.stage("demo checkpoint", self.demo_checkpoint):
            models.append(("demo", self.work / "demo", "checkpoint_best.pt"))
        if not self.with_base:
            self.report["skipped"].append("base-size model (GPU_CHECK_BASE=0)")
        elif models and self.stage("base checkpoint", self.base_checkpoint, need_s=240):
            models.append(("base", self.work / "base", "checkpoint.pt"))
        artifacts = {}
        for model, d, ckpt in models:
            for precision in ("fp32", "fp16"):
                r = self.stage(
                    f"export {model} {precision}", self.export, d, ckpt, precision, need_s=90 if model == "base" else 10
                )
                if not r:
                    continue
                art = artifacts[(model, precision)] = r["artifact"]
                self.verdict(
                    f"ORT {self.device} vs CPU, {model} {precision}",
                    self.stage(f"ort parity {model} {precision}", self.ort_parity, art, precision, model == "demo"),
                    enforced=model == "demo",
                )
                if (model, precision) != ("demo", "fp16"):
                    self.stage(f"ort latency {model} {precision}", self.ort_latency, art, need_s=20)
        have_trt = self.report["versions"].get("tensorrt") is not None
        if have_trt and not self.selftest:
            for model, precision in (("demo", "fp32"), ("demo", "fp16"), ("base", "fp16")):
                art = artifacts.get((model, precision))  # engines in the export's own precision
                if not art:
                    continue
                if not self.stage(
                    f"trt engines {model} {precision}", self.trt_engines, art, need_s=150 if model == "base" else 30
                ):
                    continue
                self.verdict(
                    f"TRT vs ORT CPU, {model} {precision}",
                    self.stage(f"trt parity {model} {precision}", self.trt_parity, art, precision, model == "demo"),
                    enforced=model == "demo",
                )
                if (model, precision) != ("demo", "fp16"):
                    self.stage(f"trt latency {model} {precision}", self.trt_latency, art, need_s=20)
        else:
            why = "selftest" if self.selftest else f"not importable ({self.report['versions'].get('tensorrt_missing')})"
            self.report["skipped"].append(f"TensorRT: {why}")
        self.report["status"] = "failed" if self.report["errors"] or self.report["failures"] else "passed"
        self.save()
        print(markdown(self.report))
        print(f"status: {self.report['status']}; report: {self.out / 'gpu_report.json'}")
        return 0 if self.report["status"] == "passed" else 1


def step_latency(backend, batch: int, beam: int) -> dict:
    """Latency of one decoder step of ``batch`` sentences x ``beam`` rows, every row at position
    POSITION over a cache of random (finite) entries, top-k only (no log-probs), through
    ``run_step`` on the feeds a search makes (``DecoderBatch.feeds``)."""
    from deltalm.batch import DecoderBatch
    from deltalm.search import StepRules

    cfg = backend.cfg
    rows = batch * beam
    rng = np.random.default_rng(0)
    src = rng.integers(4, cfg.vocab_size, (batch, SRC_LEN)).astype(np.int64)
    src[:, -1] = cfg.eos
    encoded = backend.encode(src)
    state = DecoderBatch(cfg, backend.float_dtype, beam)
    state.admit(encoded.cross, encoded.padding, np.arange(batch))
    state.fit_positions(POSITION + 1)
    for cache in state.cache_views():
        cache[...] = rng.standard_normal(cache.shape).astype(cache.dtype)
    rules = StepRules(
        np.full(rows, -1, np.int64), np.zeros(rows, bool), np.zeros(rows, bool), np.zeros(rows, np.float32)
    )
    tokens = rng.integers(4, cfg.vocab_size, (rows, 1)).astype(np.int64)
    feeds = state.feeds(backend.step_spec, tokens, np.full(rows, POSITION, np.int64), rules)
    result = timed(lambda: backend.run_step(feeds))  # the same step every run: the cache is not written
    return result | {"cache_positions": state.cache_cap}


def timed(step_once) -> dict:
    for _ in range(WARMUP):
        step_once()
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        step_once()
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "runs": RUNS,
        "position": POSITION,
        "src_len": SRC_LEN,
    }


# ---------------------------------------------------------------------------------------------
# the report


def markdown(report: dict) -> str:
    """The report as a markdown summary: one row per stage, then verdicts, skips and failures."""
    lines = [
        f"# GPU check: {report['status']}",
        "",
        f"GPU: {report.get('gpu') or 'none'}; device checked: {report.get('device', '-')}; "
        f"{report.get('elapsed_s', 0)}s",
        "",
    ]
    if report.get("stages"):
        lines += ["| stage | ok | seconds | result |", "|---|---|---|---|"]
        for name, st in report["stages"].items():
            res = st.get("result")
            if not st["ok"]:
                text = st["error"][:120]
            elif name.startswith(("ort latency", "trt latency")):
                text = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
            elif name.startswith(("ort parity", "trt parity")):
                text = summary_line(res)
            else:
                text = ""
            lines.append(f"| {name} | {'yes' if st['ok'] else 'NO'} | {st['seconds']:.1f} | {text} |")
        lines.append("")
    for name, v in report.get("verdicts", {}).items():
        mark = ("PASS" if v["ok"] else "FAIL") + ("" if v.get("enforced", True) else " (recorded only)")
        lines.append(f"- {mark} {name}: {v['detail']}")
    lines += [f"- skipped: {s}" for s in report.get("skipped", [])]
    lines += [f"- FAILED: {f}" for f in report.get("failures", [])]
    lines += [f"- ERROR: {e}" for e in report.get("errors", [])]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gpu_report.json", json.loads(json.dumps(report, default=str)))
    with atomic_output(out / "gpu_report.md") as f:
        f.write(markdown(report).encode())


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m deltalm.export.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=env.get("OUT", "gpu_report"), help="report folder (env OUT)")
    p.add_argument("--work", default=env.get("GPU_CHECK_WORK", "/tmp/deltalm_gpu_check"), help="scratch folder")
    p.add_argument("--budget-s", type=float, default=float(env.get("GPU_CHECK_BUDGET_S", "420")))
    p.add_argument("--demo-steps", type=int, default=int(env.get("GPU_CHECK_DEMO_STEPS", "300")))
    p.add_argument(
        "--selftest",
        action="store_true",
        default=env.get("GPU_CHECK_SELFTEST") == "1",
        help="the CPU stands in for the GPU (tests this module; TensorRT skipped)",
    )
    p.add_argument(
        "--no-base",
        dest="base",
        action="store_false",
        default=env.get("GPU_CHECK_BASE", "0" if env.get("GPU_CHECK_SELFTEST") == "1" else "1") == "1",
        help="skip the base-size model",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    gpu = detect_gpu()
    providers = onnxruntime_providers()
    if gpu is None and not args.selftest:
        print("no GPU found: GPU checks skipped")
        write_report(
            out,
            {
                "gpu": None,
                "status": "skipped (no GPU)",
                "onnxruntime_providers": providers,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        print(f"report: {out / 'gpu_report.json'}")
        return 0
    print(f"GPU: {gpu or 'none (selftest: the CPU stands in for it)'}; ONNX Runtime providers: {' '.join(providers)}")
    return Run(out, Path(args.work), gpu, args.selftest, args.budget_s, args.base, args.demo_steps).run()


if __name__ == "__main__":
    sys.exit(main())
