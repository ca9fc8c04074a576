"""PyTorch graphs -> ONNX files (fp32 / fp16 / int8), traced from ``export/graphs.py`` with the
interfaces of ``runtime/graphs.py``.

Exporter choice: the TorchScript-based exporter (``dynamo=False``). Both graphs are static
control flow over dynamic shapes (no If, past_len 0 is an ordinary empty tensor), which that
exporter handles with plain ``dynamic_axes``; its output is the pattern ONNX Runtime's fusions and
TensorRT's parser are tested against; and it needs no onnxscript. Revisit when it is removed.
"""

from __future__ import annotations

import collections
import gc
import tempfile
from pathlib import Path

import numpy as np
import torch

from deltalm.graphs import GraphSpec, cache_names, cross_names, per_layer

from .graphs import DecoderStepGraph, EncoderGraph
from .stage_meter import stage
from .weights import (  # noqa: F401 - SharedWeights, quantize_table and the constants are also this module's API
    ALIGN,
    INLINE_LIMIT,
    WEIGHTS_FILE,
    SharedWeights,
    convert_fp16,
    derive,
    module_tensors,
    quantize_matmuls,
    quantize_table,
    trace_without_weights,
)

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


def tie_output_projection(model, cfg) -> int:
    """The step's output projection as ``Gemm(x, table, transB=1)`` on the [V, D] table itself,
    instead of the MatMul with the [D, V] transposed copy that tracing folds in: the bytes are
    then those of the embedding table, stored once (``SharedWeights``). The Gemm gets its own
    initializer name, so ONNX Runtime prepacks it from a mapping of its own and releases that
    mapping, while the gathers keep reading rows of the table on demand. Works on pending
    initializers (nothing is computed) and on ones that hold data. Returns the MatMuls rewritten
    (0 or 1)."""
    from onnx import helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if list(weight.dims) != [cfg.embed_dim, cfg.vocab_size]:
            continue
        table = derive(weight, "output_projection.weight", "T")
        del inits[weight.name]
        graph.initializer.remove(weight)
        graph.initializer.append(table)
        gemm = helper.make_node(
            "Gemm", [node.input[0], table.name], list(node.output), name=node.name or "output_projection", transB=1
        )
        graph.node.remove(node)
        graph.node.insert(i, gemm)
        rewritten += 1
    return rewritten


INT8_TABLE, INT8_SCALE = "embed_tokens.int8", "embed_tokens.scale"


def int8_embeddings(model, cfg) -> int:
    """int8 artifacts: the token embedding read from the int8 table of ``quantize_table`` instead of
    the float table. Each ``Gather(table, ids)`` becomes ``Transpose(Cast(Gather(q, ids, axis=1)) *
    Gather(scale, ids))``; the step's quantized output projection (MatMulInteger on a [D, V]
    int8 weight, per-column scales) is given the same q and scale, so the artifact stores one int8
    table for the encoder, the step's embedding and its projection. Works on pending initializers
    (the table is quantized when it is written) and on ones that hold data. Returns the gathers
    rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    gathers = [
        n
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in inits
        and list(inits[n.input[0]].dims) == [cfg.vocab_size, cfg.embed_dim]
    ]
    if not gathers:
        return 0
    table = inits[gathers[0].input[0]]
    q, scale = derive(table, INT8_TABLE, "q8table"), derive(table, INT8_SCALE, "s8table")
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
    graph.initializer.remove(table)
    graph.initializer.extend([q, scale])
    # the quantized output projection: an int8 [D, V] weight, read with the same q and scale
    for node in graph.node:
        if (
            node.op_type == "MatMulInteger"
            and node.input[1] in inits
            and list(inits[node.input[1]].dims) == [cfg.embed_dim, cfg.vocab_size]
        ):
            weight, zero = inits[node.input[1]], inits[node.input[3]]
            scale_name = weight.name[: -len("_quantized")] + "_scale"
            if scale_name not in inits or list(inits[scale_name].dims) != [cfg.vocab_size]:
                raise ValueError(f"the quantized output projection {weight.name} has no per-column scale")
            weight.CopyFrom(derive(table, weight.name, "q8table"))
            zero.CopyFrom(numpy_helper.from_array(np.zeros(cfg.vocab_size, np.int8), zero.name))
            inits[scale_name].CopyFrom(derive(table, scale_name, "s8table"))
    return len(gathers)


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


def export_graph(
    module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path, precision: str, weights: SharedWeights
) -> list[str]:
    """Trace ``module`` to ``out_dir/{spec.name}.onnx`` in the given precision, its weights into
    ``weights`` (the artifact's shared weights file); returns the files the graph reads. The graph
    is traced and rewritten without its weights (``deltalm.export.weights``); each weight is
    computed and written when the graph is done, one at a time."""
    import onnx

    final = out_dir / f"{spec.name}.onnx"
    with stage(spec.name):
        with stage("trace"):
            model = trace_without_weights(module, args, spec, OPSET)
        with stage("rewrite"):
            if spec.name == "decoder_step" and precision != "int8":
                tie_output_projection(model, module.cfg)
            if precision == "fp16":
                keep = [
                    t.name
                    for t in module.spec("float16").inputs + module.spec("float16").outputs
                    if t.dtype == "float32"
                ]
                model = _toposort(convert_fp16(model, keep, _fp16_block_list(), head_nodes(model)))
            elif precision == "int8":
                model = quantize_matmuls(model)
                int8_embeddings(model, module.cfg)
        with stage("weights"):
            weights.externalize(model, module_tensors(module))
        with stage("save and check"):
            onnx.save_model(model, str(final))
            del model
            gc.collect()
            onnx.checker.check_model(str(final))
    return [final.name, weights.name]


def _fp16_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return DEFAULT_OP_BLOCK_LIST + FP16_BLOCKED_OPS


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
                    files = export_graph(
                        step, step_trace_inputs(step, cross, enc_args[0]), spec, out_dir, precision, weights
                    )
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
        # Only the optimized graph's op types are read: no prepacked copy of the weights, and the
        # weights of the optimized model go to a file of their own, not into one in-memory proto.
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        before = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        after = collections.Counter(
            n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False).graph.node
        )
    return {op: n for op, n in sorted(after.items()) if op not in before}
