"""``deltalm engines`` and ``--backend trt`` against a stand-in ``tensorrt`` shaped like TensorRT
11.x and like 10.12 (``tests/trt_standin.py``, written from NVIDIA's documentation), built through
the real Polygraphy loaders. The stand-in records every removed / deprecated weak-typing name
touched and every layer precision or output type set; these tests fail on any of them. The
stand-in's engines execute the ONNX graphs with ONNX Runtime, so the backend's bindings, shapes,
dtypes, host / device addresses and output copies are checked against the ORT backend, output for
output and token for token, through the search engine with sentences joining and leaving."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import trt_standin
from trt_standin import FakeCuda, StandInError, make_tensorrt

from deltalm.artifact import MANIFEST, open_artifact
from deltalm.atomic import write_json_atomic
from deltalm.backends.trt import check_engine_compat, graph_source_digest
from deltalm.cli import main
from deltalm.compare import Thresholds, compare_steps, compare_translations
from deltalm.errors import ArtifactError, DeltaLMError, ExportError, InputError
from deltalm.manifest import Manifest
from deltalm.options import TranslateOptions

pytest.importorskip("polygraphy")

TRT11, TRT10 = "11.4.0.106", "10.12.0.36"
GPU = ("NVIDIA H200", "9.0")
# 20 positions: the search's capacities (chunks of 16) fit up to position 15 and are cut beyond
SMALL = ["--max-batch", "3", "--max-beam", "4", "--max-src-len", "20", "--max-tgt-len", "20"]


def install(monkeypatch, version: str):
    """Put a stand-in tensorrt of ``version`` where ``import tensorrt`` and Polygraphy find it,
    with a stand-in GPU and CUDA; returns the module."""
    import deltalm.backends.trt as trt_backend
    import deltalm.export.engines as engines

    trt = make_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt_standin.reset_polygraphy_tensorrt()
    monkeypatch.setattr(engines, "gpu_identity", lambda: GPU)
    monkeypatch.setattr(trt_backend, "gpu_identity", lambda: GPU)
    monkeypatch.setattr(trt_backend, "_import_cuda", lambda: FakeCuda)
    FakeCuda.copies.clear()
    return trt


@pytest.fixture(params=[TRT11, TRT10])
def trt(request, monkeypatch):
    yield install(monkeypatch, request.param)
    trt_standin.reset_polygraphy_tensorrt()


@pytest.fixture
def trt11(monkeypatch):
    yield install(monkeypatch, TRT11)
    trt_standin.reset_polygraphy_tensorrt()


# Polygraphy 0.53.6 probes this removed attribute inside ``try: ... except AttributeError`` (its
# calibrator setup, polygraphy/backend/trt/util.py), which is how it supports 10.x and 11.x alike.
POLYGRAPHY_GUARDED = {("IBuilderConfig.int8_calibrator", "polygraphy.backend.trt.util")}


def assert_no_removed_api(trt) -> None:
    """Nothing of ours touched a removed or deprecated weak-typing name or set a layer precision,
    and Polygraphy touched only what it guards."""
    assert [t for t in trt.touched if not t[1].startswith("polygraphy.")] == []
    assert set(trt.touched) <= POLYGRAPHY_GUARDED


def plan_of(artifact: Path, graph: str) -> dict:
    return json.loads((artifact / "engines" / f"{graph}.plan").read_bytes())


# -- the build -------------------------------------------------------------------------------


def test_engines_are_built_strongly_typed_without_removed_apis(artifact_copy, trt, capsys):
    from deltalm.export.engines import build_engines

    meta = build_engines(artifact_copy, max_batch=2, max_beam=3, max_src_len=16, max_tgt_len=8)
    assert_no_removed_api(trt)
    for graph in ("encoder", "decoder_step"):
        plan = plan_of(artifact_copy, graph)
        assert plan["strongly_typed"] is True and plan["tensorrt"] == trt.__version__
        assert plan["builder_flags"] == []  # no precision flag; TF32 off (Polygraphy's default)
        assert plan["layers"] == meta["engines"][graph]["layers"] > 0
    assert meta["strongly_typed"] is True and meta["precision"] == "fp32"
    step = plan_of(artifact_copy, "decoder_step")
    assert step["profile"]["cache_key_0"] == {"min": [1, 4, 0, 16], "opt": [3, 4, 2, 16], "max": [6, 4, 8, 16]}
    assert step["profile"]["want_log_probs"] == {"min": [], "opt": [], "max": []}
    assert step["shape_inputs"] == [] and step["data_dependent"] == ["log_probs"]  # its vocab axis
    assert not (artifact_copy / "engines" / "timing.cache.lock").exists()


def test_the_standin_catches_weak_typing(artifact_dir, trt):
    """What the old builder did (BuilderFlag.FP16, pinned layer precisions) fails on the stand-in:
    the checks above would see it."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    _, network, _ = NetworkFromOnnxPath(str(artifact_dir / "encoder.onnx"), strongly_typed=True)()
    layer = next(layer for layer in network if layer.type.name == "NORMALIZATION")
    with pytest.raises(StandInError, match="not allowed in a strongly typed network"):
        layer.precision = trt.float32
    with pytest.raises(StandInError, match="not allowed in a strongly typed network"):
        layer.set_output_type(0, trt.float32)
    if trt.__version__.startswith("11."):
        with pytest.raises(AttributeError):
            _ = trt.BuilderFlag.FP16
    else:
        trt.IBuilderConfig().set_flag(trt.BuilderFlag.FP16)
    assert [what for what, _ in trt.touched] == ["ILayer.precision", "ILayer.set_output_type", "BuilderFlag.FP16"]
    assert {module for _, module in trt.touched} == {__name__}


