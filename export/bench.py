"""``deltalm bench``: the same checkpoint and the same inputs through every available backend,
each figure next to the ``torch`` baseline of the same run and next to this machine's floors.

Flow (``bench_command``): prepare the model (tiny: the demo checkpoint; base: a random
deltalm-base-sized checkpoint and a 250001-symbol dictionary) -> export fp32 / fp16 / int8
artifacts (each in a child process: wall time and peak RSS) -> measure the machine (GEMM peak,
read bandwidth) -> one child process per backend runs every workload (so peak RSS is per backend)
-> the memory check (``deltalm translate`` through ort fp32, in a child) -> ONNX Runtime's
profiler on the fp32 decoder step -> ``bench.json``, ``bench.md``, ``bench.png``, ``profile.md``.

Every generation is forced to a fixed length (``min_len = max_len_b = N``, ``max_len_a = 0``):
N + 1 decoder steps (the last one emits ``</s>``), so random-weight models do the same work on
every backend. Where a cell would take too long (the torch baseline at batch 32 x beam 5), fewer
steps are measured and the per-step median is extrapolated to N + 1 steps; such cells are marked.

The pure parts (statistics, floors, FLOP / byte counting of a step graph, table formatting) are
plain functions tested in ``tests/test_bench.py``; torch is imported only where a function needs it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")
BASE_VOCAB = 250001


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# child processes: wall time and peak RSS of each


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    cpu_s: float = 0.0  # the child's user + system CPU time
    others_cpu_share: float = 0.0  # CPU used by every other process meanwhile / (wall x cores)
    stdout: str = ""
    stderr: str = ""


def machine_busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat), 0 if unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10, sample_s: float = 1.0) -> dict:
    """Wait (at most ``max_wait_s``) until the machine's busy share over ``sample_s`` is at most
    ``threshold`` (call it while this process is idle: its own share counts as busy). Other
    sessions share this machine; a cell measured while they run is slower by their load."""
    t0 = time.perf_counter()
    while True:
        b0 = machine_busy_s()
        time.sleep(sample_s)
        share = (machine_busy_s() - b0) / (sample_s * (os.cpu_count() or 1))
        waited = time.perf_counter() - t0
        if share <= threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "busy_share": round(share, 3), "quiet": share <= threshold}


def run_child(cmd: list[str], stdin: str | None = None, echo: bool = False) -> ChildResult:
    """Run ``cmd`` and return its exit code, wall time, CPU time and the share of the machine other
    processes used meanwhile. ``echo``: copy the child's stderr to ours as it comes.

    Peak RSS is not taken from here: Linux folds the parent's high-water mark into a
    (v)forked child's ru_maxrss at exec, so the children report their own ``VmHWM``."""
    t0 = time.perf_counter()
    busy0 = machine_busy_s()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # threads drain the pipes; the child is reaped by wait4 below, not by Popen
    out_chunks, err_chunks = [], []
    import threading

    def drain(stream, sink, tee):
        for line in stream:
            sink.append(line)
            if tee:
                sys.stderr.write(line)
                sys.stderr.flush()

    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks, False), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks, echo), daemon=True)]
    for t in threads:
        t.start()
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, machine_busy_s() - busy0 - cpu) / (wall * (os.cpu_count() or 1))
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    return ChildResult(proc.returncode, wall, cpu, others, "".join(out_chunks), "".join(err_chunks))


def run_cli(cli_args: list[str], record: Path, stdin: str | None = None) -> tuple[float, ChildResult]:
    """``deltalm CLI_ARGS`` in a child that reports its own peak RSS (MB) into ``record``."""
    record.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    res = run_child([sys.executable, "-m", "deltalm.export.bench", "cli", str(record), *cli_args], stdin=stdin)
    peak = json.loads(record.read_text())["peak_rss_mb"] if record.exists() else float("nan")
    record.unlink(missing_ok=True)
    return peak, res


# ---------------------------------------------------------------------------------------------
# the models


@dataclass(frozen=True)
class ModelFiles:
    name: str  # tiny | base
    checkpoint: Path
    spm: Path
    dict: Path


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

        from .toy_model import build_demo_checkpoint

        torch.set_num_threads(os.cpu_count() or 1)
        _log(f"building the demo checkpoint in {model_dir}/")
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

    from .model import DeltaLM
    from .toy_data import build_toy_tokenizer
    from .toy_model import save_fairseq_checkpoint

    model_dir.mkdir(parents=True, exist_ok=True)
    build_toy_tokenizer(model_dir)
    write_filler_dictionary(dict_path, BASE_VOCAB)
    cfg = ModelConfig.from_name("deltalm-base").replace(vocab_size=BASE_VOCAB)
    _log(f"building a random deltalm-base checkpoint in {model_dir}/")
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


def export_code_fingerprint() -> str:
    """sha256 over the sources that decide what an export writes (export/ but this file, and the
    runtime's config and graph declarations): an artifact exported by other code is redone, so
    every backend of a run measures graphs of the same version."""
    import hashlib

    import deltalm.config
    import deltalm.graphs

    root = Path(__file__).resolve().parent
    paths = sorted(p for p in root.glob("*.py") if p.name != "bench.py")
    paths += [Path(deltalm.config.__file__), Path(deltalm.graphs.__file__)]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def export_artifacts(files: ModelFiles, art_root: Path, precisions=PRECISIONS) -> dict:
    """``deltalm export`` per precision into art_root/PRECISION, each in a child process (wall time,
    peak RSS). An artifact that exists and was exported by the current export code is kept, with
    the figures of the run that exported it."""
    record_path = art_root / "exports.json"
    records = json.loads(record_path.read_text()) if record_path.exists() else {}
    code = export_code_fingerprint()
    for precision in precisions:
        out = art_root / precision
        if (out / "manifest.json").exists() and records.get(precision, {}).get("export_code") == code:
            records[precision]["reused"] = True
            continue
        _log(f"exporting {files.name} {precision} -> {out}")
        peak, res = run_cli(["export", str(files.checkpoint), "--spm", str(files.spm), "--dict", str(files.dict),
                             "--out", str(out), "--precision", precision, "--force"], art_root / f".export-{precision}.json")
        if res.returncode != 0:
            raise RuntimeError(f"export {precision} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        parity = json.loads((out / "parity.json").read_text())
        records[precision] = {"wall_s": round(res.wall_s, 1), "peak_rss_mb": round(peak),
                              "timings_s": parity.get("timings_s"), "reused": False, "export_code": code,
                              "end_to_end": parity.get("end_to_end")}
        art_root.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(records, indent=2) + "\n")
    return records


# ---------------------------------------------------------------------------------------------
# workloads and statistics (pure)


