"""PyTorch graphs -> ONNX files (fp32 / fp16 / int8), traced from ``export/graphs.py`` with the
interfaces of ``runtime/graphs.py``.

Exporter choice: the TorchScript-based exporter (``dynamo=False``). Both graphs are static
control flow over dynamic shapes (no If, past_len 0 is an ordinary empty tensor), which that
exporter handles with plain ``dynamic_axes``; its output is the pattern ONNX Runtime's fusions and
TensorRT's parser are tested against; and it needs no onnxscript. Revisit when it is removed.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from deltalm.graphs import GraphSpec, cache_names, cross_names, per_layer

from .graphs import DecoderStepGraph, EncoderGraph

OPSET = 17
FP16_BLOCKED_OPS = ["LayerNormalization", "Softmax", "LogSoftmax", "TopK", "IsNaN", "CumSum", "Range"]


def encoder_trace_inputs(cfg) -> tuple[torch.Tensor]:
    src = torch.tensor([[cfg.pad, cfg.pad, 5, 6, 7, cfg.eos], [8, 9, 10, 11, 12, cfg.eos]], dtype=torch.int64)
    return (src.clamp(max=cfg.vocab_size - 1),)


def step_trace_inputs(step_graph, k_cross: list[torch.Tensor], src: torch.Tensor) -> tuple:
    """2 sentences x 2 hypotheses, 3 new tokens per row, a cache of 5 positions (rows 2 and 3
    at positions), 2 scored ids: every axis a size of its own, none of them 1, and the log-probs
    asked for (the traced slice keeps its width as an input). k_cross: the encoder's cross K/V
    outputs, in the order of its spec."""
    cfg = step_graph.cfg
    rows, new_len, cache_len = 4, 3, 5
    g = torch.Generator().manual_seed(0)
    feeds = {
        "tokens": torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]]).clamp(max=cfg.vocab_size - 1),
        "positions": torch.tensor([0, 2, 5, 4]),
        "src_padding": src.eq(cfg.pad),
        "forced_tokens": torch.tensor([-1, -1, 4, -1]).clamp(max=cfg.vocab_size - 1),
        "ban_eos": torch.tensor([False, True, False, False]),
        "only_eos": torch.tensor([False, False, False, True]),
        "unk_penalty": torch.tensor([0.0, 0.5, 0.0, 1.0]),
        "score_ids": torch.arange(rows * new_len * 2).reshape(rows, new_len, 2) % cfg.vocab_size,
        "want_log_probs": torch.tensor(True),
    }
    for i in range(cfg.decoder_layers):
        for name in cache_names(i):
            feeds[name] = torch.randn(rows, cfg.heads, cache_len, cfg.head_dim, generator=g)
    feeds |= dict(zip(per_layer(cfg, cross_names), k_cross, strict=True))
    if step_graph.shortlist:  # k + 7 candidates: a length distinct from every other axis
        feeds["candidates"] = torch.arange(min(cfg.vocab_size, step_graph.k + 7), dtype=torch.int64)
    return step_graph.inputs(feeds)


def _torch_export(module: torch.nn.Module, args: tuple, spec: GraphSpec, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


WEIGHTS_FILE = "weights.data"
INLINE_LIMIT = 1024  # bytes: smaller tensors (shapes, scalars) stay inside the .onnx file
ALIGN = 4096  # every tensor in weights.data starts on a page: ONNX Runtime maps it from the file


class SharedWeights:
    """Writes the initializers of every graph of an artifact into one file, ``weights.data``, each
    distinct tensor once: a tensor whose bytes are already in the file (the embedding table, read
    by the encoder and by the step, and by the step's output projection) is pointed at, not
    written again. Offsets are page-aligned so that ONNX Runtime maps the file instead of copying
    it: pages of a table that is only gathered from (the embedding rows) are read from disk when a
    token needs them, and two sessions mapping the same bytes share the same physical pages."""

    def __init__(self, out_dir: Path, name: str = WEIGHTS_FILE):
        self.path = out_dir / name
        self.name = name
        self._offsets: dict[tuple, int] = {}
        self._file = open(self.path, "wb")

    def externalize(self, model) -> None:
        """Move every initializer of ``model`` of at least INLINE_LIMIT bytes into the file."""
        import hashlib

        import onnx
        from onnx import numpy_helper

        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name} is already external")
            if t.HasField("raw_data"):
                if len(t.raw_data) < INLINE_LIMIT:
                    continue
                data = t.raw_data
            else:
                data = numpy_helper.to_array(t).tobytes()
                if len(data) < INLINE_LIMIT:
                    continue
            key = (t.data_type, hashlib.sha256(data).digest(), len(data))
            offset = self._offsets.get(key)
            if offset is None:
                pos = self._file.tell()
                offset = -(-pos // ALIGN) * ALIGN
                self._file.write(b"\0" * (offset - pos))
                self._file.write(data)
                self._offsets[key] = offset
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
            del data
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def tie_output_projection(model, cfg) -> int:
    """The step's output projection as ``Gemm(x, table, transB=1)`` on the [V, D] table itself,
    instead of the MatMul with the [D, V] transposed copy that tracing folds in: the bytes are
    then those of the embedding table, stored once (``SharedWeights``). The Gemm gets its own
    initializer name, so ONNX Runtime prepacks it from a mapping of its own and releases that
    mapping, while the gathers keep reading rows of the table on demand. Returns the MatMuls
    rewritten (0 or 1)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if list(weight.dims) != [cfg.embed_dim, cfg.vocab_size]:
            continue
        transposed = numpy_helper.to_array(weight)
        del inits[weight.name]
        graph.initializer.remove(weight)
        del weight
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(transposed.T), "output_projection.weight"))
        del transposed
        table = graph.initializer[-1]
        gemm = helper.make_node("Gemm", [node.input[0], table.name], list(node.output), name=node.name or "output_projection",
                                transB=1)
        graph.node.remove(node)
        graph.node.insert(i, gemm)
        rewritten += 1
    return rewritten


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the [V, D] embedding table: ``q`` [D, V] int8 (laid out as the
    step's quantized output projection reads it: one column per token) and ``scale`` [V] float32,
    ``table[v] ~= q[:, v] * scale[v]``."""
    absmax = np.abs(table).max(axis=1)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


INT8_TABLE, INT8_SCALE = "embed_tokens.int8", "embed_tokens.scale"


def int8_embeddings(model, cfg) -> int:
    """int8 artifacts: the token embedding read from the int8 table of ``quantize_table`` instead of
    the float table. Each ``Gather(table, ids)`` becomes ``Transpose(Cast(Gather(q, ids, axis=1)) *
    Gather(scale, ids))``; the step's quantized output projection (MatMulInteger on a [D, V]
    int8 weight, per-column scales) is given the same q and scale, so the artifact stores one int8
    table for the encoder, the step's embedding and its projection. Returns the gathers rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and list(inits[n.input[0]].dims) == [cfg.vocab_size, cfg.embed_dim]]
    if not gathers:
        return 0
    table = numpy_helper.to_array(inits[gathers[0].input[0]])
    q, scale = quantize_table(table)
    for node in gathers:
        if node.input[1] not in ranks:
            raise ValueError(f"{node.name}: the embedding is gathered with computed ids, not a graph input")
        ids, out, rank, stem = node.input[1], node.output[0], ranks[node.input[1]], node.output[0]
        nodes = [
            helper.make_node("Gather", [INT8_TABLE, ids], [stem + ".q"], axis=1),  # [D, *ids]
            helper.make_node("Cast", [stem + ".q"], [stem + ".f"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [INT8_SCALE, ids], [stem + ".s"], axis=0),  # [*ids]
            helper.make_node("Mul", [stem + ".f", stem + ".s"], [stem + ".m"]),
            helper.make_node("Transpose", [stem + ".m"], [out], perm=[*range(1, rank + 1), 0]),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate(nodes):
            graph.node.insert(at + k, n)
    graph.initializer.remove(inits[gathers[0].input[0]])
    graph.initializer.extend([numpy_helper.from_array(q, INT8_TABLE), numpy_helper.from_array(scale, INT8_SCALE)])
    # the quantized output projection: an int8 [D, V] weight, read with the same q and scale
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits and list(inits[node.input[1]].dims) == [cfg.embed_dim, cfg.vocab_size]:
            weight, zero = inits[node.input[1]], inits[node.input[3]]
            scale_name = weight.name[: -len("_quantized")] + "_scale"
            if scale_name not in inits or list(inits[scale_name].dims) != [cfg.vocab_size]:
                raise ValueError(f"the quantized output projection {weight.name} has no per-column scale")
            weight.CopyFrom(numpy_helper.from_array(q, weight.name))
            zero.CopyFrom(numpy_helper.from_array(np.zeros(cfg.vocab_size, np.int8), zero.name))
            inits[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
    return len(gathers)


def _convert_fp16(model, spec16: GraphSpec):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = [t.name for t in spec16.inputs + spec16.outputs if t.dtype == "float32"]
    return convert_float_to_float16(model, keep_io_types=keep, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_BLOCKED_OPS,
                                    node_block_list=head_nodes(model))


def head_nodes(model, output: str = "log_probs") -> list[str]:
    """Names of the nodes computed from the step's output projection (its log-sum-exp, top-k,
    rules, scored ids and log-probs): they stay float32 in an fp16 graph, where a sum of 250k
    exponentials overflows and a logit minus the row's maximum loses its digits. The projection is
    the matrix product nearest to ``output``; every node downstream of it is the head. [] for a
    graph without ``output`` (the encoder)."""
    graph = model.graph
    for k, node in enumerate(graph.node):
        if not node.name:
            node.name = f"node_{k}_{node.op_type}"
    producer = {out: node for node in graph.node for out in node.output}
    if output not in producer:
        return []
    # breadth-first towards the inputs: the first MatMul / Gemm met is the projection
    frontier, seen, projection = [producer[output]], set(), None
    while frontier and projection is None:
        nxt = []
        for node in frontier:
            if node.op_type in ("MatMul", "Gemm"):
                projection = node
                break
            for name in node.input:
                if name in producer and producer[name].name not in seen:
                    seen.add(producer[name].name)
                    nxt.append(producer[name])
        frontier = nxt
    if projection is None:
        return []
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    head, todo = set(), list(projection.output)
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in head:
                head.add(node.name)
                todo.extend(node.output)
    return sorted(head)


def _toposort(model):
    """Order the nodes so every input is produced before it is used (the fp16 converter appends
    its Cast nodes at the end of the list)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


@contextlib.contextmanager
def _without_log_message(fragment: str):
    """Drop root-logger records whose message contains ``fragment`` while the block runs."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return fragment not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _quantize_int8(model, scratch: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = scratch / "fp32.onnx", scratch / "q.onnx"
    _save_for_tool(model, src)
    # MatMul only: the output projection and every linear layer (the embedding: int8_embeddings).
    # ONNX Runtime's quantizer advises "pre-processing" (symbolic shape inference + its graph
    # optimizer) on every call. Not done: dynamic quantization of MatMuls with constant weights needs
    # no shape inference, and the optimizer would bake ORT-only fused ops into the artifact, which
    # ORT applies at session creation anyway (and TensorRT could not parse). So the advice is dropped.
    with _without_log_message("pre-processing before quantization"):
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
    import onnx

    return onnx.load(str(dst))


def _save_for_tool(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=INLINE_LIMIT)


def export_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path, precision: str,
                 weights: SharedWeights) -> list[str]:
    """Trace ``module`` to ``out_dir/{spec.name}.onnx`` in the given precision, its weights into
    ``weights`` (the artifact's shared weights file); returns the files the graph reads."""
    import onnx

    final = out_dir / f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        raw = Path(scratch) / "raw.onnx"
        _torch_export(module, args, spec, raw)
        model = onnx.load(str(raw))
        if spec.name == "decoder_step" and precision != "int8":
            tie_output_projection(model, module.cfg)
        if precision == "fp16":
            model = _toposort(_convert_fp16(model, module.spec("float16")))
        elif precision == "int8":
            model = _quantize_int8(model, Path(scratch))
            int8_embeddings(model, module.cfg)
        weights.externalize(model)
        onnx.save_model(model, str(final))
        del model
        gc.collect()
    onnx.checker.check_model(str(final))
    return [final.name, weights.name]


def export_graphs(model: torch.nn.Module, out_dir: Path, precision: str, topk: int) -> dict:
    """Export the model's graphs into out_dir. Returns {graph name: {"file", "files", "spec"}}."""
    cfg = model.cfg
    float_dtype = "float16" if precision == "fp16" else "float32"
    encoder = EncoderGraph(model).eval()
    graphs = {}
    weights = SharedWeights(out_dir)
    try:
        with torch.no_grad():
            enc_args = encoder_trace_inputs(cfg)
            files = export_graph(encoder, enc_args, encoder.spec(), out_dir, precision, weights)
            graphs["encoder"] = {"file": files[0], "files": files, "spec": encoder.spec(float_dtype).to_dict()}
            if cfg.is_encoder_decoder:
                cross = list(encoder(*enc_args)[1:])
                # the full step, and the step over a vocabulary shortlist (the same weights: no new bytes)
                for shortlist in (False, True):
                    step = DecoderStepGraph(model, topk, shortlist=shortlist).eval()
                    spec = step.spec()
                    files = export_graph(step, step_trace_inputs(step, cross, enc_args[0]), spec, out_dir, precision,
                                         weights)
                    graphs[spec.name] = {"file": files[0], "files": files, "spec": step.spec(float_dtype).to_dict()}
    finally:
        weights.close()
    return graphs


def ort_fusions(path: Path) -> dict[str, int]:
    """Which fused operators ONNX Runtime's CPU graph optimizer makes of this graph (it applies
    them when a session is created): op type -> count, for op types that are not in the
    exported graph."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        before = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        after = collections.Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False).graph.node)
    return {op: n for op, n in sorted(after.items()) if op not in before}