def test_engines_are_written_atomically_and_recorded_in_the_manifest(artifact_copy, trt11, capsys):
    assert main(["engines", str(artifact_copy), "--max-batch", "2", "--max-beam", "3"]) == 0
    out = capsys.readouterr().out
    assert "(fp32, strongly typed)" in out and "[W]" not in out  # Polygraphy's log stays off stdout
    engines = artifact_copy / "engines"
    assert sorted(p.name for p in engines.iterdir()) == [
        "decoder_step.plan",
        "encoder.plan",
        "engines.json",
        "timing.cache",
    ]
    assert not [p.name for p in artifact_copy.iterdir() if p.name.startswith(".")]  # no work directories left
    typed = open_artifact(artifact_copy).manifest  # every hash checks out, engines included
    m = typed.to_dict()
    assert m["engines"]["files"] == {"encoder": "engines/encoder.plan", "decoder_step": "engines/decoder_step.plan"}
    assert m["engines"]["precision"] == "fp32" and m["engines"]["tensorrt"] == TRT11
    assert {"engines/encoder.plan", "engines/decoder_step.plan", "engines/engines.json"} <= set(m["files"])
    assert "engines/timing.cache" not in m["files"]  # a build aid, not part of the artifact
    meta = json.loads((engines / "engines.json").read_text())["engines"]
    assert meta["decoder_step"]["profile"]["tokens"] == {"min": [1, 1], "opt": [3, 1], "max": [6, 1]}
    for g in ("encoder", "decoder_step"):
        check_engine_compat(meta[g], graph_source_digest(typed, g), TRT11, *GPU)


def test_the_timing_cache_is_reused_by_the_same_tensorrt_on_the_same_gpu(artifact_copy, trt11, monkeypatch, capsys):
    import deltalm.export.engines as engines

    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    assert not plan_of(artifact_copy, "encoder")["timing_cache_hit"]
    cache = json.loads((artifact_copy / "engines" / "timing.cache").read_bytes())
    assert len(cache["entries"]) == 2  # one per graph
    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    assert (
        plan_of(artifact_copy, "encoder")["timing_cache_hit"]
        and plan_of(artifact_copy, "decoder_step")["timing_cache_hit"]
    )
    monkeypatch.setattr(engines, "gpu_identity", lambda: ("NVIDIA A100-SXM4-80GB", "8.0"))
    capsys.readouterr()
    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    assert "it was written by TensorRT 11.4.0.106 on NVIDIA H200" in capsys.readouterr().err
    assert not plan_of(artifact_copy, "encoder")["timing_cache_hit"]


