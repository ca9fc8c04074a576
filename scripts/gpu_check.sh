#!/usr/bin/env bash
# Every GPU check in one run; writes ${OUT:-gpu_report}/gpu_report.json and gpu_check.log.
#
#   bash scripts/gpu_check.sh                  # here: needs the repo and python3 (or .venv)
#
# Without a GPU (no nvidia-smi GPU, no torch CUDA device) it prints "no GPU found: GPU checks
# skipped", writes {"gpu": null, "status": "skipped (no GPU)", ...} and exits 0.
#
# With a GPU:
#   1. builds the demo checkpoint (tiny DeltaLM fitted on the copy task) and a random
#      deltalm-base-sized fairseq checkpoint (toy sentencepiece model; its dict.txt is the toy one
#      padded with filler symbols to the 250001 rows of the embedding table);
#   2. exports both with `deltalm export` in fp32 and fp16 (each export runs its own parity
#      check against PyTorch on the CPU);
#   3. ONNX Runtime CUDA vs ONNX Runtime CPU, per graph: max abs error of every output, top-1
#      agreement of the in-graph top-k;
#   4. end to end on the demo model: greedy and beam 5 translations, ORT CUDA vs ORT CPU;
#   5. decoder step latency with IO binding (the ORT backend's own step), median of 60 runs after
#      10 warm-up runs, batch 1 and batch 8 x beam 5, past_len 32;
#   6. if `import tensorrt` works: `deltalm engines` (demo: fp32 engines, base: fp16 engines), TRT
#      vs ORT CPU log-probs over the first steps, end to end on the demo model, and the same
#      latency measurements through the TRT backend.
# The exit status is 0 when everything ran and the demo model's verdicts hold, 1 otherwise.
#
# Environment: OUT (report folder), GPU_CHECK_WORK (scratch folder, default /tmp/deltalm_gpu_check;
# checkpoints and artifacts are reused from there when present), GPU_CHECK_BUDGET_S (default 420:
# later stages are skipped once it is spent), GPU_CHECK_BASE=0 (skip the base-size model),
# GPU_CHECK_DEMO_STEPS (default 300), GPU_CHECK_SELFTEST=1 (no GPU needed: the CPU stands in for
# the GPU, to test this script itself).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
REPORT_DIR=${OUT:-gpu_report}
mkdir -p "$REPORT_DIR"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK=${GPU_CHECK_WORK:-/tmp/deltalm_gpu_check}
SELFTEST=${GPU_CHECK_SELFTEST:-0}

gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
if [ -z "$gpu" ]; then  # no nvidia-smi in some containers: ask the CUDA runtime through torch
  gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
fi
providers=$("$PY" -c 'import onnxruntime as o; print(" ".join(o.get_available_providers()))' 2>/dev/null)

if [ -z "$gpu" ] && [ "$SELFTEST" != 1 ]; then
  echo "no GPU found: GPU checks skipped"
  json_providers=""
  for p in $providers; do json_providers="${json_providers:+$json_providers, }\"$p\""; done
  printf '{\n  "gpu": null,\n  "status": "skipped (no GPU)",\n  "onnxruntime_providers": [%s],\n  "time": "%s"\n}\n' \
    "$json_providers" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$REPORT_DIR/gpu_report.json"
  echo "report: $REPORT_DIR/gpu_report.json"
  exit 0
fi

echo "GPU: ${gpu:-none (selftest: the CPU stands in for it)}; ONNX Runtime providers: $providers"
"$PY" - "$REPORT_DIR" "$WORK" "$gpu" <<'PY' 2>&1 | tee "$REPORT_DIR/gpu_check.log"
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

REPORT_DIR, WORK, GPU = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None
SELFTEST = os.environ.get("GPU_CHECK_SELFTEST") == "1"
DEVICE = "cpu" if SELFTEST else "cuda"
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
WITH_BASE = os.environ.get("GPU_CHECK_BASE", "0" if SELFTEST else "1") == "1"
T0 = time.time()
WORK.mkdir(parents=True, exist_ok=True)
report = {"gpu": GPU, "status": "running", "selftest": SELFTEST, "device": DEVICE,
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": {}, "stages": {},
          "verdicts": {}, "failures": [], "errors": [], "skipped": []}


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save():
    report["elapsed_s"] = round(time.time() - T0, 1)
    tmp = REPORT_DIR / "gpu_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, REPORT_DIR / "gpu_report.json")


