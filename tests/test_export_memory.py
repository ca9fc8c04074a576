"""The export's memory work keeps what it exported the same, and the verdict can fail.

The graphs are traced without their weights and every weight is streamed into weights.data on its
own (``deltalm.export.weights``): the result must be the graph the exporter makes with the weights
in memory, rewritten as before (fp32, fp16: the same nodes and the same bytes; int8: the nodes and
numbers of ONNX Runtime's own quantizer). The checkpoint is mapped, not read, and the model is
built on it without a copy. The parity verdict runs on realistic sentences and fails an artifact
whose int8 scales or fp16 weights are corrupted, while the demo model's int8 export passes it."""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deltalm.cli import main as cli


def _initializers(model, base_dir: Path | None = None) -> dict[str, tuple[int, list[int], np.ndarray]]:
    """name -> (data type, dims, values) of every initializer, external data read from base_dir."""
    from onnx import numpy_helper

    return {
        t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t, str(base_dir) if base_dir else ""))
        for t in model.graph.initializer
    }


def _nodes(model) -> collections.Counter:
    import onnx

    return collections.Counter(
        (
            n.op_type,
            n.name,
            tuple(n.input),
            tuple(n.output),
            n.domain,
            tuple(sorted(onnx.helper.printable_attribute(a) for a in n.attribute)),
        )
        for n in model.graph.node
    )


def _graphs(model):
    """The encoder and step graphs of ``model`` with their trace inputs (as export_graphs makes them)."""
    from deltalm.export.graphs import DecoderStepGraph, EncoderGraph
    from deltalm.export.onnx_export import encoder_trace_inputs, step_trace_inputs

    encoder = EncoderGraph(model).eval()
    args = encoder_trace_inputs(model.cfg)
    with torch.no_grad():
        cross = list(encoder(*args)[1:])
    step = DecoderStepGraph(model, 10).eval()
    return [(encoder, args), (step, step_trace_inputs(step, cross, args[0]))]


