"""This machine's floors: its fp32 GEMM peak and its read bandwidth (the best of numpy and ONNX
Runtime), and a description of the machine (CPU, cores, memory, library versions)."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import time
from pathlib import Path

import numpy as np


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
    return 2.0 * n**3 / best / 1e9


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

    sess = _ort_session(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        threads,
    )
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in "ab"}
    return 2.0 * n**3 / _best_time(lambda: sess.run(None, feeds), reps) / 1e9


def ort_read_gbs(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> float:
    """Bytes / time of ONNX Runtime's ReduceSum over a float32 [rows, 4096] array of ``nbytes``."""
    from onnx import TensorProto, helper

    sess = _ort_session(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        threads,
    )
    x = np.ones((nbytes // 4 // 4096, 4096), dtype=np.float32)
    return x.nbytes / _best_time(lambda: sess.run(None, {"x": x}), reps) / 1e9


def measure_floors(gemm_n: int = 3072, read_bytes: int = 1 << 30) -> dict:
    """This machine's fp32 GEMM peak and read bandwidth: the best of numpy and ONNX Runtime."""
    f = {
        "gemm_n": gemm_n,
        "read_bytes": read_bytes,
        "gemm_numpy_gflops": gemm_peak_gflops(gemm_n),
        "gemm_ort_gflops": ort_gemm_gflops(gemm_n),
        "read_numpy_gbs": read_bandwidth_gbs(read_bytes),
        "read_ort_gbs": ort_read_gbs(read_bytes),
    }
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
    for name in ("torch", "onnx", "ctranslate2"):  # installed distributions, without importing them
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        versions = {"deltalm": importlib.metadata.version("deltalm-deploy"), **versions}
    except importlib.metadata.PackageNotFoundError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "ort_providers": onnxruntime.get_available_providers(),
        "versions": versions,
    }