def stage(name, fn, *args, need_s=0.0):
    """Run one check; its result (or its error) goes into the report, which is saved at once."""
    left = BUDGET - (time.time() - T0)
    if left < need_s:
        report["skipped"].append(f"{name}: time budget spent ({left:.0f}s left, needs ~{need_s:.0f}s)")
        log(f"skip {name}: time budget")
        save()
        return None
    log(f"start {name}")
    t = time.time()
    try:
        result = fn(*args)
        report["stages"][name] = {"ok": True, "seconds": round(time.time() - t, 1), "result": result}
        return result
    except Exception as e:
        report["stages"][name] = {"ok": False, "seconds": round(time.time() - t, 1), "error": f"{type(e).__name__}: {e}"}
        report["errors"].append(f"{name}: {type(e).__name__}: {e}")
        traceback.print_exc()
        return None
    finally:
        log(f"end {name} ({time.time() - t:.1f}s)")
        save()


def verdict(name, ok, detail):
    report["verdicts"][name] = {"ok": bool(ok), "detail": detail}
    if not ok:
        report["failures"].append(f"{name}: {detail}")


# ---------------------------------------------------------------------------------------------

def versions():
    import onnxruntime
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
         "cpu_count": os.cpu_count()}
    try:
        import tensorrt

        v["tensorrt"] = tensorrt.__version__
    except Exception as e:
        v["tensorrt"] = None
        v["tensorrt_missing"] = str(e)
    try:
        import polygraphy

        v["polygraphy"] = polygraphy.__version__
    except Exception:
        v["polygraphy"] = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True)
        v["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    report["versions"] = v
    return v


def demo_checkpoint():
    import torch

    from deltalm.export.toy_model import build_demo_checkpoint

    d = WORK / "demo"
    if not (d / "checkpoint_best.pt").exists():
        torch.set_num_threads(min(8, os.cpu_count() or 1))
        build_demo_checkpoint(d, steps=int(os.environ.get("GPU_CHECK_DEMO_STEPS", "300")))
    return {"dir": str(d)}


def base_checkpoint():
    """Random deltalm-base (768d, 12+6 layers, 250001 rows) as a fairseq checkpoint; the toy
    sentencepiece model with the toy dict.txt padded by filler symbols to 250001 entries (export
    checks the dictionary size against the embedding rows; nothing else needs a real vocabulary)."""
    import torch

    from deltalm.export.model import DeltaLM
    from deltalm.export.toy_data import build_toy_tokenizer
    from deltalm.export.toy_model import save_fairseq_checkpoint
    from deltalm.config import ModelConfig
    from deltalm.tokenizer import Dictionary

    d = WORK / "base"
    if (d / "checkpoint.pt").exists():
        return {"dir": str(d)}
    d.mkdir(parents=True, exist_ok=True)
    build_toy_tokenizer(d)
    cfg = ModelConfig.from_name("deltalm-base")
    have = len(Dictionary.load(d / "dict.txt"))
    with open(d / "dict.txt", "a") as f:
        f.writelines(f"madeupword{i:06d} 0\n" for i in range(cfg.vocab_size - have))
    assert len(Dictionary.load(d / "dict.txt")) == cfg.vocab_size
    torch.manual_seed(0)
    model = DeltaLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(std=0.05)
    save_fairseq_checkpoint(model.eval(), d / "checkpoint.pt")
    return {"dir": str(d), "parameters": sum(p.numel() for p in model.parameters())}


def export(model_dir, ckpt, precision):
    from deltalm.cli import main

    out = WORK / f"{Path(model_dir).name}-{precision}"
    if (out / "manifest.json").exists():
        return {"artifact": str(out), "reused": True}
    rc = main(["export", str(Path(model_dir) / ckpt), "--spm", str(Path(model_dir) / "spm.model"),
               "--dict", str(Path(model_dir) / "dict.txt"), "--out", str(out), "--precision", precision, "--force"])
    if rc == 130:  # interrupted (Ctrl-C, SIGTERM): stop everything, not just this stage
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"deltalm export exited with {rc}")
    parity = json.loads((out / "parity.json").read_text())
    return {"artifact": str(out), "torch_parity_passed": parity["passed"], "end_to_end_vs_torch": parity["end_to_end"]}


# -- ONNX Runtime: device vs CPU, per graph ---------------------------------------------------

def sessions(artifact, graph):
    import onnxruntime as ort

    from deltalm.backends.ort import providers_for, session_options

    path = str(artifact.graph_path(graph))
    dev = ort.InferenceSession(path, session_options(), providers=providers_for(DEVICE))
    on_device(dev)
    return ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"]), dev


def on_device(session):
    """ONNX Runtime falls back to the CPU when the CUDA provider cannot load: refuse that."""
    if DEVICE == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the CUDA execution provider did not load (session providers: {session.get_providers()})")