def _with_weights(module, args, spec, precision: str, tmp: Path):
    """The graph as the exporter writes it with its weights in memory, rewritten in memory: the
    way every artifact was made before the weights were streamed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from deltalm.export.onnx_export import OPSET, _fp16_block_list, _toposort, int8_embeddings, tie_output_projection

    path = tmp / f"{spec.name}-{precision}-reference.onnx"
    with warnings.catch_warnings(), torch.no_grad():
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
    model = onnx.load(str(path))
    if spec.name == "decoder_step" and precision != "int8":
        tie_output_projection(model, module.cfg)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from deltalm.export.onnx_export import head_nodes

        keep = [t.name for t in module.spec("float16").inputs + module.spec("float16").outputs if t.dtype == "float32"]
        model = _toposort(
            convert_float_to_float16(
                model, keep_io_types=keep, op_block_list=_fp16_block_list(), node_block_list=head_nodes(model)
            )
        )
    elif precision == "int8":
        quantized = tmp / f"{spec.name}-q.onnx"
        quantize_dynamic(
            str(path), str(quantized), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
        )
        model = onnx.load(str(quantized))
        int8_embeddings(model, module.cfg)
    return model


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_streamed_graphs_are_the_graphs_exported_with_their_weights(tiny_model, tmp_path, precision):
    """fp32 / fp16: the same nodes in the same order and the same initializers; int8: the nodes
    (as a set: ONNX Runtime's quantizer sorts them its own way), initializers and values of
    ``quantize_dynamic(per_channel=True, QInt8)``, the int8 embedding table as before."""
    import onnx

    from deltalm.export.onnx_export import SharedWeights, export_graph

    out = tmp_path / "streamed"
    out.mkdir()
    weights = SharedWeights(out)
    for module, args in _graphs(tiny_model):
        spec = module.spec()
        with torch.no_grad():
            export_graph(module, args, spec, out, precision, weights)
        weights._file.flush()
        got = onnx.load(str(out / f"{spec.name}.onnx"), load_external_data=False)
        want = _with_weights(module, args, spec, precision, tmp_path)
        if precision == "int8":
            assert _nodes(got) == _nodes(want)
        else:
            assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
        got_init, want_init = _initializers(got, out), _initializers(want)
        assert list(got_init) == list(want_init)
        for name, (dtype, dims, values) in want_init.items():
            assert got_init[name][:2] == (dtype, dims), name
            assert np.array_equal(got_init[name][2], values), name
        assert list(got.graph.input) == list(want.graph.input) and list(got.graph.output) == list(want.graph.output)
        assert {v.SerializeToString() for v in got.graph.value_info} == {
            v.SerializeToString() for v in want.graph.value_info
        }
    weights.close()


def test_shape_inference_without_the_weights_values_infers_the_same_graph(tiny_model):
    """The exporter's shape inference is shown only small initializers (the weights reach it as
    typed inputs): the graph is the one inferred with every value."""
    from deltalm.export.onnx_export import OPSET
    from deltalm.export.weights import trace_without_weights

    for module, args in _graphs(tiny_model):
        with torch.no_grad():
            every_value = trace_without_weights(module, args, module.spec(), OPSET, value_limit=None)
            no_weights = trace_without_weights(module, args, module.spec(), OPSET, value_limit=8)
        assert every_value.SerializeToString() == no_weights.SerializeToString()


def test_per_column_int8_matches_onnx_runtimes_quantizer():
    """``quantize_columns`` / ``column_scales``: ONNX Runtime's per-channel symmetric int8 of a
    MatMul weight (its own function, column by column), zero and tiny columns included."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    from deltalm.export.weights import column_scales, quantize_columns

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 40)) * rng.uniform(1e-3, 3, size=40)).astype(np.float32)
    w[:, 3] = 0.0
    w[:, 7] = 1e-42  # below float32's smallest normal: scale 1
    w[5, 9] = 7.0 * np.abs(w[:, 9]).max()  # one outlier
    q, scale = quantize_columns(w), column_scales(w)
    for c in range(w.shape[1]):
        zero, s, qc = quantize_data(w[:, c].flatten(), TensorProto.INT8, True)
        assert zero == 0 and s.dtype == np.float32
        assert scale[c] == s, c
        assert np.array_equal(q[:, c], qc), c


def test_build_model_holds_the_checkpoints_tensors_without_a_copy(tiny_ckpt):
    from deltalm.export.checkpoints import build_model, load_checkpoint

    ckpt, _, dct, _ = tiny_ckpt
    loaded = load_checkpoint(ckpt)
    model = build_model(loaded)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.data_ptr() == loaded.state_dict[name].data_ptr(), name
    tied = [
        model.encoder.embed_tokens.weight,
        model.decoder.embed_tokens.weight,
        model.decoder.output_projection.weight,
    ]
    assert tied[0] is tied[1] is tied[2]
    assert not any(p.is_meta for p in model.parameters())


def test_a_checkpoints_optimizer_state_is_never_read(tiny_ckpt, tmp_path):
    """A fairseq checkpoint is mapped, not read: 400 MB of optimizer state add nothing to RSS."""
    from deltalm.export.checkpoints import load_checkpoint
    from deltalm.export.stage_meter import StageMeter
    from deltalm.export.toy_model import save_fairseq_checkpoint

    big = tmp_path / "with_optimizer.pt"
    save_fairseq_checkpoint(tiny_ckpt[3], big)
    ckpt = torch.load(big, weights_only=False)
    ckpt["last_optimizer_state"] = {
        "state": {0: {"exp_avg": torch.ones(50_000_000), "exp_avg_sq": torch.ones(50_000_000)}}
    }
    torch.save(ckpt, big)
    del ckpt
    meter = StageMeter(exact_stages=True)
    with meter.stage("load") as stage:
        loaded = load_checkpoint(big)
    assert loaded.config.kind == "deltalm"
    if meter.exact:
        assert stage.peak_mb - stage.rss_before_mb < 100


