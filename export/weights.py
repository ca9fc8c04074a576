"""An artifact's weights, from the checkpoint's tensors to ``weights.data``, one tensor at a time.

The graphs are traced without their weights: ``torch.onnx.export(export_params=False)`` writes the
graph only, and the initializers the exporter would have written (parameters, and the transposed
views its constant folding makes of them) are taken from its initializer table as it leaves the
exporter. Each is recorded in the graph as a *pending* initializer: a ``TensorProto`` with its dims
and data type but no bytes, whose ``external_data`` names the parameter it comes from and the
transforms that turn the parameter into its bytes (``Ref``). Graph rewrites (the tied output
projection, fp16 conversion, int8 quantization, the int8 embedding table) work on these references
(``derive``); ``SharedWeights.externalize`` finally computes each tensor's bytes, streams them into
``weights.data`` (each distinct tensor once) and points the initializer at them. So no graph ever
holds more than one tensor's bytes in memory, and none of the exporter's own serialization of the
weights happens.

Transforms (``TRANSFORMS``): ``T`` (2-D transpose), ``fp16`` (ONNX Runtime's float16 conversion,
clamping included), ``q8col`` / ``s8col`` (symmetric int8 per column of a MatMul weight, and its
scales: ONNX Runtime's dynamic quantization numerics), ``q8table`` / ``s8table`` (the int8
embedding table of ``quantize_table``, one column per token, and its per-token scales).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.data"
INLINE_LIMIT = 1024  # bytes: smaller tensors (shapes, scalars) stay inside the .onnx file
ALIGN = 4096  # every tensor in weights.data starts on a page: ONNX Runtime maps it from the file
CHUNK_BYTES = 32 << 20  # row blocks of at most this many source bytes for row-wise transforms

PENDING = "deltalm:pending"  # external_data location of an initializer whose bytes are not written yet
_SOURCE, _TRANSFORMS = "deltalm.source", "deltalm.transforms"

_FLOAT, _FLOAT16, _INT8 = 1, 10, 3  # onnx.TensorProto data types
_NP = {_FLOAT: np.float32, _FLOAT16: np.float16, _INT8: np.int8}


# --- numerics -------------------------------------------------------------------------------------


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the [V, D] embedding table: ``q`` [D, V] int8 (laid out as the
    step's quantized output projection reads it: one column per token) and ``scale`` [V] float32,
    ``table[v] ~= q[:, v] * scale[v]``. Computed in row blocks (the float temporaries stay small)."""
    scale = table_scales(table)
    q = np.empty(table.shape, dtype=np.int8)
    for lo, hi in _row_blocks(table):
        q[lo:hi] = np.clip(np.rint(table[lo:hi] / scale[lo:hi, None]), -127, 127)
    return np.ascontiguousarray(q.T), scale


def table_scales(table: np.ndarray) -> np.ndarray:
    """The per-row scales of ``quantize_table``: absmax / 127 (1 for an all-zero row), float32 [V]."""
    scale = np.empty(table.shape[0], dtype=np.float32)
    for lo, hi in _row_blocks(table):
        absmax = np.abs(table[lo:hi]).max(axis=1)
        scale[lo:hi] = np.where(absmax > 0, absmax / 127.0, 1.0)
    return scale


def column_scales(w: np.ndarray) -> np.ndarray:
    """Scales of symmetric int8 per column of a [K, N] MatMul weight, as ONNX Runtime's dynamic
    quantization (``quantize_dynamic(per_channel=True, weight_type=QInt8)``) computes them for each
    column: the range [min(col, 0), max(col, 0)] made symmetric, 2 absmax / 254 in float64 stored
    as float32; 1.0 where that is below float32's smallest normal number. float32 [N]."""
    w = np.asarray(w, dtype=np.float32)
    rmin = np.minimum(w.min(axis=0), np.float32(0))
    rmax = np.maximum(w.max(axis=0), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax)).astype(np.float64)
    scale = (absmax - (-absmax)) / 254.0
    return np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)


def quantize_columns(w: np.ndarray) -> np.ndarray:
    """The int8 [K, N] weight for ``column_scales``: round(w / scale) (half to even, in float32),
    clipped to [-128, 127], as ONNX Runtime writes it."""
    w = np.asarray(w, dtype=np.float32)
    return np.clip(np.round(w / column_scales(w)), -128, 127).astype(np.int8)