def compare_outputs(names, ref, got):
    from deltalm.export.parity import compare

    rows = {}
    for name, r, g in zip(names, ref, got):
        rows[name] = {k: v for k, v in compare(name, g, r).items() if k != "output"}
    return rows


def ort_graph_parity(artifact_dir):
    from deltalm.export.parity import make_sources
    from deltalm.artifact import open_artifact

    artifact = open_artifact(artifact_dir)
    cfg = artifact.config
    rng = np.random.default_rng(0)
    result = {}
    cpu, dev = sessions(artifact, "encoder")
    src = make_sources(cfg, (7, 3, 12), rng)
    names = artifact.graph_spec("encoder").output_names
    enc_cpu = cpu.run(names, {"src_tokens": src})
    result["encoder"] = compare_outputs(names, enc_cpu, dev.run(names, {"src_tokens": src}))
    spec = artifact.graph_spec("decoder_step")
    cpu, dev = sessions(artifact, "decoder_step")
    fdt = np.dtype(spec.outputs[-1].dtype)
    cross = dict(zip(names, enc_cpu))
    for sents, group, past_len in ((3, 2, 0), (2, 5, 17)):
        rows = sents * group
        feeds = {"tokens": rng.integers(4, cfg.vocab_size, rows).astype(np.int64), "step": np.array(past_len, np.int64),
                 "reorder": rng.integers(0, rows, rows).astype(np.int64), "sent_index": np.arange(sents, dtype=np.int64)[::-1].copy(),
                 "src_padding": src == cfg.pad, "forced_tokens": np.full(rows, -1, np.int64), "ban_eos": np.array(False),
                 "only_eos": np.array(False), "unk_penalty": np.array(0.0, np.float32)}
        for t in spec.inputs:
            if t.name.startswith("past_"):
                feeds[t.name] = rng.standard_normal((rows, cfg.heads, past_len, cfg.head_dim)).astype(fdt)
            elif t.name.startswith("cross_"):
                feeds[t.name] = cross[t.name]
        out_names = spec.output_names
        result[f"decoder_step sents={sents} group={group} past_len={past_len}"] = compare_outputs(
            out_names, cpu.run(out_names, feeds), dev.run(out_names, feeds))
    return result


def summarize_parity(result):
    """max abs of log_probs and the worst top-1 agreement of topk_ids, over the step cases."""
    steps = [v for k, v in result.items() if k.startswith("decoder_step")]
    return {"log_probs_max_abs": max(s["log_probs"]["max_abs"] for s in steps),
            "top1_agreement": min(s["topk_ids"]["top1_agreement"] for s in steps),
            "cross_kv_max_abs": max(v["max_abs"] for k, v in result["encoder"].items() if "max_abs" in v)}


# -- end to end -----------------------------------------------------------------------------

def demo_sources():
    from deltalm.export.toy_data import toy_corpus
    from deltalm.tokenizer import Tokenizer

    tok = Tokenizer(WORK / "demo" / "spm.model", WORK / "demo" / "dict.txt")
    lines = toy_corpus()[::25]  # 16 sentences, all four languages
    return [tok.collate([tok.encode(s) for s in lines[i:i + 8]]) for i in range(0, len(lines), 8)]


def agreement(backend_a, backend_b, sources):
    from deltalm.search import SearchOptions, generate

    out = {}
    for beam in (1, 5):
        opts = SearchOptions(beam=beam, max_len_b=64)
        same = total = 0
        worst = 0.0
        for src in sources:
            for ha, hb in zip(generate(backend_a, src, opts), generate(backend_b, src, opts)):
                total += 1
                if ha[0].tokens == hb[0].tokens:
                    same += 1
                    worst = max(worst, abs(ha[0].score - hb[0].score))
        out[f"beam{beam}"] = {"sentences": total, "identical": same / total, "max_score_diff": worst}
    return out


def ort_end_to_end(artifact_dir):
    from deltalm.backends.ort import OrtBackend

    dev = OrtBackend.from_artifact(artifact_dir, device=DEVICE)
    on_device(dev.decoder)
    return agreement(OrtBackend.from_artifact(artifact_dir, device="cpu"), dev, demo_sources())


# -- latency --------------------------------------------------------------------------------

CONFIGS = (("batch1", 1, 1), ("batch8_beam5", 8, 5))
PAST_LEN, SRC_LEN, WARMUP, RUNS = 32, 32, 10, 60