def test_stage_meter_peaks_so_far_leave_the_process_mark_alone():
    """By default the kernel's peak mark is never reset: /usr/bin/time and a parent's wait4 still
    see the process's peak after an export."""
    from deltalm.export.stage_meter import StageMeter, _status_mb

    meter = StageMeter()
    with meter.stage("allocates 256 MB") as big:
        block = np.ones(32 << 20)
        del block
    with meter.stage("after") as after:
        pass
    assert not meter.exact and after.peak_mb >= big.peak_mb  # a peak so far
    assert _status_mb("VmHWM") >= big.peak_mb


def test_stage_meter_gives_each_stage_its_own_peak():
    from deltalm.export.stage_meter import StageMeter

    meter = StageMeter(exact_stages=True)
    with meter.stage("outer") as outer:
        with meter.stage("allocates 256 MB") as big:
            block = np.ones(32 << 20)  # 256 MB, touched
            del block
        with meter.stage("allocates nothing") as small:
            pass
    if not meter.exact:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert big.peak_mb - big.rss_before_mb >= 250
    assert small.peak_mb - small.rss_before_mb < 50
    assert outer.peak_mb >= big.peak_mb and meter.peak_mb >= big.peak_mb
    assert [s.name for s in meter.stages] == ["outer", "allocates 256 MB", "allocates nothing"]


def test_sampled_parity_text_is_frequency_weighted_real_tokens(tiny):
    from deltalm.export.parity import sample_text
    from deltalm.tokenizer import Tokenizer

    tok = Tokenizer(tiny.spm, tiny.dict)
    text = sample_text(tok, n=16, seed=0)
    assert len(text.sentences) == 16 and "sampled from spm.model" in text.origin
    assert all(s[-1] == tok.eos and len(s) > 1 and tok.unk not in s for s in text.sentences)
    assert sample_text(tok, n=16, seed=0) == text  # deterministic


def _export(tiny, out: Path, *extra) -> int:
    return cli(
        [
            "export",
            str(tiny.checkpoint),
            "--spm",
            str(tiny.spm),
            "--dict",
            str(tiny.dict),
            "--out",
            str(out),
            "--no-optimize",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def demo_exports(tiny, tmp_path_factory):
    """The demo model exported to int8 and fp16 (the exports must pass their own verdict)."""
    root = tmp_path_factory.mktemp("demo-exports")
    for precision in ("int8", "fp16"):
        assert _export(tiny, root / precision, "--precision", precision) == 0
    return root


def test_the_demo_models_int8_export_passes_its_verdict_on_sampled_text(demo_exports):
    report = json.loads((demo_exports / "int8" / "parity.json").read_text())
    assert report["passed"] is True and report["failures"] == []
    assert "sampled from spm.model" in report["sources"]
    teacher = report["teacher_forced"]
    assert teacher["decisive_rows"] >= 100 and teacher["decisive_top1_agreement"] >= 0.97
    assert report["memory"]["peak_rss_mb"] > 0 and [s["name"] for s in report["memory"]["stages"]][:2] == [
        "load",
        "export",
    ]


def _corrupt(artifact: Path, pick, change) -> list[str]:
    """Apply ``change`` (array -> array) to the initializers ``pick(tensor)`` selects, inline ones
    in the .onnx files and external ones in weights.data (each stored tensor once), and record the
    new files' hashes in the manifest, as if the export had written them. Returns the names."""
    import onnx
    from onnx import numpy_helper

    from deltalm.artifact import hash_files, read_manifest

    data = bytearray((artifact / "weights.data").read_bytes())
    changed, done = [], set()
    for graph in ("encoder", "decoder_step", "decoder_step_shortlist"):
        path = artifact / f"{graph}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            if not pick(t):
                continue
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            if "offset" in info:
                at, n = int(info["offset"]), int(info["length"])
                if (at, n) not in done:
                    data[at : at + n] = change(np.frombuffer(bytes(data[at : at + n]), dtype)).astype(dtype).tobytes()
                    done.add((at, n))
            else:
                t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t)).astype(dtype), t.name))
            changed.append(t.name)
        onnx.save_model(model, str(path))
    (artifact / "weights.data").write_bytes(bytes(data))
    manifest = read_manifest(artifact)
    manifest.files = hash_files(artifact, list(manifest.files))
    manifest.write(artifact)
    return changed