def to_float16(a: np.ndarray) -> np.ndarray:
    """ONNX Runtime's fp16 conversion of an initializer (values beyond float16 clamped, tiny ones
    kept off zero: ``convert_np_to_float16``), in row blocks."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0:
        return convert_np_to_float16(a.reshape(1)).reshape(())
    out = np.empty(a.shape, dtype=np.float16)
    for lo, hi in _row_blocks(a):
        out[lo:hi] = convert_np_to_float16(a[lo:hi])
    return out


def _row_blocks(a: np.ndarray) -> Iterator[tuple[int, int]]:
    rows = a.shape[0] if a.ndim else 1
    row_bytes = max(1, a.nbytes // max(rows, 1))
    step = max(1, CHUNK_BYTES // row_bytes)
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


# --- transforms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """One step from a parameter to an initializer: the array function, and what it does to the
    dims and the ONNX data type (so that a pending initializer has both without its bytes).
    ``rowwise``: output rows are a function of the same input rows (computed in row blocks)."""

    apply: Callable[[np.ndarray], np.ndarray]
    dims: Callable[[list[int]], list[int]]
    dtype: Callable[[int], int]
    rowwise: bool = False


def _need_2d(dims: list[int]) -> list[int]:
    if len(dims) != 2:
        raise ValueError(f"a 2-D tensor is needed here, got dims {dims}")
    return dims


TRANSFORMS: dict[str, Transform] = {
    "T": Transform(lambda a: np.ascontiguousarray(a.T), lambda d: _need_2d(d)[::-1], lambda t: t),
    "fp16": Transform(to_float16, lambda d: d, lambda t: _FLOAT16, rowwise=True),
    "q8col": Transform(quantize_columns, _need_2d, lambda t: _INT8),
    "s8col": Transform(column_scales, lambda d: [_need_2d(d)[1]], lambda t: _FLOAT),
    "q8table": Transform(lambda a: quantize_table(a)[0], lambda d: _need_2d(d)[::-1], lambda t: _INT8),
    "s8table": Transform(table_scales, lambda d: [_need_2d(d)[0]], lambda t: _FLOAT, rowwise=True),
}


@dataclass(frozen=True)
class Ref:
    """Where a pending initializer's bytes come from: the parameter ``source`` (its name in the
    traced module) through ``transforms``, applied left to right."""

    source: str
    transforms: tuple[str, ...] = ()

    def then(self, transform: str) -> Ref:
        if transform not in TRANSFORMS:
            raise KeyError(f"unknown weight transform {transform!r}")
        if transform == "T" and self.transforms[-1:] == ("T",):  # a transpose of a transpose
            return Ref(self.source, self.transforms[:-1])
        return Ref(self.source, self.transforms + (transform,))


def ref_of(t) -> Ref | None:
    """The reference of a pending initializer, None for one that holds its data (or is written)."""
    entries = {e.key: e.value for e in t.external_data}
    if entries.get("location") != PENDING:
        return None
    transforms = entries.get(_TRANSFORMS, "")
    return Ref(entries[_SOURCE], tuple(transforms.split(",")) if transforms else ())


def set_pending(t, ref: Ref, dims, data_type: int) -> None:
    """Make ``t`` (a TensorProto) a pending initializer of ``ref`` with these dims and type."""
    import onnx

    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(f)
    del t.dims[:]
    t.dims.extend(int(d) for d in dims)
    t.data_type = data_type
    del t.external_data[:]
    for k, v in (("location", PENDING), (_SOURCE, ref.source), (_TRANSFORMS, ",".join(ref.transforms))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def derive(t, name: str, transform: str):
    """A new initializer ``name`` holding ``transform`` of ``t``: pending if ``t`` is (nothing is
    computed), else computed now from ``t``'s data."""
    from onnx import TensorProto, numpy_helper

    step = TRANSFORMS[transform]
    ref = ref_of(t)
    out = TensorProto()
    out.name = name
    if ref is not None:
        set_pending(out, ref.then(transform), step.dims(list(t.dims)), step.dtype(t.data_type))
    else:
        out.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(step.apply(numpy_helper.to_array(t))), name))
    return out


def pending_nbytes(t) -> int:
    return math.prod(t.dims) * np.dtype(_NP[t.data_type]).itemsize