@dataclass(frozen=True)
class Workload:
    beam: int  # 1: greedy
    batch: int  # sentences
    src_len: int  # approximate source length in pieces (</s> included)

    @property
    def search(self) -> str:
        return "greedy" if self.beam == 1 else f"beam {self.beam}"

    @property
    def name(self) -> str:
        return f"{self.search}, batch {self.batch}, src ~{self.src_len}"

    @property
    def key(self) -> str:
        return f"b{self.beam}-n{self.batch}-s{self.src_len}"


def workloads(src_lens=(10, 30, 100), batches=(1, 32), beams=(1, 5)) -> list[Workload]:
    return [Workload(beam, batch, s) for beam in beams for batch in batches for s in src_lens]


def make_sources(vocab_size: int, eos: int, pad: int, batch: int, src_len: int, seed: int) -> np.ndarray:
    """[batch, width] int64, left-padded: random ids in [4, vocab) ending with </s>. Batch 1 has
    exactly ``src_len`` pieces; larger batches lengths spread over 0.8 .. 1.2 x src_len."""
    rng = np.random.default_rng(seed)
    if batch == 1:
        lengths = [src_len]
    else:
        lengths = rng.integers(max(2, round(0.8 * src_len)), round(1.2 * src_len) + 1, size=batch).tolist()
    width = max(lengths)
    src = np.full((batch, width), pad, dtype=np.int64)
    for r, n in enumerate(lengths):
        src[r, width - n:] = np.concatenate([rng.integers(4, vocab_size, size=n - 1), [eos]])
    return src


def forced_length_options(beam: int, n: int):
    """Every hypothesis gets exactly n tokens and then </s>: n + 1 decoder steps."""
    from deltalm.search import SearchOptions

    return SearchOptions(beam=beam, nbest=1, max_len_a=0.0, max_len_b=n, min_len=n)


def time_stats(seconds) -> dict:
    """n, mean, p50, p90, min, max of a list of durations (seconds in, milliseconds out)."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()), "max_ms": float(a.max())}


def plan_cell(n_target: int, encode_s: float, step_s: float, budget_s: float, max_reps: int,
              min_reps: int = 3, min_steps: int = 4) -> tuple[int, int]:
    """(steps to generate, repetitions) for a cell whose warm-up showed ``encode_s`` and a step of
    ``step_s``: the full ``n_target`` when ``min_reps`` full runs fit the budget (more runs, up to
    ``max_reps``, when they fit); else fewer steps (at least ``min_steps``), ``min_reps`` runs, and
    the caller extrapolates the per-step time to ``n_target`` steps."""
    full = encode_s + (n_target + 1) * step_s
    if full * min_reps <= budget_s:
        return n_target, int(max(min_reps, min(max_reps, budget_s // max(full, 1e-9))))
    per_run = budget_s / min_reps
    steps = int((per_run - encode_s) / max(step_s, 1e-9)) - 1
    return max(min_steps, min(n_target, steps)), min_reps


# ---------------------------------------------------------------------------------------------
# the machine's floors


def gemm_peak_gflops(n: int = 3072, reps: int = 3) -> float:
    """Best fp32 rate of numpy's matmul (BLAS, all cores) on [n, n] x [n, n]: 2 n^3 / time."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool, page faults of the output)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def read_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> float:
    """Best rate of summing a float32 array of ``nbytes`` (1 GB: far beyond every cache), split
    over ``threads`` threads (numpy releases the GIL in reductions): bytes read / time."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    x = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(x, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def _ort_session(nodes, inputs, outputs, threads: int | None):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "floor", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _best_time(fn, reps: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ort_gemm_gflops(n: int = 3072, reps: int = 3, threads: int | None = None) -> float:
    """The same product through ONNX Runtime's MatMul (MLAS), which beats numpy's BLAS on some CPUs."""
    from onnx import TensorProto, helper

    sess = _ort_session([helper.make_node("MatMul", ["a", "b"], ["c"])],
                        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], threads)
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in "ab"}
    return 2.0 * n ** 3 / _best_time(lambda: sess.run(None, feeds), reps) / 1e9


def ort_read_gbs(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> float:
    """Bytes / time of ONNX Runtime's ReduceSum over a float32 [rows, 4096] array of ``nbytes``."""
    from onnx import TensorProto, helper

    sess = _ort_session([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4096])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], threads)
    x = np.ones((nbytes // 4 // 4096, 4096), dtype=np.float32)
    return x.nbytes / _best_time(lambda: sess.run(None, {"x": x}), reps) / 1e9


def measure_floors(gemm_n: int = 3072, read_bytes: int = 1 << 30) -> dict:
    """This machine's fp32 GEMM peak and read bandwidth: the best of numpy and ONNX Runtime."""
    f = {"gemm_n": gemm_n, "read_bytes": read_bytes,
         "gemm_numpy_gflops": gemm_peak_gflops(gemm_n), "gemm_ort_gflops": ort_gemm_gflops(gemm_n),
         "read_numpy_gbs": read_bandwidth_gbs(read_bytes), "read_ort_gbs": ort_read_gbs(read_bytes)}
    f["gemm_gflops"] = max(f["gemm_numpy_gflops"], f["gemm_ort_gflops"])
    f["read_gbs"] = max(f["read_numpy_gbs"], f["read_ort_gbs"])
    return f


def machine_info() -> dict:
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnx
        import torch

        versions |= {"torch": torch.__version__, "onnx": onnx.__version__}
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
            "ort_providers": onnxruntime.get_available_providers(), "versions": versions}


# ---------------------------------------------------------------------------------------------
# what one decoder step costs (pure, from the exported graph)

_MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
               "QLinearMatMul"}
_PASS_THROUGH = {"Cast", "DequantizeLinear", "Transpose", "Identity"}
_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # onnx.TensorProto ids


@dataclass
class StepGraphCost:
    """matmul_weights: elements of the constant right-hand operands of the step's matrix
    products (one multiply-add per element per row); weight_bytes: bytes of the initializers a
    step reads in full; gathered_bytes: initializers that are only gathered from (a few rows read
    per step, e.g. the fp32 embedding table next to its int8 copy); bytes_by_dtype: read bytes
    per element type."""

    matmul_weights: int
    weight_bytes: int
    gathered_bytes: int
    bytes_by_dtype: dict = field(default_factory=dict)
    largest: list = field(default_factory=list)  # [(name, shape, bytes)] of the 3 largest read initializers