def step_inputs(cfg, batch, beam):
    from deltalm.search import StepRules

    rows = batch * beam
    rng = np.random.default_rng(0)
    src = rng.integers(4, cfg.vocab_size, (batch, SRC_LEN)).astype(np.int64)
    src[:, -1] = cfg.eos
    rules = StepRules(ban_eos=False, only_eos=False, unk_penalty=0.0, forced_tokens=np.full(rows, -1, np.int64))
    tokens = rng.integers(4, cfg.vocab_size, rows).astype(np.int64)
    return src, tokens, np.arange(rows, dtype=np.int64), np.arange(batch, dtype=np.int64), rules


def timed(step_once):
    for _ in range(WARMUP):
        step_once()
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        step_once()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(float(np.percentile(times, 90)), 3),
            "runs": RUNS, "past_len": PAST_LEN, "src_len": SRC_LEN}


def ort_latency(artifact_dir):
    from deltalm.backends.ort import OrtBackend

    backend = OrtBackend.from_artifact(artifact_dir, device=DEVICE)
    on_device(backend.decoder)
    cfg = backend.cfg
    out = {}
    for name, batch, beam in CONFIGS:
        src, tokens, reorder, live, rules = step_inputs(cfg, batch, beam)
        state = backend.encode(src)
        past_np = np.random.default_rng(1).standard_normal(
            (batch * beam, cfg.heads, PAST_LEN, cfg.head_dim)).astype(backend.float_dtype)
        past = {n: backend._value(past_np) for n in backend._past_names}  # device-resident, like a real cache

        def once():
            state.past = past  # every run continues the same 32-token past
            backend.step(state, tokens, PAST_LEN, reorder, live, rules, want="topk")

        out[name] = timed(once)
    return out


# -- TensorRT -------------------------------------------------------------------------------

def trt_engines(artifact_dir, precision):
    from deltalm.cli import main

    rc = main(["engines", str(artifact_dir), "--precision", precision, "--max-batch", "8", "--max-beam", "5",
               "--max-src-len", "64", "--max-tgt-len", "72"])
    if rc != 0:
        raise RuntimeError(f"deltalm engines exited with {rc}")
    return json.loads((Path(artifact_dir) / "engines" / "engines.json").read_text())


def trt_parity(artifact_dir):
    """TRT vs ORT CPU over the first 4 greedy steps of a batch of 3 x beam 2: log-probs max abs and
    top-1 agreement (both backends are fed the same tokens: ORT CPU's argmax)."""
    from deltalm.export.parity import make_sources
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend
    from deltalm.search import SearchOptions, step_rules

    ref, trt = OrtBackend.from_artifact(artifact_dir, device="cpu"), TrtBackend.from_artifact(artifact_dir)
    cfg = ref.cfg
    src = make_sources(cfg, (9, 4, 13), np.random.default_rng(2))
    rows, live = 6, np.arange(3, dtype=np.int64)
    sa, sb = ref.encode(src), trt.encode(src)
    tokens, reorder = np.full(rows, cfg.eos, np.int64), np.arange(rows, dtype=np.int64)
    worst, top1 = 0.0, []
    for step in range(4):
        rules = step_rules(SearchOptions(beam=2), step, 64, rows)
        a = ref.step(sa, tokens, step, reorder, live, rules, want="logprobs")
        b = trt.step(sb, tokens, step, reorder, live, rules, want="logprobs")
        worst = max(worst, float(np.abs(a - b).max()))
        top1.append(float(np.mean(a.argmax(1) == b.argmax(1))))
        tokens = a.argmax(1).astype(np.int64)
    trt.close()
    return {"log_probs_max_abs": worst, "top1_agreement": min(top1)}


def trt_end_to_end(artifact_dir):
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend

    trt = TrtBackend.from_artifact(artifact_dir)
    try:
        return agreement(OrtBackend.from_artifact(artifact_dir, device="cpu"), trt, demo_sources())
    finally:
        trt.close()


def trt_latency(artifact_dir):
    from deltalm.backends.trt import TrtBackend

    backend = TrtBackend.from_artifact(artifact_dir)
    out = {}
    for name, batch, beam in CONFIGS:
        src, tokens, reorder, live, rules = step_inputs(backend.cfg, batch, beam)
        state = backend.encode(src)

        def once():
            state.past_len, state.past_rows = PAST_LEN, batch * beam  # the device caches hold 32 steps
            backend.step(state, tokens, PAST_LEN, reorder, live, rules, want="topk")

        out[name] = timed(once)
    backend.close()
    return out


# ---------------------------------------------------------------------------------------------

stage("versions", versions)
have_trt = report["versions"].get("tensorrt") is not None
artifacts = {}


