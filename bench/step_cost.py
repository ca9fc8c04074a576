"""What one decoder step costs, counted from the exported step graph (pure): the weights its
matrix products read, the bytes it must read at least, and the roofline floor those give on a
machine of known GEMM peak and read bandwidth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_MATMUL_OPS = {
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
}
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


def step_bytes(
    weight_bytes: int, cfg, rows: int, sents: int, past_len: float, src_len: float, kv_itemsize: int
) -> float:
    """Bytes one step must read at least: every weight once, the self-attention caches of every row
    and the cross-attention K/V of every live sentence."""
    kv = cfg.decoder_layers * 2 * cfg.embed_dim * kv_itemsize * (rows * past_len + sents * src_len)
    return float(weight_bytes) + kv


def step_floor(flops: float, nbytes: float, gflops: float, gbs: float) -> dict:
    """Roofline floor of one step: the larger of compute time and read time, and which it is."""
    compute_ms = flops / (gflops * 1e9) * 1e3
    memory_ms = nbytes / (gbs * 1e9) * 1e3
    return {
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "floor_ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "bandwidth",
    }