def step_graph_cost(model) -> StepGraphCost:
    """Count the weights of an ONNX graph (ModelProto; its initializers' data need not be loaded)."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list[tuple[str, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n.op_type, i))

    def source_initializer(name: str):
        seen = 0
        while name not in inits and name in producer and producer[name].op_type in _PASS_THROUGH and seen < 4:
            name, seen = producer[name].input[0], seen + 1
        return inits.get(name)

    matmul_weights = 0
    for n in model.graph.node:
        if n.op_type in _MATMUL_OPS and len(n.input) > 1:
            b_index = 3 if n.op_type == "QLinearMatMul" else 1
            t = source_initializer(n.input[b_index])
            if t is not None and len(t.dims) >= 2:
                matmul_weights += int(np.prod(t.dims))

    weight_bytes = gathered = 0
    by_dtype: dict[str, int] = {}
    sized = []
    for name, t in inits.items():
        nbytes = int(np.prod(t.dims)) * _DTYPE_BYTES.get(t.data_type, 4) if t.dims else _DTYPE_BYTES.get(t.data_type, 4)
        uses = consumers.get(name, [])
        if uses and all(op == "Gather" and i == 0 for op, i in uses):
            gathered += nbytes
            continue
        weight_bytes += nbytes
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        sized.append((name, list(t.dims), nbytes))
    sized.sort(key=lambda x: -x[2])
    return StepGraphCost(matmul_weights, weight_bytes, gathered, by_dtype, sized[:3])


def step_flops(matmul_weights: int, cfg, rows: int, past_len: float, src_len: float) -> float:
    """FLOPs of one step: 2 x weights x rows for the matrix products, plus per row and layer
    Q.K and P.V over the self-attention (past_len + 1 keys) and the source (src_len keys)."""
    attention = rows * cfg.decoder_layers * 4 * cfg.embed_dim * ((past_len + 1) + src_len)
    return 2.0 * matmul_weights * rows + attention


def step_bytes(weight_bytes: int, cfg, rows: int, sents: int, past_len: float, src_len: float, kv_itemsize: int) -> float:
    """Bytes one step must read at least: every weight once, the self-attention caches of every row
    and the cross-attention K/V of every live sentence."""
    kv = cfg.decoder_layers * 2 * cfg.embed_dim * kv_itemsize * (rows * past_len + sents * src_len)
    return float(weight_bytes) + kv


def step_floor(flops: float, nbytes: float, gflops: float, gbs: float) -> dict:
    """Roofline floor of one step: the larger of compute time and read time, and which it is."""
    compute_ms = flops / (gflops * 1e9) * 1e3
    memory_ms = nbytes / (gbs * 1e9) * 1e3
    return {"compute_ms": compute_ms, "memory_ms": memory_ms, "floor_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "bandwidth"}


# ---------------------------------------------------------------------------------------------
# measurement (runs in a child process per backend)


class TimedBackend:
    """Wraps a backend and records the wall time of every ``encode`` and ``step`` call. The
    backends return host arrays, so a call's wall time includes its device work."""

    def __init__(self, inner):
        self.inner = inner
        self.cfg = inner.cfg
        self.topk = inner.topk
        self.encode_s: list[float] = []
        self.step_s: list[float] = []

    def reset(self) -> None:
        self.encode_s, self.step_s = [], []

    def encode(self, src_tokens):
        t0 = time.perf_counter()
        state = self.inner.encode(src_tokens)
        self.encode_s.append(time.perf_counter() - t0)
        return state

    def step(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner.step(*args, **kwargs)
        self.step_s.append(time.perf_counter() - t0)
        return out


def _proc_status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss also holds the parent's at fork)."""
    return _proc_status_mb("VmHWM")


def _current_rss_mb() -> float:
    return _proc_status_mb("VmRSS")


def generate_timed(timed: TimedBackend, src: np.ndarray, beam: int, n: int) -> dict:
    """One forced-length generation: total, encode and per-step times (seconds)."""
    from deltalm.search import generate

    timed.reset()
    t0 = time.perf_counter()
    hyps = generate(timed, src, forced_length_options(beam, n))
    total = time.perf_counter() - t0
    lengths = {len(h[0].tokens) for h in hyps}
    if lengths != {n + 1}:
        raise RuntimeError(f"forced length {n} + </s> not respected: lengths {sorted(lengths)}")
    return {"total_s": total, "encode_s": timed.encode_s[0], "step_s": list(timed.step_s)}


def measure_cell(timed: TimedBackend, wl: Workload, src: np.ndarray, n_target: int, budget_s: float,
                 max_reps: int, min_reps: int = 3) -> dict:
    """Warm-up, then repeated forced-length generations of one workload. Figures are medians
    over the repetitions; step latencies pool the steps of every repetition."""
    busy0, cpu0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    warm = generate_timed(timed, src, wl.beam, min(n_target, 2))  # shapes, allocations, caches
    warm_step = float(np.median(warm["step_s"][1:] or warm["step_s"]))
    steps, reps = plan_cell(n_target, warm["encode_s"], warm_step, budget_s, max_reps, min_reps)
    runs = [generate_timed(timed, src, wl.beam, steps) for _ in range(reps)]
    wall = time.perf_counter() - t0
    others = max(0.0, machine_busy_s() - busy0 - (time.process_time() - cpu0)) / (wall * (os.cpu_count() or 1))
    extrapolated = steps < n_target
    # per run, the time of the whole loop beyond the encoder, spread over its steps (search and
    # host work between steps included), scaled to n_target + 1 steps when fewer were measured
    totals = [r["encode_s"] + (r["total_s"] - r["encode_s"]) * (n_target + 1) / (steps + 1) for r in runs]
    total = float(np.median(totals))
    all_steps = [s for r in runs for s in r["step_s"]]
    enc = time_stats(r["encode_s"] for r in runs)
    steps_stats = time_stats(all_steps)
    first = float(np.median([r["encode_s"] + r["step_s"][0] for r in runs]))
    tokens = wl.batch * (n_target + 1)  # every sentence's output: n tokens and </s>
    return {
        "workload": wl.key, "name": wl.name, "beam": wl.beam, "batch": wl.batch, "src_len": wl.src_len,
        "src_width": int(src.shape[1]), "n_target": n_target, "steps_measured": steps + 1, "reps": reps,
        "extrapolated": extrapolated, "total_s": total, "tokens_per_s": tokens / total,
        "sentences_per_s": wl.batch / total, "encoder": enc, "step": steps_stats,
        "first_step_ms": float(np.median([r["step_s"][0] for r in runs]) * 1e3),
        "time_to_first_token_ms": first * 1e3, "loop_overhead_ms_per_step":
            float(np.median([(r["total_s"] - r["encode_s"] - sum(r["step_s"])) / (steps + 1) for r in runs]) * 1e3),
        "peak_rss_so_far_mb": round(_peak_rss_mb()),
        "others_cpu_share": round(others, 3),  # CPU other processes took meanwhile (/ wall x cores)
    }


def load_bench_backend(kind: str, artifact: str, threads: int):
    """kind: torch | ort-fp32 | ort-fp16 | ort-int8 | ort-cuda | trt."""
    from deltalm.backends import load_backend

    if kind == "torch":
        return load_backend("torch", artifact, threads=threads)
    if kind == "trt":
        return load_backend("trt", artifact)
    device = "cuda" if kind == "ort-cuda" else "cpu"
    return load_backend("ort", artifact, device=device, threads=threads)


def worker(spec: dict) -> dict:
    """Every workload of one backend: spec {kind, artifact, n, workloads [[beam, batch, src]],
    budget_s, max_reps, min_reps, seed, threads}."""
    t0 = time.perf_counter()
    rss0 = _current_rss_mb()
    backend = load_bench_backend(spec["kind"], spec["artifact"], spec["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = _current_rss_mb()
    timed = TimedBackend(backend)
    cfg = backend.cfg
    if spec["workloads"]:  # the process's first generation pays one-time costs (thread pools, first pages)
        beam, batch, src_len = spec["workloads"][0]
        generate_timed(timed, make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=1), beam, 2)
    cells = []
    for beam, batch, src_len in spec["workloads"]:
        wl = Workload(beam, batch, src_len)
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=spec["seed"] + 1000 * batch + src_len)
        budget = spec["budget_s"].get(wl.key, spec["budget_s"]["default"]) if isinstance(spec["budget_s"], dict) else spec["budget_s"]
        quiet_wait = spec.get("quiet_wait_s", 0.0)
        cell = None
        for attempt in range(2 if quiet_wait else 1):  # one retry when other processes got busy meanwhile
            quiet = wait_for_quiet(quiet_wait) if quiet_wait else None
            t1 = time.perf_counter()
            again = measure_cell(timed, wl, src, spec["n"], budget, spec["max_reps"], spec.get("min_reps", 3))
            again |= {"cell_wall_s": round(time.perf_counter() - t1, 1), "quiet_gate": quiet, "attempt": attempt + 1}
            if cell is None or again["others_cpu_share"] < cell["others_cpu_share"]:
                cell = again
            if cell["others_cpu_share"] <= CONTENDED:
                break
        cells.append(cell)
        _log(f"  {spec['kind']:<9} {wl.name:<30} {cell['tokens_per_s']:9.1f} tok/s  step p50 "
             f"{cell['step']['p50_ms']:8.2f} ms{'  (extrapolated)' if cell['extrapolated'] else ''}  [{cell['cell_wall_s']}s]")
    return {"kind": spec["kind"], "load_s": load_s, "rss_before_load_mb": rss0, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _peak_rss_mb(), "cells": cells}


# ---------------------------------------------------------------------------------------------
# int8 / fp16 against fp32: top-1 agreement of steps fed the same tokens


def step_agreement(reference, other, src: np.ndarray, n: int) -> dict:
    """Greedy, teacher-forced by ``reference``: both backends get the same source and, at every
    step, the token the reference chose; the fraction of (row, step) whose top-1 ids agree."""
    from deltalm.search import step_rules

    opts = forced_length_options(1, n)
    rows = src.shape[0]
    sa, sb = reference.encode(src), other.encode(src)
    tokens = np.full(rows, reference.cfg.eos, dtype=np.int64)
    reorder = np.arange(rows, dtype=np.int64)
    same = total = 0
    for step in range(n + 1):
        rules = step_rules(opts, step, n, rows)
        _, ids_a = reference.step(sa, tokens, step, reorder, reorder, rules)
        _, ids_b = other.step(sb, tokens, step, reorder, reorder, rules)
        same += int(np.sum(ids_a[:, 0] == ids_b[:, 0]))
        total += rows
        tokens = ids_a[:, 0].astype(np.int64)
    return {"rows": rows, "steps": n + 1, "top1_agreement": same / total}


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's profiler on the decoder step


def summarize_profile(events: list[dict], skip_runs: int = 1, top: int = 10) -> dict:
    """ORT profile events -> time per op type and per node, over the runs after the first
    ``skip_runs`` (warm-up). Node events are ``cat == "Node"`` named ``NODE_kernel_time``."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if skip_runs and len(runs) > skip_runs else 0
    kept_runs = [r for r in runs if r["ts"] >= start]
    by_op: dict[str, float] = {}
    count_op: dict[str, int] = {}
    by_node: dict[str, tuple[str, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_op[op] = by_op.get(op, 0.0) + e["dur"]
        count_op[op] = count_op.get(op, 0) + 1
        by_node[node] = (op, by_node.get(node, (op, 0.0))[1] + e["dur"])
    node_total = sum(by_op.values())
    run_total = sum(r["dur"] for r in kept_runs)
    n_runs = max(len(kept_runs), 1)
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])
    return {
        "runs": len(kept_runs),
        "run_ms_per_step": run_total / n_runs / 1e3,
        "node_ms_per_step": node_total / n_runs / 1e3,
        "top_ops": [{"op": op, "ms_per_step": us / n_runs / 1e3, "share": us / node_total if node_total else 0.0,
                     "nodes_per_step": count_op[op] / n_runs} for op, us in ops[:top]],
        "top_nodes": [{"node": name, "op": op, "ms_per_step": us / n_runs / 1e3,
                       "share": us / node_total if node_total else 0.0} for name, (op, us) in nodes[:top]],
    }


def profile_decoder_step(artifact_dir: str, cases: list[tuple[int, int, int]], n: int, threads: int, out_dir: Path) -> list[dict]:
    """Run forced-length generations through OrtBackend with a profiling decoder session; one
    session (and one profile file) per case (beam, batch, src_len)."""
    import onnxruntime as ort

    from deltalm.backends.ort import OrtBackend, session_options

    backend = OrtBackend.from_artifact(artifact_dir, threads=threads)
    path = backend.artifact.graph_path("decoder_step")
    cfg = backend.cfg
    results = []
    for beam, batch, src_len in cases:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(out_dir / f"ort_profile_b{beam}_n{batch}")
        backend.decoder = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=7)
        timed = TimedBackend(backend)
        generate_timed(timed, src, beam, n)
        prof = backend.decoder.end_profiling()
        events = json.loads(Path(prof).read_text())
        summary = summarize_profile(events, skip_runs=2)
        summary |= {"beam": beam, "batch": batch, "src_len": src_len, "steps": n + 1, "file": Path(prof).name,
                    "step_p50_ms_unprofiled_wrapper": time_stats(timed.step_s[2:])["p50_ms"]}
        results.append(summary)
        backend.decoder = None
    return results


def format_profile(results: list[dict]) -> str:
    lines = ["# ONNX Runtime profile of the fp32 decoder step", ""]
    for r in results:
        lines += [f"## beam {r['beam']} x batch {r['batch']} (src ~{r['src_len']}), {r['runs']} steps after warm-up",
                  "", f"model_run {r['run_ms_per_step']:.2f} ms per step, of which kernels {r['node_ms_per_step']:.2f} ms", "",
                  "| op type | ms / step | share of kernel time | nodes / step |", "|---|---:|---:|---:|"]
        lines += [f"| {o['op']} | {o['ms_per_step']:.3f} | {o['share']:.1%} | {o['nodes_per_step']:.0f} |" for o in r["top_ops"]]
        lines += ["", "| node | op | ms / step | share |", "|---|---|---:|---:|"]
        lines += [f"| {o['node']} | {o['op']} | {o['ms_per_step']:.3f} | {o['share']:.1%} |" for o in r["top_nodes"]]
        lines.append("")
    return "\n".join(lines)


def _child_main(argv: list[str]) -> int:
    """``python -m export.bench worker|profile SPEC.json OUT.json``, or
    ``python -m export.bench cli OUT.json DELTALM_ARGS...`` (the command, then its peak RSS)."""
    if argv[0] == "cli":
        import runpy

        sys.argv = ["deltalm", *argv[2:]]
        try:
            runpy.run_module("deltalm", run_name="__main__")  # the command, as `python -m deltalm` runs it
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            Path(argv[1]).write_text(json.dumps({"peak_rss_mb": _peak_rss_mb()}))
        return rc
    task, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if task == "worker":
        result = worker(spec)
    elif task == "profile":
        result = profile_decoder_step(spec["artifact"], spec["cases"], spec["n"], spec["threads"], Path(spec["out_dir"]))
    else:
        raise SystemExit(f"unknown task {task!r}")
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0



# ---------------------------------------------------------------------------------------------
# the run: settings, backends, derived figures, targets

CONTENDED = 0.10  # a cell during which other processes took more of the CPU than this is marked
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


def settings_for(model: str, quick: bool) -> BenchSettings:
    """Presets as data. base: the full grid in about 25 minutes on 2 cores; the beam 5 x batch 32
    cells get the largest budgets, the torch baseline there is measured over fewer steps."""
    if model == "tiny":
        if quick:
            return BenchSettings(8, (10, 30), {"default": 0.3}, 3, 2, 6, 8, 8, gemm_n=2048, read_bytes=1 << 29)
        return BenchSettings(50, (10, 30, 100), {"default": 0.5}, 5, 3, 20, 32, 20, gemm_n=2048, read_bytes=1 << 29)
    if quick:
        return BenchSettings(10, (30,), {"default": 10.0}, 2, 2, 4, 8, 8, quiet_wait_s=30.0)
    budgets = {"default": 10.0}
    for s in (10, 30, 100):
        budgets[f"b5-n32-s{s}"] = 45.0
        budgets[f"b1-n32-s{s}"] = 25.0
    # batch 32 at src ~10 and ~100 only through ort fp32 / int8: a torch or fp16 step there costs
    # seconds, and the source length changes little but the encoder (measured at every length anyway)
    skip = tuple((k, f"b{beam}-n32-s{s}") for k in ("torch", "ort-fp16") for beam in (1, 5) for s in (10, 100))
    return BenchSettings(50, (10, 30, 100), budgets, 3, 3, 8, 32, 20, skip, quiet_wait_s=90.0)


def backend_availability(kind: str, art_root: Path) -> tuple[bool, str]:
    import importlib.util

    import onnxruntime as ort

    if kind == "torch":
        return True, ""
    if kind in ("ort-fp32", "ort-fp16", "ort-int8"):
        ok = (art_root / kind.split("-")[1] / "manifest.json").exists()
        return ok, "" if ok else "artifact missing"
    if kind == "ort-cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True, ""
        return False, f"not available here (onnxruntime {ort.__version__}: no CUDAExecutionProvider)"
    if kind == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return False, "not available here (no TensorRT)"
        if not (art_root / "fp32" / "engines").exists():
            return False, "not available here (no engines: run `deltalm engines` on the fp32 artifact)"
        return True, ""
    raise ValueError(kind)


def artifact_for(kind: str, art_root: Path) -> Path:
    return art_root / {"ort-fp16": "fp16", "ort-int8": "int8"}.get(kind, "fp32")


def graph_bytes(artifact_dir: Path) -> int:
    """Bytes of the ONNX files (weights included) the ort backend loads: encoder + decoder_step."""
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    return sum((artifact_dir / f).stat().st_size for g in ("encoder", "decoder_step")
               for f in manifest["graphs"][g]["files"])


def add_derived(results: dict) -> None:
    """Per cell: speed-up over the torch cell of the same workload, and the step's roofline floor
    (average past length n / 2, source width as padded) with floor / measured p50."""
    from deltalm.config import ModelConfig

    cfg = ModelConfig.from_dict(results["model"]["config"])
    floors = results["floors"]
    costs = results["step_graph"]
    torch_cells = {c["workload"]: c for c in results["backends"].get("torch", {}).get("cells", [])}
    for kind, b in results["backends"].items():
        precision = {"ort-fp16": "fp16", "ort-int8": "int8"}.get(kind, "fp32")
        cost = costs.get(precision) or costs["fp32"]
        for c in b.get("cells", []):
            ref = torch_cells.get(c["workload"])
            c["speedup_vs_torch"] = ref["total_s"] / c["total_s"] if ref else None
            rows, past = c["batch"] * c["beam"], c["n_target"] / 2
            flops = step_flops(costs["fp32"]["matmul_weights"], cfg, rows, past, c["src_width"])
            nbytes = step_bytes(cost["weight_bytes"], cfg, rows, c["batch"], past, c["src_width"], 2 if precision == "fp16" else 4)
            fl = step_floor(flops, nbytes, floors["gemm_gflops"], floors["read_gbs"])
            fl |= {"flops": flops, "bytes": nbytes, "efficiency": fl["floor_ms"] / c["step"]["p50_ms"]}
            c["floor"] = fl


def _cell(results: dict, kind: str, beam: int, batch: int, src: int) -> dict | None:
    for c in results["backends"].get(kind, {}).get("cells", []):
        if (c["beam"], c["batch"], c["src_len"]) == (beam, batch, src):
            return c
    return None


def evaluate_targets(results: dict) -> list[dict]:
    """The CPU targets of issue 5 against this run (source ~30 where a workload is named)."""
    src = 30 if 30 in results["settings"]["src_lens"] else results["settings"]["src_lens"][0]
    out = []
    base = results["model"]["name"] == "base"

    def add(target, measured, goal, met, note="", base_only=True):
        if base_only and not base:  # the targets are set for deltalm-base; a tiny model's figures only inform
            met, note = None, "targets are set for deltalm-base"
        out.append({"target": target, "measured": measured, "goal": goal, "met": met, "note": note})

    f32_32, i8_32 = _cell(results, "ort-fp32", 5, 32, src), _cell(results, "ort-int8", 5, 32, src)
    f32_1, i8_1 = _cell(results, "ort-fp32", 5, 1, src), _cell(results, "ort-int8", 5, 1, src)
    if f32_32:
        e = f32_32["floor"]["efficiency"]
        numpy_gflops = results["floors"].get("gemm_numpy_gflops")
        at_numpy = (f"; {f32_32['floor']['flops'] / (numpy_gflops * 1e9) * 1e3 / f32_32['step']['p50_ms']:.0%} of the "
                    f"floor at numpy's {numpy_gflops:.0f} GFLOP/s") if numpy_gflops else ""
        add("beam 5 x batch 32: ort fp32 step vs compute floor", f"{e:.0%} ({f32_32['step']['p50_ms']:.0f} ms vs "
            f"{f32_32['floor']['floor_ms']:.0f} ms at {results['floors']['gemm_gflops']:.0f} GFLOP/s{at_numpy})", ">= 75%", e >= 0.75)
    if f32_32 and i8_32:
        r = f32_32["step"]["p50_ms"] / i8_32["step"]["p50_ms"]
        add("beam 5 x batch 32: ort int8 speed-up over fp32 (step)", f"{r:.2f}x", ">= 2x", r >= 2.0)
    if f32_1:
        x = f32_1["step"]["p50_ms"] / f32_1["floor"]["memory_ms"]
        add("beam 5 x batch 1: ort fp32 step vs bandwidth floor", f"{x:.2f}x the floor ({f32_1['step']['p50_ms']:.1f} ms vs "
            f"{f32_1['floor']['memory_ms']:.1f} ms)", "<= 1.3x", x <= 1.3)
    if f32_1 and i8_1:
        r = f32_1["step"]["p50_ms"] / i8_1["step"]["p50_ms"]
        add("beam 5 x batch 1: ort int8 speed-up over fp32 (step)", f"{r:.2f}x", ">= 2.5x", r >= 2.5)
    agree = results.get("agreement", {}).get("int8")
    if agree:
        add("int8 top-1 step agreement with fp32 (demo model)", f"{agree['top1_agreement']:.2%}", ">= 99%",
            agree["top1_agreement"] >= 0.99, base_only=False)
    speedups = [c["speedup_vs_torch"] for c in results["backends"].get("ort-fp32", {}).get("cells", []) if c.get("speedup_vs_torch")]
    if speedups:
        add("ort fp32 vs torch, every workload", f"{min(speedups):.2f}x .. {max(speedups):.2f}x", "reported", None,
            base_only=False)
    mem = results.get("memory_check")
    if mem and "ratio_to_graph_files" in mem:
        add("translate (ort fp32): peak RSS / weights loaded", f"{mem['ratio_to_graph_files']:.2f}x ({mem['peak_rss_mb']:.0f} MB / "
            f"{mem['graph_files_mb']:.0f} MB)", "< 1.5x", mem["ratio_to_graph_files"] < 1.5)
    fp32_export = results.get("exports", {}).get("fp32")
    if fp32_export:
        peak = max(r["peak_rss_mb"] for r in results["exports"].values())
        add("export peak RSS (largest of fp32 / fp16 / int8)", f"{peak / 1024:.2f} GB", "< 8 GB", peak < 8 * 1024,
            base_only=False)
    for kind in GPU_KINDS:
        b = results["backends"].get(kind, {})
        if not b.get("cells"):
            add(f"GPU: {kind} decoder step <= 0.8 ms (batch 1), <= 1.5 ms (batch 8 x beam 5)", "not measured yet",
                "<= 0.8 / 1.5 ms", None, b.get("reason", ""), base_only=False)
    return out


# ---------------------------------------------------------------------------------------------
# report: markdown and chart (pure formatting)


def _fmt(x, spec=".1f", missing="-") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_rate(tokens_per_s: float) -> str:
    """3 significant digits, no exponent: 12345.6 -> '12346', 1.234 -> '1.23'."""
    if tokens_per_s >= 100:
        return f"{tokens_per_s:.0f}"
    if tokens_per_s >= 10:
        return f"{tokens_per_s:.1f}"
    return f"{tokens_per_s:.2f}"


def summary_table(results: dict) -> str:
    """Workloads as rows, backends as columns: target tokens/s and the speed-up over torch."""
    kinds = [k for k in BACKEND_KINDS if k in results["backends"]]
    head = "| workload | " + " | ".join(kinds) + " |"
    lines = [head, "|---|" + "---:|" * len(kinds)]
    for wl in results["settings"]["workloads"]:
        cells = []
        for k in kinds:
            b = results["backends"][k]
            c = _cell(results, k, *wl)
            if c is None:
                skipped = [k, Workload(*wl).key] in [list(x) for x in results["settings"].get("skip", ())]
                cells.append("not available here" if b.get("reason") else ("not run (time budget)" if skipped else "-"))
                continue
            mark = ("*" if c["extrapolated"] else "") + ("†" if c.get("others_cpu_share", 0.0) > CONTENDED else "")
            ratio = "" if k == "torch" or c.get("speedup_vs_torch") is None else f" ({c['speedup_vs_torch']:.2f}x)"
            cells.append(f"{format_rate(c['tokens_per_s'])}{mark}{ratio}")
        lines.append(f"| {Workload(*wl).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    lines = ["| workload | backend | tok/s | sent/s | encoder ms | step p50 ms | step p90 ms | first token ms | "
             "x torch | step floor ms (bound) | floor / p50 | steps x reps | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for wl in results["settings"]["workloads"]:
        for k in BACKEND_KINDS:
            c = _cell(results, k, *wl)
            if c is None:
                continue
            fl = c.get("floor", {})
            steps = f"{c['steps_measured']}{'*' if c['extrapolated'] else ''} x {c['reps']}"
            busy = "†" if c.get("others_cpu_share", 0.0) > CONTENDED else ""
            lines.append(
                f"| {Workload(*wl).name} | {k} | {format_rate(c['tokens_per_s'])}{busy} | {_fmt(c['sentences_per_s'], '.2f')} | "
                f"{_fmt(c['encoder']['p50_ms'])} | {_fmt(c['step']['p50_ms'], '.2f')} | {_fmt(c['step']['p90_ms'], '.2f')} | "
                f"{_fmt(c['time_to_first_token_ms'])} | {_fmt(c.get('speedup_vs_torch'), '.2f')} | "
                f"{_fmt(fl.get('floor_ms'), '.2f')} ({fl.get('bound', '-')}) | {_fmt(fl.get('efficiency'), '.0%')} | {steps} | "
                f"{_fmt(results['backends'][k].get('peak_rss_mb'), '.0f')} |")
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    m, fl, st = results["machine"], results["floors"], results["settings"]
    cfg = results["model"]["config"]
    lines = [f"# deltalm bench: {results['model']['name']} ({cfg['embed_dim']}d, {cfg['encoder_layers']}+{cfg['decoder_layers']} "
             f"layers, vocab {cfg['vocab_size']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; " +
             ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
             f"Floors measured here ({m['cores']} threads, best of numpy and ONNX Runtime, before and after the run): fp32 GEMM "
             f"{fl['gemm_gflops']:.0f} GFLOP/s ({fl['gemm_n']}^3; numpy {fl.get('gemm_numpy_gflops', 0):.0f}, "
             f"ORT MatMul {fl.get('gemm_ort_gflops', 0):.0f}), read bandwidth {fl['read_gbs']:.1f} GB/s (sum of "
             f"{fl['read_bytes'] / 2**20:.0f} MiB; numpy {fl.get('read_numpy_gbs', 0):.1f}, ORT ReduceSum "
             f"{fl.get('read_ort_gbs', 0):.1f}).", "",
             f"Every generation forced to {st['n']} tokens + </s> ({st['n'] + 1} decoder steps); medians over repetitions "
             "after a warm-up; step latencies pool every step of every repetition; tok/s counts each sentence's "
             f"{st['n'] + 1} output tokens. Threads: {st['threads']} for every backend; OMP_WAIT_POLICY="
             f"{st.get('omp_wait_policy')} (torch's OpenMP threads sleep rather than spin while waiting). "
             "`*`: fewer steps measured, the per-step time extrapolated to the full length. `†`: other processes took more "
             f"than {CONTENDED:.0%} of the CPU while the cell ran (after a wait for quiet and one retry).", ""]
    shares = [c.get("others_cpu_share", 0.0) for b in results["backends"].values() for c in b.get("cells", [])]
    if shares:
        lines += [f"Other processes on this machine took {min(shares):.0%} .. {max(shares):.0%} (median "
                  f"{float(np.median(shares)):.0%}) of its CPU time while the cells ran: figures are slower than this machine "
                  "does alone." if max(shares) > 0.05 else "The machine was otherwise idle while the cells ran "
                  f"(other processes: at most {max(shares):.0%} of its CPU).", ""]
    lines += [
             "## Target tokens/s (speed-up over torch, same run)", "", summary_table(results), "",
             "## Every figure", "", detail_table(results), "",
             "Step floor: the larger of FLOPs / GEMM peak and bytes / read bandwidth, at the average past length "
             f"({st['n'] / 2:g}); bytes = the step graph's weights read in full (per precision) + the K/V caches. "
             "int8 is held to the fp32 GEMM peak (its own integer peak is higher), so it can exceed 100%.", "",
             "## Step graph", "", "| precision | weights read per step | only gathered (rows) | matmul weights (elements) |",
             "|---|---:|---:|---:|"]
    for p, c in results["step_graph"].items():
        lines.append(f"| {p} | {c['weight_bytes'] / 1e6:.1f} MB | {c['gathered_bytes'] / 1e6:.1f} MB | {c['matmul_weights'] / 1e6:.1f} M |")
    lines += ["", "## Backends", "", "Peak RSS: each backend runs in its own process (VmHWM). Other processes' CPU: the share of "
              "this machine's CPU time that other processes took while the backend was measured (it slows every figure).", "",
              "| backend | status | model load s | RSS after load MB | peak RSS MB | other processes' CPU |",
              "|---|---|---:|---:|---:|---:|"]
    for k in BACKEND_KINDS:
        b = results["backends"].get(k)
        if b is None:
            continue
        status = "measured" if b.get("cells") else (b.get("reason") or b.get("error", "failed"))
        lines.append(f"| {k} | {status} | {_fmt(b.get('load_s'))} | {_fmt(b.get('rss_after_load_mb'), '.0f')} | "
                     f"{_fmt(b.get('peak_rss_mb'), '.0f')} | {_fmt(b.get('others_cpu_share'), '.0%')} |")
    if results.get("exports"):
        lines += ["", "## Export (`deltalm export`, parity checks included)", "",
                  "| precision | wall s | peak RSS MB | note |", "|---|---:|---:|---|"]
        for p, r in results["exports"].items():
            lines.append(f"| {p} | {r['wall_s']:.1f} | {r['peak_rss_mb']} | {'from an earlier run' if r.get('reused') else ''} |")
    mem = results.get("memory_check")
    if mem:
        lines += ["", "## Memory check", "", mem.get("summary", "")]
    agree = results.get("agreement")
    if agree:
        lines += ["", "## Step agreement with ort fp32 (greedy, teacher-forced by fp32)", ""]
        lines += [f"- {p}: top-1 agreement {a['top1_agreement']:.2%} over {a['rows']} rows x {a['steps']} steps" for p, a in agree.items()]
    if results.get("targets"):
        lines += ["", "## Targets (issue 5)", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {t['measured']}{(' — ' + t['note']) if t['note'] else ''} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in BACKEND_KINDS if results["backends"].get(k, {}).get("cells")]
    wls = [tuple(w) for w in results["settings"]["workloads"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.1 * len(wls)), 9), sharex=True)
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(wls))
    for i, k in enumerate(kinds):
        tps, ratio = [], []
        for wl in wls:
            c = _cell(results, k, *wl)
            tps.append(c["tokens_per_s"] if c else np.nan)
            ratio.append(c["speedup_vs_torch"] if c and c.get("speedup_vs_torch") else np.nan)
        axes[0].bar(x + (i - (len(kinds) - 1) / 2) * width, tps, width, label=k)
        axes[1].bar(x + (i - (len(kinds) - 1) / 2) * width, ratio, width, label=k)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("target tokens / s")
    axes[0].legend(ncol=len(kinds), fontsize=8)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("speed-up over torch (same run)")
    axes[1].set_xticks(x, [Workload(*w).name.replace(", ", "\n") for w in wls], fontsize=7)
    cfg = results["model"]["config"]
    fig.suptitle(f"deltalm bench, {results['model']['name']} ({cfg['embed_dim']}d, vocab {cfg['vocab_size']}), "
                 f"{results['machine']['cpu']}, {results['machine']['cores']} cores, {results['settings']['n']} tokens forced")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the command


def _run_task(task: str, spec: dict, work: Path, tag: str, echo: bool = True) -> tuple[dict | None, ChildResult]:
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    res = run_child([sys.executable, "-m", "deltalm.export.bench", task, str(spec_path), str(out_path)], echo=echo)
    if res.returncode != 0 or not out_path.exists():
        return None, res
    return json.loads(out_path.read_text()), res


def memory_check(artifact_dir: Path, lines: int, n: int, threads: int) -> dict:
    """``deltalm translate`` (ort fp32, beam 5, batch 32) of ``lines`` corpus sentences forced to n
    tokens, in a child: its peak RSS against the bytes of the graphs it loads."""
    from .toy_data import toy_corpus

    text = "\n".join(toy_corpus()[:lines]) + "\n"
    cmd = ["translate", str(artifact_dir), "--backend", "ort", "--beam", "5", "--batch-size", "32",
           "--max-len-b", str(n), "--min-len", str(n), "--no-progress", "--threads", str(threads)]
    peak, res = run_cli(cmd, artifact_dir.parent / ".memory-check.json", stdin=text)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    weights = graph_bytes(artifact_dir)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    cfg = manifest["model"]
    # the model's own parameters once (fp32): what the graphs would hold without the second
    # copy of the embedding table (the encoder and the step graph each carry one)
    table = cfg["vocab_size"] * cfg["embed_dim"] * 4
    unique = weights - table
    out = {"lines": lines, "beam": 5, "batch_size": 32, "tokens": n, "wall_s": round(res.wall_s, 1),
           "peak_rss_mb": peak, "graph_files_mb": weights / 2**20, "unique_weights_mb": unique / 2**20,
           "ratio_to_graph_files": peak * 2**20 / weights, "ratio_to_unique_weights": peak * 2**20 / unique}
    out["summary"] = (f"`deltalm translate` of {lines} sentences (ort fp32, beam 5, batch 32, {n} tokens forced): peak RSS "
                      f"{out['peak_rss_mb']:.0f} MB = {out['ratio_to_graph_files']:.2f}x the {out['graph_files_mb']:.0f} MB of "
                      f"graphs it loads (encoder + decoder_step), {out['ratio_to_unique_weights']:.2f}x the "
                      f"{out['unique_weights_mb']:.0f} MB of distinct weights (the embedding table counted once).")
    return out


def measure_agreement(art_root: Path, files: ModelFiles, threads: int) -> dict:
    """int8 / fp16 against fp32 on corpus sentences (meaningful for the demo model only: a random
    model's distributions are nearly flat)."""
    from deltalm.backends.ort import OrtBackend
    from deltalm.tokenizer import Tokenizer

    from .toy_data import toy_corpus

    tok = Tokenizer(str(files.spm), str(files.dict))
    src = tok.collate([tok.encode(s) for s in toy_corpus()[::7][:48]])
    ref = OrtBackend.from_artifact(art_root / "fp32", threads=threads)
    out = {}
    for p in ("int8", "fp16"):
        if (art_root / p / "manifest.json").exists():
            out[p] = step_agreement(ref, OrtBackend.from_artifact(art_root / p, threads=threads), src, 20)
    return out


def bench_command(args) -> int:
    """``deltalm bench --model tiny|base --out DIR [--quick]``."""
    from deltalm.errors import InputError

    t_start = time.perf_counter()
    # OpenMP threads (torch) sleep instead of spinning while they wait: on a machine other
    # processes also load, spinning made a tiny torch step 130x slower here (1000 ms instead of
    # 8 ms at 2 threads). Set before torch is imported; children (exports, workers) inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model = args.model
    if model not in ("tiny", "base"):
        raise InputError(f"--model must be tiny or base, got {model!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    threads = os.cpu_count() or 1
    st = settings_for(model, args.quick)
    phases = {}
    t = time.perf_counter()
    files = prepare_tiny(out / "model") if model == "tiny" else prepare_base(out / "model")
    phases["model"] = time.perf_counter() - t
    art_root = out / "artifacts"
    t = time.perf_counter()
    exports = export_artifacts(files, art_root)
    phases["export"] = time.perf_counter() - t
    manifest = json.loads((art_root / "fp32" / "manifest.json").read_text())
    wls = workloads(st.src_lens)
    results: dict = {
        "model": {"name": model, "config": manifest["model"], "checkpoint": str(files.checkpoint)},
        "machine": machine_info(),
        "settings": asdict(st) | {"threads": threads, "quick": bool(args.quick),
                                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                  "workloads": [[w.beam, w.batch, w.src_len] for w in wls]},
        "exports": exports, "backends": {}, "phases_s": phases,
    }

    t = time.perf_counter()
    _log("measuring this machine's floors (GEMM, read bandwidth)")
    results["floors_quiet_gate"] = wait_for_quiet(st.quiet_wait_s) if st.quiet_wait_s else None
    results["floors"] = measure_floors(st.gemm_n, st.read_bytes)
    import onnx

    results["step_graph"] = {}
    for p in PRECISIONS:
        d = art_root / p
        if (d / "manifest.json").exists():
            g = onnx.load(str(d / "decoder_step.onnx"), load_external_data=False)
            results["step_graph"][p] = asdict(step_graph_cost(g))
            del g

    phases["floors"] = time.perf_counter() - t
    t = time.perf_counter()
    for kind in BACKEND_KINDS:
        ok, reason = backend_availability(kind, art_root)
        if not ok:
            results["backends"][kind] = {"reason": reason, "cells": []}
            _log(f"{kind}: {reason}")
            continue
        _log(f"{kind}: {len(wls)} workloads")
        spec = {"kind": kind, "artifact": str(artifact_for(kind, art_root)), "n": st.n,
                "workloads": [[w.beam, w.batch, w.src_len] for w in wls if (kind, w.key) not in st.skip],
                "budget_s": st.budget_s,
                "max_reps": st.max_reps, "min_reps": st.min_reps, "seed": 0, "threads": threads,
                "quiet_wait_s": st.quiet_wait_s}
        res, child = _run_task("worker", spec, work, kind)
        if res is None:
            results["backends"][kind] = {"error": child.stderr[-2000:], "cells": []}
            _log(f"{kind}: failed\n{child.stderr[-2000:]}")
            continue
        res |= {"wall_s": child.wall_s, "others_cpu_share": round(child.others_cpu_share, 3)}
        results["backends"][kind] = res

    phases["backends"] = time.perf_counter() - t
    t = time.perf_counter()
    _log("memory check: deltalm translate through ort fp32")
    results["memory_check"] = memory_check(art_root / "fp32", st.memory_lines, st.memory_len, threads)
    if model == "tiny":
        results["agreement"] = measure_agreement(art_root, files, threads)

    phases["memory_and_agreement"] = time.perf_counter() - t
    t = time.perf_counter()
    _log("profiling the fp32 decoder step (ONNX Runtime profiler)")
    prof_dir = out / "profile"
    prof_dir.mkdir(exist_ok=True)
    src = 30 if 30 in st.src_lens else st.src_lens[0]
    prof, child = _run_task("profile", {"artifact": str(art_root / "fp32"), "cases": [[5, 1, src], [5, 32, src]],
                                        "n": st.profile_steps, "threads": threads, "out_dir": str(prof_dir.resolve())},
                            work, "profile")
    results["profile"] = prof if prof is not None else {"error": child.stderr[-2000:]}
    if prof is not None:
        (out / "profile.md").write_text(format_profile(prof))

    phases["profile"] = time.perf_counter() - t
    # the floors are physical limits: keep the best of a measurement before and after the run
    if st.quiet_wait_s:
        wait_for_quiet(st.quiet_wait_s)
    again = measure_floors(st.gemm_n, st.read_bytes)
    results["floors_at_end"] = again
    for key in ("gemm_numpy_gflops", "gemm_ort_gflops", "read_numpy_gbs", "read_ort_gbs", "gemm_gflops", "read_gbs"):
        results["floors"][key] = max(results["floors"][key], again[key])
    add_derived(results)
    results["targets"] = evaluate_targets(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = format_markdown(results)
    (out / "bench.md").write_text(md)
    write_chart(results, out / "bench.png")
    print(md)
    _log(f"wrote {out}/bench.json, bench.md, bench.png, profile.md in {results['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