def materialize(ref: Ref, source: np.ndarray) -> Iterator[np.ndarray]:
    """The bytes of ``ref`` applied to ``source`` (the parameter as an array), in C order, as a
    sequence of arrays: in row blocks where every transform is row-wise (the embedding table, its
    fp16 copy and its scales are never whole in memory twice), else in one piece."""
    steps = [TRANSFORMS[n] for n in ref.transforms]
    if all(s.rowwise for s in steps) and source.ndim >= 1:
        for lo, hi in _row_blocks(source):
            block = source[lo:hi]
            for s in steps:
                block = s.apply(block)
            yield np.ascontiguousarray(block)
        return
    out = source
    for s in steps:
        out = s.apply(out)
    yield np.ascontiguousarray(out)


# --- tracing without weights ----------------------------------------------------------------------


SHAPE_INFERENCE_VALUE_LIMIT = 1 << 20  # bytes: larger initializers reach shape inference as types only


@contextlib.contextmanager
def _exporter_hooks(table: dict, value_limit: int | None = SHAPE_INFERENCE_VALUE_LIMIT):
    """Two of the TorchScript exporter's passes, wrapped for the block:

    - its last pass over the initializer table (``_jit_pass_onnx_deduplicate_initializers``): the
      table it returns (name -> tensor) is kept in ``table``. With ``export_params=False`` the
      exporter then writes every entry as a graph input, and ``trace_without_weights`` turns them
      back into (pending) initializers;
    - its whole-graph ONNX shape inference (``_jit_pass_onnx_graph_shape_type_inference``), which
      builds a one-node ONNX model for each node and copies every initializer the node reads into
      it, values included (on deltalm-base, 2.2 GB at once for the output projection): it is
      given only the initializers of at most ``value_limit`` bytes, the others reach it as inputs
      of known type and shape. Only values of shape-like inputs (a Reshape's target, a Slice's
      bounds: small constants) change what it infers; the weights never are such inputs, so the
      graph comes out the same (``tests/test_export_memory.py`` checks it). None: no filter."""
    real_dedup = torch._C._jit_pass_onnx_deduplicate_initializers
    real_infer = torch._C._jit_pass_onnx_graph_shape_type_inference

    def keep(graph, params, *args):
        out = real_dedup(graph, params, *args)
        table.clear()
        table.update(out)
        return out

    def infer(graph, params, *args):
        if value_limit is not None:
            params = {
                k: v
                for k, v in params.items()
                if not isinstance(v, torch.Tensor) or v.numel() * v.element_size() <= value_limit
            }
        return real_infer(graph, params, *args)

    torch._C._jit_pass_onnx_deduplicate_initializers = keep
    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield table
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = real_dedup
        torch._C._jit_pass_onnx_graph_shape_type_inference = real_infer


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by its (first) name."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def _identify(t: torch.Tensor, by_storage: dict[int, list[tuple[str, torch.Tensor]]]) -> Ref | None:
    """The parameter ``t`` is a view of (itself, or its 2-D transpose), if any."""
    if t.device.type != "cpu" or not t.is_floating_point():
        return None
    for name, p in by_storage.get(t.untyped_storage().data_ptr(), ()):
        if p.dtype != t.dtype or p.storage_offset() != t.storage_offset():
            continue
        if t.shape == p.shape and t.stride() == p.stride():
            return Ref(name)
        if p.dim() == 2 and t.shape == p.shape[::-1] and t.stride() == p.stride()[::-1]:
            return Ref(name, ("T",))
    return None


def trace_without_weights(
    module: torch.nn.Module, args: tuple, spec, opset: int, value_limit: int | None = SHAPE_INFERENCE_VALUE_LIMIT
):
    """``module`` traced to an ONNX ``ModelProto`` whose parameter initializers are pending
    references to ``module``'s tensors (see the module docstring), in the order and under the names
    the exporter gives them. Initializers that are no view of a parameter (folded constants) keep
    their data. ``value_limit``: see ``_exporter_hooks``."""
    import onnx
    from onnx import numpy_helper

    table: dict[str, torch.Tensor] = {}
    buf = io.BytesIO()
    with warnings.catch_warnings(), _exporter_hooks(table, value_limit):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            export_params=False,
            dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    del buf
    by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, p in module_tensors(module).items():
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
    graph = model.graph
    inputs = list(graph.input)
    extra = [vi.name for vi in inputs if vi.name not in spec.input_names and vi.name not in table]
    if extra:
        raise RuntimeError(
            f"{spec.name}: the exporter's initializers were not captured ({extra[:3]} ...); "
            f"this torch version ({torch.__version__}) exports differently"
        )
    for vi in inputs:
        t = table.get(vi.name)
        if t is None:
            continue
        init = graph.initializer.add()
        ref = _identify(t, by_storage)
        if ref is not None:
            set_pending(init, ref, list(t.shape), _onnx_type(t.dtype))
        else:
            init.CopyFrom(numpy_helper.from_array(t.detach().contiguous().cpu().numpy(), vi.name))
        init.name = vi.name
    del graph.input[:]
    graph.input.extend(vi for vi in inputs if vi.name not in table)
    return model