def test_the_verdict_fails_an_int8_artifact_whose_scales_are_corrupted(demo_exports, tmp_path, capsys):
    """Every int8 scale (the MatMul weights' per-column scales and the embedding table's per-token
    scales) in reverse order, as a quantizer mixing up its axis would write them."""
    import shutil

    from deltalm.errors import ExportError
    from deltalm.export import check_parity

    art = tmp_path / "int8"
    shutil.copytree(demo_exports / "int8", art)
    changed = _corrupt(
        art, lambda t: t.data_type == 1 and t.name.endswith(("_scale", "embed_tokens.scale")), lambda a: a[::-1]
    )
    assert "embed_tokens.scale" in changed and len(changed) > 10
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(art, log=lambda line: None)


def test_the_verdict_fails_an_fp16_artifact_with_a_corrupted_island(demo_exports, tmp_path):
    """An island of the fp16 graph broken: the feed-forward weights of the first encoder and
    decoder layers with their signs flipped."""
    import shutil

    from deltalm.errors import ExportError
    from deltalm.export import check_parity

    art = tmp_path / "fp16"
    shutil.copytree(demo_exports / "fp16", art)
    ffn = ("/encoder/layers.0/fc1", "/encoder/layers.0/fc2", "/layers.0/fc1", "/layers.0/fc2")

    def in_ffn(t):  # the MatMul weights read by those layers' fc1 / fc2 MatMuls
        return t.data_type == 10 and t.name in weights_of

    import onnx

    weights_of = set()
    for graph in ("encoder", "decoder_step", "decoder_step_shortlist"):
        for n in onnx.load(str(art / f"{graph}.onnx"), load_external_data=False).graph.node:
            if n.op_type == "MatMul" and n.name.startswith(ffn):
                weights_of.add(n.input[1])
    changed = _corrupt(art, in_ffn, lambda a: -a)
    assert len(changed) >= 4
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(art, log=lambda line: None)


def test_parity_corpus_replaces_the_sampled_text(tiny, tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("the cat sat on the mat\n\nhello world\n", encoding="utf-8")
    out = tmp_path / "art"
    assert _export(tiny, out, "--parity-corpus", str(corpus)) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["sources"] == f"2 lines of {corpus}"
    assert report["teacher_forced"]["rows"] == 2


def test_an_unreadable_parity_corpus_is_one_line_before_the_export(tiny, tmp_path, capsys):
    from cli_support import assert_one_line_error, run_cli

    res = run_cli(
        [
            "export",
            str(tiny.checkpoint),
            "--spm",
            str(tiny.spm),
            "--dict",
            str(tiny.dict),
            "--out",
            str(tmp_path / "art"),
            "--parity-corpus",
            str(tmp_path / "missing.txt"),
        ]
    )
    assert_one_line_error(res, "--parity-corpus", "missing.txt")
    assert not (tmp_path / "art").exists()


def test_mapped_files_and_release_give_back_a_files_pages(tmp_path):
    """A file's mapped pages leave this process's RSS when given back, and read the same after."""
    from deltalm.export.file_pages import mapped_files, release
    from deltalm.export.stage_meter import rss_mb

    path = tmp_path / "weights.bin"
    np.arange(64 << 20, dtype=np.uint8).tofile(path)  # 64 MB
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    total = int(mapped.sum(dtype=np.uint64))  # touches every page
    assert mapped_files([mapped.ctypes.data]) == {str(path.resolve())}
    before = rss_mb()
    assert release([path]) >= 64 << 20
    assert before - rss_mb() > 50
    assert int(mapped.sum(dtype=np.uint64)) == total


def test_export_memory_bench_refuses_unknown_shapes(tmp_path):
    from cli_support import assert_one_line_error, run_cli

    res = run_cli(["bench", "--export-memory", "--shapes", "huge", "--out", str(tmp_path)])
    assert_one_line_error(res, "--shapes", "huge")
