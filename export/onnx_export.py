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
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from deltalm.graphs import GraphSpec

from .graphs import DecoderStepGraph, EncoderGraph

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf's hard limit is 2 GiB
FP16_BLOCKED_OPS = ["LayerNormalization", "Softmax", "LogSoftmax", "TopK", "IsNaN", "CumSum", "Range"]


def encoder_trace_inputs(cfg) -> tuple[torch.Tensor]:
    src = torch.tensor([[cfg.pad, cfg.pad, 5, 6, 7, cfg.eos], [8, 9, 10, 11, 12, cfg.eos]], dtype=torch.int64)
    return (src.clamp(max=cfg.vocab_size - 1),)


def step_trace_inputs(model, k_cross: list[torch.Tensor], src: torch.Tensor) -> tuple:
    """rows = 2 sentences x 2 hypotheses, past_len 3: shapes distinct from every size-1 axis."""
    cfg = model.cfg
    rows, past_len = 4, 3
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(rows, cfg.heads, past_len, cfg.head_dim, generator=g) for _ in range(2 * cfg.decoder_layers)]
    return (
        torch.tensor([5, 6, 7, 8]).clamp(max=cfg.vocab_size - 1),
        torch.tensor(3, dtype=torch.int64),
        torch.tensor([1, 0, 3, 3]),
        torch.tensor([0, 1]),
        src.eq(cfg.pad),
        *past,
        *k_cross,
        torch.full((rows,), -1, dtype=torch.int64),
        torch.tensor(False),
        torch.tensor(False),
        torch.tensor(0.0),
    )


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


def _initializer_bytes(model) -> int:
    import onnx

    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1,
                      onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT64: 8}.get(t.data_type, 4)
    return total


def save_onnx(model, path: Path) -> list[str]:
    """Write one .onnx file, with its weights in ``NAME.data`` when they would pass protobuf's
    2 GiB limit. Returns the file names written (relative to path's directory)."""
    import onnx

    if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path.name, data_name]
    onnx.save_model(model, str(path))
    return [path.name]


def _convert_fp16(model, spec16: GraphSpec):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = [t.name for t in spec16.inputs + spec16.outputs if t.dtype == "float32"]
    return convert_float_to_float16(model, keep_io_types=keep, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_BLOCKED_OPS)


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


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: the output projection and every linear layer; the embedding Gather stays fp32.
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=False)


def export_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path, precision: str) -> list[str]:
    """Trace ``module`` to ``out_dir/{spec.name}.onnx`` in the given precision; returns the files."""
    import onnx

    final = out_dir / f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        raw = Path(scratch) / "raw.onnx"
        _torch_export(module, args, spec, raw)
        if precision == "fp32" and raw.stat().st_size < EXTERNAL_DATA_THRESHOLD and len(list(Path(scratch).iterdir())) == 1:
            os.replace(raw, final)  # nothing to convert: no second in-memory copy of the weights
            onnx.checker.check_model(str(final))
            return [final.name]
        model = onnx.load(str(raw))
        if precision == "fp16":
            model = _toposort(_convert_fp16(model, module.spec("float16")))
        elif precision == "int8":
            if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
                raise NotImplementedError("int8 export of models over 2 GB is not supported yet")
            onnx.save_model(model, str(raw))
            _quantize_int8(raw, Path(scratch) / "q.onnx")
            model = onnx.load(str(Path(scratch) / "q.onnx"))
        files = save_onnx(model, final)
        del model
        gc.collect()
    onnx.checker.check_model(str(final))
    return files


def export_graphs(model: torch.nn.Module, out_dir: Path, precision: str, topk: int) -> dict:
    """Export the model's graphs into out_dir. Returns {graph name: {"file", "files", "spec"}}."""
    cfg = model.cfg
    float_dtype = "float16" if precision == "fp16" else "float32"
    encoder = EncoderGraph(model).eval()
    graphs = {}
    with torch.no_grad():
        enc_args = encoder_trace_inputs(cfg)
        files = export_graph(encoder, enc_args, encoder.spec(), out_dir, precision)
        graphs["encoder"] = {"file": files[0], "files": files, "spec": encoder.spec(float_dtype).to_dict()}
        if cfg.is_encoder_decoder:
            step = DecoderStepGraph(model, topk).eval()
            cross = list(encoder(*enc_args)[1:])
            files = export_graph(step, step_trace_inputs(model, cross, enc_args[0]), step.spec(), out_dir, precision)
            graphs["decoder_step"] = {"file": files[0], "files": files, "spec": step.spec(float_dtype).to_dict()}
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