def _onnx_type(dtype: torch.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=dtype).numpy().dtype)


# --- int8: MatMul weights -------------------------------------------------------------------------


def quantize_matmuls(model):
    """Dynamic int8 quantization of every MatMul whose B is a float initializer, in the form ONNX
    Runtime's ``quantize_dynamic(op_types_to_quantize=["MatMul"], per_channel=True,
    weight_type=QInt8)`` gives it (same nodes, names and numerics): A through one
    ``DynamicQuantizeLinear`` per tensor (uint8), B as int8 per column (``q8col`` / ``s8col``,
    zero points 0), ``MatMulInteger`` -> ``Cast`` -> times the product of the two scales. Works on
    pending initializers (nothing is computed here). Also runs ONNX shape inference first, as that
    quantizer does (the value_info it adds stays). Returns the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # activation -> (q, scale, zero point)
    quantized_weights: dict[str, tuple[str, str, str]] = {}
    new_inits, nodes = [], []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized_inputs:
            quantized_inputs[x] = (x + "_quantized", x + "_scale", x + "_zero_point")
            nodes.append(
                helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]), x + "_QuantizeLinear")
            )
        if weight.name not in quantized_weights:
            w = weight.name
            quantized_weights[w] = (w + "_quantized", w + "_scale", w + "_zero_point")
            n = weight.dims[1]
            new_inits += [
                derive(weight, w + "_scale", "s8col"),
                numpy_helper.from_array(np.zeros(n, dtype=np.int8), w + "_zero_point"),
                derive(weight, w + "_quantized", "q8col"),
            ]
        xq, xs, xz = quantized_inputs[x]
        wq, ws, wz = quantized_weights[weight.name]
        name = node.name + "_quant" if node.name else ""
        out = node.output[0]
        integer, cast = out + "_output_quantized", out + "_output_quantized_cast_output"
        scales = (name + "_scales_mul") if name else (xs + "_" + ws + "_mul")
        nodes += [
            helper.make_node("MatMulInteger", [xq, wq, xz, wz], [integer], name),
            helper.make_node("Cast", [integer], [cast], integer + "_cast", to=types.get(out, TensorProto.FLOAT)),
            helper.make_node("Mul", [xs, ws], [scales + ":0"], scales),
            helper.make_node("Mul", [cast, scales + ":0"], [out], name + "_output_scale_mul" if name else ""),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return model


# --- fp16 -----------------------------------------------------------------------------------------


def convert_fp16(model, keep_io_types: list[str], op_block_list: list[str], node_block_list: list[str] = ()):
    """ONNX Runtime's ``convert_float_to_float16`` on a model with pending initializers: the
    converter decides which initializers become float16 (those read by a node it converts) from
    dims and types alone, so each pending one is shown to it as an empty stand-in and gets the
    ``fp16`` transform if the converter turned it to float16. Shape inference runs first on the
    real dims (the converter is told not to run its own on the stand-ins). ``node_block_list``:
    nodes (by name) that stay float32."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.shape_inference.infer_shapes(model)
    stash = {}
    for t in model.graph.initializer:
        ref = ref_of(t)
        if ref is not None:
            stash[t.name] = (ref, list(t.dims))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            del t.dims[:]
            t.dims.append(0)
    out = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=op_block_list,
        node_block_list=list(node_block_list),
        disable_shape_infer=True,
    )
    for t in out.graph.initializer:
        if t.name in stash:
            ref, dims = stash[t.name]
            set_pending(t, ref.then("fp16") if t.data_type == TensorProto.FLOAT16 else ref, dims, t.data_type)
    for vi in out.graph.value_info:  # a Cast the converter put after a stand-in copies its (empty) shape
        base = vi.name.split("_cast_to_")[0]
        if base in stash:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in stash[base][1]:
                shape.dim.add().dim_value = d
    return out