def check_artifact(model, precision, art):
    """Everything ONNX Runtime: graph parity device vs CPU, translations (demo), step latency."""
    r = stage(f"ort parity {model} {precision}", ort_graph_parity, art)
    if r:
        s = summarize_parity(r)
        report["stages"][f"ort parity {model} {precision}"]["summary"] = s
        if model == "demo":
            limit = 1e-3 if precision == "fp32" else 5e-2
            verdict(f"ORT {DEVICE} vs CPU, demo {precision}", s["log_probs_max_abs"] <= limit and s["top1_agreement"] == 1.0,
                    f"log-probs max abs {s['log_probs_max_abs']:.2e} (limit {limit:.0e}), top-1 agreement {s['top1_agreement']:.2f}")
    if model == "demo":
        r = stage(f"ort end to end demo {precision}", ort_end_to_end, art)
        if r:
            need = 1.0 if precision == "fp32" else 0.9
            verdict(f"ORT {DEVICE} vs CPU translations, demo {precision}", min(v["identical"] for v in r.values()) >= need,
                    ", ".join(f"{k}: {v['identical']:.0%} identical" for k, v in r.items()) + f" (need {need:.0%})")
    if (model, precision) != ("demo", "fp16"):
        stage(f"ort latency {model} {precision}", ort_latency, art, need_s=20)


models = []
if stage("demo checkpoint", demo_checkpoint):
    models.append(("demo", WORK / "demo", "checkpoint_best.pt"))
if not WITH_BASE:
    report["skipped"].append("base-size model (GPU_CHECK_BASE=0)")
elif models and stage("base checkpoint", base_checkpoint, need_s=240):
    models.append(("base", WORK / "base", "checkpoint.pt"))
for model, d, ckpt in models:
    for precision in ("fp32", "fp16"):
        r = stage(f"export {model} {precision}", export, d, ckpt, precision, need_s=90 if model == "base" else 10)
        if r:
            artifacts[(model, precision)] = r["artifact"]
            check_artifact(model, precision, r["artifact"])

if have_trt and not SELFTEST:
    for model, precision in (("demo", "fp32"), ("base", "fp16")):
        art = artifacts.get((model, "fp32"))
        if not art:
            continue
        if not stage(f"trt engines {model} {precision}", trt_engines, art, precision, need_s=150 if model == "base" else 30):
            continue
        r = stage(f"trt parity {model} {precision}", trt_parity, art)
        if r and model == "demo":
            verdict("TRT fp32 engines vs ORT CPU, demo", r["log_probs_max_abs"] <= 1e-3 and r["top1_agreement"] == 1.0,
                    f"log-probs max abs {r['log_probs_max_abs']:.2e}, top-1 agreement {r['top1_agreement']:.2f}")
        if model == "demo":
            r = stage("trt end to end demo", trt_end_to_end, art)
            if r:
                verdict("TRT vs ORT CPU translations, demo", min(v["identical"] for v in r.values()) == 1.0,
                        ", ".join(f"{k}: {v['identical']:.0%} identical" for k, v in r.items()))
        stage(f"trt latency {model} {precision}", trt_latency, art, need_s=20)
else:
    report["skipped"].append("TensorRT: " + ("selftest" if SELFTEST else f"not importable ({report['versions'].get('tensorrt_missing')})"))

report["status"] = "failed" if report["errors"] or report["failures"] else "passed"
save()

print("\n=== summary ===")
print(f"GPU: {GPU or 'none (selftest)'}; device checked: {DEVICE}; {report['elapsed_s']}s")
for name, st in report["stages"].items():
    res = st.get("summary") or st.get("result")
    line = f"  {'ok ' if st['ok'] else 'ERR'} {name:<34} {st['seconds']:>6.1f}s"
    if not st["ok"]:
        line += f"  {st['error'][:120]}"
    elif name.startswith(("ort latency", "trt latency")):
        line += "  " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
    elif name.startswith(("ort end to end", "trt end to end")):
        line += "  " + ", ".join(f"{k} {v['identical']:.0%} identical" for k, v in res.items())
    elif name.startswith(("ort parity", "trt parity")):
        line += f"  log-probs max abs {res['log_probs_max_abs']:.2e}, top-1 {res['top1_agreement']:.2f}"
    print(line)
for s in report["skipped"]:
    print(f"  skipped: {s}")
for f in report["failures"]:
    print(f"  FAILED: {f}")
print(f"status: {report['status']}; report: {REPORT_DIR / 'gpu_report.json'}")
sys.exit(0 if report["status"] == "passed" else 1)
PY
exit "${PIPESTATUS[0]}"