@pytest.mark.parametrize(
    "version, message",
    [
        ("10.11.0.33", "TensorRT 10.11.0.33 is too old: deltalm needs TensorRT 10.12 or newer"),
        ("8.6.1", "TensorRT 8.6.1 is too old: deltalm needs TensorRT 10.12 or newer"),
        (
            "12.0.0.1",
            "TensorRT 12.0.0.1 is not supported yet: deltalm is written for TensorRT 10.12 or newer (up to 11.x)",
        ),
    ],
)
def test_unsupported_tensorrt_is_refused_in_one_line(artifact_copy, monkeypatch, capsys, version, message):
    from deltalm.backends.trt import import_tensorrt

    install(monkeypatch, version)
    assert main(["engines", str(artifact_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltalm: error: " + message) and "no engines were built" in err[0]
    assert not (artifact_copy / "engines").exists()
    with pytest.raises(DeltaLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_tensorrt()


def test_a_failed_build_leaves_the_previous_engines(artifact_copy, trt11, monkeypatch, capsys):
    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    before = (artifact_copy / MANIFEST).read_text()
    encoder_plan = (artifact_copy / "engines" / "encoder.plan").read_bytes()
    build = trt11.Builder.build_serialized_network

    def broken(self, network, config):
        return None if network.onnx_path.endswith("decoder_step.onnx") else build(self, network, config)

    monkeypatch.setattr(trt11.Builder, "build_serialized_network", broken)
    capsys.readouterr()
    assert main(["engines", str(artifact_copy), "--max-batch", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deltalm: error: ") and "decoder_step.onnx: the TensorRT build failed" in err
    assert (artifact_copy / MANIFEST).read_text() == before
    assert (artifact_copy / "engines" / "encoder.plan").read_bytes() == encoder_plan
    open_artifact(artifact_copy)


def test_an_input_of_another_type_than_declared_is_refused(artifact_copy, trt11):
    from deltalm.export.engines import build_engines

    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    for t in manifest["graphs"]["decoder_step"]["spec"]["inputs"]:
        if t["name"] == "cache_key_0":
            t["dtype"] = "float16"
    write_json_atomic(artifact_copy / MANIFEST, manifest)
    with pytest.raises(ExportError, match="TensorRT parsed input cache_key_0 as FLOAT, the artifact declares float16"):
        build_engines(artifact_copy, max_batch=2, max_beam=2, max_src_len=8, max_tgt_len=8)


# -- precision is the artifact's -------------------------------------------------------------


def test_an_fp32_artifact_asked_for_fp16_engines_says_to_export_fp16_first(artifact_dir, capsys):
    assert main(["engines", str(artifact_dir), "--precision", "fp16", "--print-only"]) == 2
    assert capsys.readouterr().err.strip() == (
        "deltalm: error: this artifact is fp32, and engines are built in the precision of its ONNX graphs "
        "(strongly typed): export fp16 first (`deltalm export CKPT --precision fp16 --out DIR`) and build the "
        "engines from that artifact"
    )


def test_bf16_engines_are_refused_with_the_reason(artifact_dir, capsys):
    assert main(["engines", str(artifact_dir), "--precision", "bf16", "--print-only"]) == 2
    err = capsys.readouterr().err
    assert "bf16 engines are not built" in err and "no bf16 MatMul / Add kernels" in err


def test_onnx_runtime_cpu_has_no_bf16_matmul():
    """Why there are no bf16 engines: a bf16 export could not be parity-checked here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])
    model = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# -- the backend over the stand-in engines ---------------------------------------------------


@pytest.fixture
def trt_and_ort(artifact_copy, trt, capsys):
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend

    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    backend = TrtBackend.from_artifact(artifact_copy)
    yield backend, OrtBackend.from_artifact(artifact_copy)
    backend.close()
    assert_no_removed_api(trt)  # the runtime touched no removed name either


def sources(cfg, lengths, seed=0):
    from deltalm.export.parity import make_sources

    return make_sources(cfg, lengths, np.random.default_rng(seed))


def same_hypotheses(got, want):
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
    np.testing.assert_allclose([h.score for hs in got for h in hs], [h.score for hs in want for h in hs], atol=1e-5)


@pytest.mark.parametrize("beam", [1, 4])
def test_trt_backend_searches_exactly_like_the_ort_backend(trt_and_ort, beam):
    from deltalm.search import generate

    trt, ort = trt_and_ort
    src = sources(ort.cfg, (5, 9, 3))
    opts = TranslateOptions(beam=beam, nbest=beam, max_len_b=10)
    same_hypotheses(generate(trt, src, opts), generate(ort, src, opts))


def test_trt_backend_with_sentences_joining_mid_batch_gives_the_ort_ids(trt_and_ort):
    """The search engine with sentences arriving while others decode (each arrival encoded on its
    own, so an earlier encode's K/V must survive a later one), two lanes (beams 2 and 1), sentences
    finishing at different steps: the same events from both backends."""
    from deltalm.search import Engine, Finished, Sentence

    trt, ort = trt_and_ort
    cfg = ort.cfg
    srcs = [tuple(int(t) for t in row if t != cfg.pad) for row in sources(cfg, (5, 9, 3, 7, 12, 4), seed=7)]
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4], 5: [5]}  # engine step -> sentences
    options = [
        TranslateOptions(beam=2, nbest=2, max_len_b=6 + k, min_len=k % 3)
        if k % 2 == 0
        else TranslateOptions(beam=1, max_len_b=4 + k)
        for k in range(6)
    ]

    def run(backend):
        engine, finished, order, step = Engine(backend), {}, [], 0
        while step in arrivals or step < max(arrivals) or not engine.idle:
            for k in arrivals.get(step, []):
                engine.add(k, Sentence(srcs[k], options[k]))
            for event in engine.step():
                if isinstance(event, Finished):
                    finished[event.key] = event.hypotheses
                    order.append((step, event.key))
            step += 1
        return finished, order

    (got, got_order), (want, want_order) = run(trt), run(ort)
    assert sorted(got) == list(range(6)) and got_order == want_order
    same_hypotheses([got[k] for k in range(6)], [want[k] for k in range(6)])


def test_trt_backend_step_outputs_equal_ort_as_rows_move_and_sentences_leave(trt_and_ort):
    from deltalm.batch import DecoderBatch
    from deltalm.search import StepRules

    trt, ort = trt_and_ort
    cfg = ort.cfg
    src = sources(cfg, (6, 2, 8), seed=3)
    group, rng = 2, np.random.default_rng(4)
    batches = {}
    for name, backend in (("trt", trt), ("ort", ort)):
        encoded = backend.encode(src)
        batches[name] = DecoderBatch(cfg, backend.float_dtype, group)
        batches[name].admit(encoded.cross, encoded.padding, np.arange(3))
    plan = [None, rng.integers(0, 6, 6), np.array([True, False, True]), rng.integers(0, 4, 4), np.array([False, True])]
    for step, change in enumerate(plan):
        for batch in batches.values():  # the same beam reorder or retirement on both sides
            if change is not None and change.dtype == bool:
                batch.retire(change)
            elif change is not None:
                batch.reorder(change)
        rows = batches["trt"].rows
        tokens = rng.integers(4, cfg.vocab_size, (rows, 1))
        positions = np.full(rows, step)
        rules = StepRules(
            np.where(rng.random(rows) < 0.3, 5, -1),
            rng.random(rows) < 0.5,
            np.zeros(rows, bool),
            np.full(rows, 0.5, np.float32),
        )
        score_ids = rng.integers(0, cfg.vocab_size, (rows, 1, 3))
        outs = {}
        for name, backend in (("trt", trt), ("ort", ort)):
            batch = batches[name]
            batch.fit_positions(step + 1)
            outs[name] = backend.run_step(
                batch.feeds(
                    backend.step_spec, tokens, positions, rules, score_ids=score_ids, want_log_probs=step % 2 == 1
                )
            )
            batch.write(outs[name].new_kv, positions)
        a, b = outs["trt"], outs["ort"]
        assert a.log_probs.shape == (rows, 1, cfg.vocab_size if step % 2 else 0) and a.log_probs.dtype == np.float32
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        for x, y in [
            (a.topk_scores, b.topk_scores),
            (a.token_scores, b.token_scores),
            (a.log_probs, b.log_probs),
            *zip(a.new_kv, b.new_kv),
        ]:
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=1e-5)
    assert batches["trt"].sents == 1


def test_trt_backend_cuts_capacities_beyond_the_profile_and_still_searches_like_ort(trt_and_ort):
    """A 17-token source (the search's width: 32) and a 20-token target (its cache at the last
    step: 32 positions) in engines built for 20 of each: only the part in use goes to the device."""
    from deltalm.search import generate

    trt, ort = trt_and_ort
    src = sources(ort.cfg, (17, 3), seed=2)
    opts = TranslateOptions(beam=2, nbest=2, min_len=20, max_len_b=20)
    same_hypotheses(generate(trt, src, opts), generate(ort, src, opts))
    assert all(len(hs[0].tokens) == 21 for hs in generate(trt, src, opts))  # 20 tokens and </s>
    shapes = trt.step_engine.context.shapes  # those of the last step
    assert shapes["cache_key_0"] == (4, 4, 20, 16) and shapes["cross_value_1"] == (2, 4, 17, 16)


def test_trt_backend_copies_each_feed_once_and_the_outputs_for_their_shapes(trt_and_ort):
    from deltalm.batch import DecoderBatch
    from deltalm.search import StepRules

    trt, _ = trt_and_ort
    cfg, k = trt.cfg, trt.topk
    encoded = trt.encode(sources(cfg, (4, 4)))
    batch = DecoderBatch(cfg, trt.float_dtype, 4)
    batch.admit(encoded.cross, encoded.padding, np.arange(2))
    batch.fit_positions(3)
    rules = StepRules(np.full(8, -1), np.zeros(8, bool), np.zeros(8, bool), np.zeros(8, np.float32))
    for want, vocab in ((False, 0), (True, cfg.vocab_size)):
        feeds = batch.feeds(trt.step_spec, np.full((8, 1), 5), np.full(8, 2), rules, want_log_probs=want)
        FakeCuda.copies.clear()
        trt.run_step(feeds)
        to_device = [n for kind, n in FakeCuda.copies if kind == FakeCuda.MemcpyKind.HostToDevice]
        back = [n for kind, n in FakeCuda.copies if kind == FakeCuda.MemcpyKind.DeviceToHost]
        assert to_device == [a.nbytes for a in feeds.values()]  # the caches (16 positions) included
        kv = 8 * cfg.heads * 1 * cfg.head_dim * 4
        assert back == [8 * k * 4, 8 * k * 8, 8 * 4] + ([8 * vocab * 4] if vocab else []) + [kv] * 4


def test_trt_backend_allocates_device_memory_once(trt_and_ort):
    from deltalm.backends.trt import device_allocations
    from deltalm.search import generate

    trt, _ = trt_and_ort
    made = FakeCuda.allocations
    assert len(trt._memory) == len(device_allocations(trt.encoder.plan, trt.step_engine.plan, trt.cfg.decoder_layers))
    generate(trt, sources(trt.cfg, (5, 9, 3)), TranslateOptions(beam=4, max_len_b=8))
    generate(trt, sources(trt.cfg, (2,)), TranslateOptions(beam=1, sampling=True, seed=1, max_len_b=8))  # log-probs
    assert FakeCuda.allocations == made


def test_trt_backend_refuses_shapes_outside_the_profile(trt_and_ort):
    from deltalm.search import generate

    trt, _ = trt_and_ort
    with pytest.raises(InputError, match="a batch of 4 sentences exceeds the engine profile maximum 3"):
        trt.encode(sources(trt.cfg, (2, 2, 2, 2)))
    with pytest.raises(InputError, match="a source of 21 tokens exceeds the engine profile maximum 20"):
        trt.encode(sources(trt.cfg, (21,)))
    # more rows than the profile allows are never asked for: the search admits what fits (2 x 5 of
    # 12 rows), then the third sentence
    assert trt.limits.rows == 12 and trt.limits.sentences == 3
    assert len(generate(trt, sources(trt.cfg, (3, 3, 3)), TranslateOptions(beam=5, max_len_b=8))) == 3
    with pytest.raises(
        InputError,
        match="target length 21 exceeds the engine profile maximum 20; "
        r"rebuild engines with --max-tgt-len \(or translate with a smaller --max-len-b\)",
    ):
        generate(trt, sources(trt.cfg, (3,)), TranslateOptions(beam=1, max_len_b=30, min_len=25))
    assert trt.max_target_len == 20


def test_trt_backend_refuses_a_format_1_artifact(trt_and_ort, artifact_copy):
    from deltalm.backends.trt import TrtBackend

    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    manifest["format_version"] = 1
    write_json_atomic(artifact_copy / MANIFEST, manifest)
    with pytest.raises(
        ArtifactError,
        match=r"was exported by an older deltalm \(artifact format 1\); this version "
        "decodes format 2",
    ):
        TrtBackend.from_artifact(artifact_copy)


def test_trt_backend_refuses_engines_of_another_onnx_export_or_tensorrt(trt_and_ort, artifact_copy, monkeypatch):
    from deltalm.artifact import Artifact
    from deltalm.backends.trt import TrtBackend

    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    other = json.loads(json.dumps(manifest))
    other["files"]["decoder_step.onnx"] = "0" * 64  # as if the graph had been re-exported
    with pytest.raises(
        ArtifactError, match="engine engines/decoder_step.plan: it was built from another decoder_step.onnx"
    ):
        TrtBackend(Artifact(artifact_copy, Manifest.from_dict(other)))
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "11.5.0.1")
    with pytest.raises(ArtifactError, match=r"built with TensorRT 1\d\.\d+\.0\.\d+, this is TensorRT 11\.5\.0\.1"):
        TrtBackend(Artifact(artifact_copy, Manifest.from_dict(manifest)))


def test_an_input_tensorrt_computes_shapes_from_is_read_from_host_memory(artifact_copy, trt11, capsys):
    """If TensorRT slices the log-probs by the value of want_log_probs, that input is a shape tensor:
    the build gives it a value range, the backend binds it from the host (the stand-in refuses a
    device address for it), and log_probs' shape is then no longer data-dependent."""
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend
    from deltalm.search import generate

    trt11.shape_tensor_inputs = {"want_log_probs"}
    assert main(["engines", str(artifact_copy), *SMALL]) == 0
    plan = plan_of(artifact_copy, "decoder_step")
    assert plan["shape_inputs"] == ["want_log_probs"] and plan["data_dependent"] == []
    trt, ort = TrtBackend.from_artifact(artifact_copy), OrtBackend.from_artifact(artifact_copy)
    assert trt.step_engine.host_inputs == {"want_log_probs"}
    steps = compare_steps(ort, trt, sources(ort.cfg, (5, 9)), steps=4)  # with the log-probs
    assert steps["top1_agreement"] == 1.0 and steps["log_probs_max_abs"] < 1e-5
    src = sources(ort.cfg, (5, 9, 3))
    opts = TranslateOptions(beam=2, nbest=2, max_len_b=8)
    same_hypotheses(generate(trt, src, opts), generate(ort, src, opts))


def test_the_standin_catches_a_tensor_bound_on_the_wrong_side_or_without_an_allocator(trt_and_ort, monkeypatch):
    """What the stand-in checks (as TensorRT requires) does fail a backend that gets it wrong."""
    from deltalm.search import generate

    trt, _ = trt_and_ort
    src, opts = sources(trt.cfg, (4,)), TranslateOptions(beam=1, max_len_b=3)
    monkeypatch.setattr(trt.step_engine, "host_inputs", {"positions"})  # an execution tensor from the host
    with pytest.raises(DeltaLMError, match="positions is bound to 8 bytes outside device memory"):
        generate(trt, src, opts)
    monkeypatch.setattr(trt.step_engine, "host_inputs", set())
    trt.step_engine.context.allocators.clear()  # log_probs, data-dependent, at a plain address
    monkeypatch.setattr(trt, "_allocated", [])
    with pytest.raises(DeltaLMError, match="output log_probs has a data-dependent shape: it needs an IOutputAllocator"):
        generate(trt, src, opts)


def test_a_shape_tensor_input_of_unknown_range_is_refused_at_build(artifact_copy, trt11):
    from deltalm.export.engines import build_engines

    trt11.shape_tensor_inputs = {"positions"}
    with pytest.raises(
        ExportError,
        match=r"TensorRT computes shapes from input positions \(INT64 \[-1\]\), whose "
        "value range deltalm does not know",
    ):
        build_engines(artifact_copy, max_batch=2, max_beam=2, max_src_len=8, max_tgt_len=8)


# -- fp16: the export's own verdict, then engines from it ------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A random tiny DeltaLM checkpoint (and its PyTorch model) exported by `deltalm export
    --precision fp16`, which runs its own parity verdict against PyTorch and exits 0 only if it
    holds."""
    import checkpoint_writers as W

    from deltalm.config import ModelConfig
    from deltalm.export.model import DeltaLM
    from deltalm.export.toy_data import build_toy_tokenizer
    from deltalm.tokenizer import Dictionary

    work = tmp_path_factory.mktemp("fp16")
    spm, dct = build_toy_tokenizer(work)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=len(Dictionary.load(dct)))
    model = W.randomize(DeltaLM(cfg), seed=3)
    ckpt = W.write_fairseq_deltalm(model, work / "checkpoint_best.pt")
    assert (
        main(
            [
                "export",
                str(ckpt),
                "--spm",
                str(spm),
                "--dict",
                str(dct),
                "--out",
                str(work / "fp16"),
                "--precision",
                "fp16",
            ]
        )
        == 0
    )
    return {"fp16": work / "fp16", "model": model}


def test_the_fp16_export_passes_its_parity_verdict(exports):
    from deltalm.backends.ort import OrtBackend

    parity = json.loads((exports["fp16"] / "parity.json").read_text())
    assert parity["precision"] == "fp16" and parity["passed"] is True and parity["failures"] == []
    # the same verdict, recomputed: the fp16 graphs on ONNX Runtime CPU against the PyTorch model
    from deltalm.export.torch_backend import TorchBackend

    half = OrtBackend.from_artifact(exports["fp16"])
    ref = TorchBackend(exports["model"], topk=half.topk)
    src = sources(ref.cfg, (7, 3, 12, 5), seed=5)
    limits = Thresholds.for_precision("fp16")
    steps = compare_steps(ref, half, src, steps=8)
    rows = compare_translations(ref, half, [src], beams=(1, 5), max_len_b=12)
    assert limits.failures("steps", steps) == [] and steps["top1_agreement"] >= 0.9
    assert all(limits.failures(f"beam {r['beam']}", r) == [] for r in rows)


def test_the_fp16_graphs_keep_their_fp32_islands(exports):
    """The precision decisions TensorRT now takes from the graph: LayerNorm, Softmax, TopK and the
    output head's log-sum-exp read float32, the caches and their new entries are float16."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(exports["fp16"] / "decoder_step.onnx")))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    kinds = ("LayerNormalization", "Softmax", "TopK", "ReduceMax", "Exp", "ReduceSum", "Log")
    islands = [n for n in g.node if n.op_type in kinds]
    assert {n.op_type for n in islands} == set(kinds)
    assert {types[n.input[0]] for n in islands} == {onnx.TensorProto.FLOAT}
    assert types["cache_key_0"] == types["new_key_0"] == onnx.TensorProto.FLOAT16


def test_fp16_engines_are_built_from_the_fp16_export_and_translate_like_it(exports, tmp_path, trt, capsys):
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend
    from deltalm.search import generate

    art = tmp_path / "fp16"
    shutil.copytree(exports["fp16"], art)
    assert main(["engines", str(art), "--precision", "fp16", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "(fp16, strongly typed; LayerNorm, Softmax, TopK and the output head in fp32, as exported)" in out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("trtexec ")]
    assert all("--stronglyTyped" in c and "--fp16" not in c and "Precision" not in c for c in commands)
    assert json.loads((art / "engines" / "engines.json").read_text())["precision"] == "fp16"
    backend = TrtBackend.from_artifact(art)
    assert backend.step_engine.dtypes["cache_key_0"] == np.float16  # the engine's I/O is the graph's
    assert backend.float_dtype == np.float16
    ort = OrtBackend.from_artifact(art)
    src = sources(ort.cfg, (5, 9, 3), seed=1)
    for beam in (1, 4):
        opts = TranslateOptions(beam=beam, max_len_b=10)
        assert [h[0].tokens for h in generate(backend, src, opts)] == [h[0].tokens for h in generate(ort, src, opts)]
    assert_no_removed_api(trt)


# -- the GPU check: the one comparator, and a CPU-only machine -------------------------------


def test_gpu_check_holds_trt_engines_to_the_device_thresholds(trt_and_ort):
    from deltalm.export.gpu_check import parity

    trt, ort = trt_and_ort
    batches = [sources(ort.cfg, (5, 9)), sources(ort.cfg, (3,), seed=2), sources(ort.cfg, (2, 7), seed=1)]
    result = parity(ort, trt, batches, "fp32", max_len_b=10)  # beam 5 x 2 sentences fit the profile
    assert result["failures"] == []
    assert result["steps"]["top1_agreement"] == 1.0 and result["steps"]["log_probs_max_abs"] < 1e-5
    assert [(r["beam"], r["sentences"], r["identical_ids"]) for r in result["translations"]] == [
        (1, 5, 1.0),
        (5, 5, 1.0),
    ]


def test_gpu_check_times_the_trt_step_over_the_backend_contract(trt_and_ort, monkeypatch):
    import deltalm.export.gpu_check as gpu_check

    trt, _ = trt_and_ort
    monkeypatch.setattr(gpu_check, "WARMUP", 1)
    monkeypatch.setattr(gpu_check, "RUNS", 2)
    monkeypatch.setattr(gpu_check, "POSITION", 8)  # within the small profile (20 positions)
    monkeypatch.setattr(gpu_check, "SRC_LEN", 12)
    FakeCuda.copies.clear()
    result = gpu_check.step_latency(trt, 3, 4)
    assert result["runs"] == 2 and result["median_ms"] > 0 and result["cache_positions"] == 16
    cache_bytes = 12 * trt.cfg.heads * 16 * trt.cfg.head_dim * 4
    to_device = [n for kind, n in FakeCuda.copies if kind == FakeCuda.MemcpyKind.HostToDevice]
    assert to_device.count(cache_bytes) == 3 * 2 * trt.cfg.decoder_layers  # every run copies the caches


class Shifted:
    """A backend whose log-probs are all ``shift`` higher: same choices, another max abs."""

    def __init__(self, backend, shift):
        self.backend, self.shift = backend, shift
        self.cfg, self.topk, self.step_spec, self.float_dtype = (
            backend.cfg,
            backend.topk,
            backend.step_spec,
            backend.float_dtype,
        )
        self.limits = backend.limits

    def encode(self, src):
        return self.backend.encode(src)

    def run_step(self, feeds):
        out = self.backend.run_step(feeds)
        out.log_probs = out.log_probs + self.shift
        return out

    def close(self):
        pass


def test_gpu_check_names_the_threshold_a_device_misses(artifact_dir):
    from deltalm.backends.ort import OrtBackend
    from deltalm.export.gpu_check import parity

    ort = OrtBackend.from_artifact(artifact_dir)
    result = parity(
        ort,
        Shifted(OrtBackend.from_artifact(artifact_dir), 0.01),
        [sources(ort.cfg, (4, 6))],
        "fp32",
        translations=False,
    )
    assert result["failures"] == ["teacher-forced steps: max abs error 1.00e-02 > 1e-03"]
    assert parity(ort, Shifted(ort, 0.01), [sources(ort.cfg, (4, 6))], "fp16", translations=False)["failures"] == []


def test_gpu_check_on_a_machine_without_a_gpu_reports_it_and_exits_0(tmp_path):
    import subprocess

    from deltalm.export.gpu_check import detect_gpu

    if detect_gpu() is not None:
        pytest.skip("this machine has a GPU")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GPU_CHECK_")}
    out = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh")],
        env={**env, "OUT": str(tmp_path / "r")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "no GPU found: GPU checks skipped"
    report = json.loads((tmp_path / "r" / "gpu_report.json").read_text())
    assert report["gpu"] is None and report["status"] == "skipped (no GPU)"
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert (tmp_path / "r" / "gpu_report.md").read_text().startswith("# GPU check: skipped (no GPU)")


def test_building_without_polygraphy_says_so_in_one_line(artifact_copy, trt11, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "polygraphy" or n.startswith("polygraphy.")] + ["polygraphy"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert main(["engines", str(artifact_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "builds through Polygraphy, which is not installed" in err[0]
    assert "no engines were built" in err[0] and not (artifact_copy / "engines").exists()