# --- writing --------------------------------------------------------------------------------------


class SharedWeights:
    """Writes the initializers of every graph of an artifact into one file, ``weights.data``, each
    distinct tensor once: a tensor whose bytes are already in the file (the embedding table, read
    by the encoder and by the step, and by the step's output projection) is pointed at, not
    written again. Offsets are page-aligned so that ONNX Runtime maps the file instead of copying
    it: pages of a table that is only gathered from (the embedding rows) are read from disk when a
    token needs them, and two sessions mapping the same bytes share the same physical pages.
    Pending initializers (``Ref``) are computed here, one at a time, and streamed in row blocks
    where their transforms allow."""

    def __init__(self, out_dir: Path, name: str = WEIGHTS_FILE):
        self.path = out_dir / name
        self.name = name
        self._offsets: dict[tuple, int] = {}  # (data type, sha256, length) -> offset
        self._computed: dict[tuple, tuple[int, int]] = {}  # (source identity, transforms) -> (offset, length)
        self._file = open(self.path, "wb")
        self.written_bytes = 0

    def externalize(self, model, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Move every initializer of ``model`` of at least INLINE_LIMIT bytes into the file;
        compute pending ones from ``tensors`` (name -> tensor of the traced module), smaller
        pending ones inline."""
        import onnx
        from onnx import numpy_helper

        for t in model.graph.initializer:
            ref = ref_of(t)
            if ref is not None:
                if tensors is None or ref.source not in tensors:
                    raise KeyError(f"initializer {t.name}: its source tensor {ref.source} was not given")
                self._write_pending(t, ref, tensors[ref.source])
                continue
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name} is already external")
            data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            if len(data) < INLINE_LIMIT:
                continue
            offset = self._put(t.data_type, [np.frombuffer(data, dtype=np.uint8)])
            self._point(t, offset, len(data))
            del data
        self._file.flush()

    def _write_pending(self, t, ref: Ref, source: torch.Tensor) -> None:
        from onnx import numpy_helper

        array = source.detach().cpu().numpy()
        nbytes = pending_nbytes(t)
        if nbytes < INLINE_LIMIT:
            data = np.concatenate([c.reshape(-1) for c in materialize(ref, array)])
            name = t.name
            t.CopyFrom(numpy_helper.from_array(data.reshape(list(t.dims)).astype(_NP[t.data_type]), name))
            return
        key = (array.__array_interface__["data"][0], array.shape, array.strides, ref.transforms)
        if key not in self._computed:
            offset = self._put(t.data_type, materialize(ref, array), expect=nbytes, what=t.name)
            self._computed[key] = (offset, nbytes)
        offset, length = self._computed[key]
        self._point(t, offset, length)

    def _put(self, data_type: int, chunks, expect: int | None = None, what: str = "") -> int:
        """Write the chunks at the next page boundary; if the same bytes are in the file already,
        take them back and return the earlier offset."""
        pos = self._file.tell()
        offset = -(-pos // ALIGN) * ALIGN
        self._file.write(b"\0" * (offset - pos))
        h, n = hashlib.sha256(), 0
        for c in chunks:
            b = memoryview(np.ascontiguousarray(c)).cast("B")
            h.update(b)
            self._file.write(b)
            n += len(b)
        if expect is not None and n != expect:
            raise RuntimeError(f"initializer {what}: computed {n} bytes, its dims and type say {expect}")
        key = (data_type, h.digest(), n)
        if key in self._offsets:  # a copy of bytes already written
            self._file.seek(pos)
            self._file.truncate(pos)
            return self._offsets[key]
        self._offsets[key] = offset
        self.written_bytes += n
        return offset

    def _point(self, t, offset: int, length: int) -> None:
        import onnx

        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        del t.external_data[:]
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        t.data_location = onnx.TensorProto.EXTERNAL

    def close(self) -> None:
        self._file.close()


__all__ = [
    "SharedWeights",
    "Ref",
    "TRANSFORMS",
    "trace_without_weights",
    "quantize_matmuls",
    "convert_fp16",
    "derive",
    "ref_of",
    "set_pending",
    "materialize",
    "quantize_table",
    "table_scales",
    "column_scales",
    "quantize_columns",
    "to_float16",
    "module_tensors",
    "WEIGHTS_FILE",
    "INLINE_LIMIT",
    "ALIGN",
    "PENDING",
]
