"""``deltalm engines`` and the TensorRT backend: profiles, profile overrides, trtexec command lines,
buffer plans, engine compatibility and profile checks are pure logic and tested here without
TensorRT. The build and the backend run against a stand-in TensorRT in ``test_trt_standin.py``;
on a real GPU with TensorRT, the last test here (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from deltalm.artifact import open_artifact
from deltalm.backends.trt import (
    check_engine_compat,
    check_within_profile,
    device_allocations,
    feed_axes,
    fit_to_profile,
    graph_source_digest,
    numpy_dtype,
    plan_buffers,
    profile_axes,
    vocabulary_axis,
)
from deltalm.cli import main
from deltalm.config import ModelConfig
from deltalm.errors import ArtifactError, InputError
from deltalm.export.engines import (
    apply_profile_override,
    derive_profiles,
    engine_metadata,
    engine_precision,
    load_profile_override,
    trtexec_command,
)
from deltalm.graphs import decoder_step_spec, encoder_spec

ROOT = Path(__file__).resolve().parent.parent
H, HD = 4, 16  # tiny: 4 heads of 16


def profiles_for(cfg, **limits):
    return derive_profiles(cfg, **({"max_batch": 8, "max_beam": 5, "max_src_len": 256, "max_tgt_len": 256} | limits))


# -- profile derivation ----------------------------------------------------------------------


def test_profiles_cover_every_input_of_the_real_specs(tiny_cfg):
    p = profiles_for(tiny_cfg)
    assert list(p) == ["encoder", "decoder_step"]
    assert list(p["encoder"]) == encoder_spec(tiny_cfg).input_names
    assert list(p["decoder_step"]) == decoder_step_spec(tiny_cfg).input_names


def test_encoder_profile_is_batch_by_src_len(tiny_cfg):
    assert profiles_for(tiny_cfg)["encoder"]["src_tokens"] == ((1, 1), (4, 64), (8, 256))


def test_step_rows_are_batch_times_beam(tiny_cfg):
    step = profiles_for(tiny_cfg, max_batch=8, max_beam=5)["decoder_step"]
    assert step["tokens"] == ((1, 1), (20, 1), (40, 1))
    for name in ("positions", "forced_tokens", "ban_eos", "only_eos", "unk_penalty"):
        assert step[name] == ((1,), (20,), (40,))


def test_cache_len_minimum_is_zero_and_maximum_the_longest_target(tiny_cfg):
    step = profiles_for(tiny_cfg, max_tgt_len=100)["decoder_step"]
    assert step["cache_key_0"] == ((1, H, 0, HD), (20, H, 25, HD), (40, H, 100, HD))
    assert step["cache_value_1"] == step["cache_key_0"]


def test_cross_kv_and_padding_follow_the_sentences_of_the_step(tiny_cfg):
    step = profiles_for(tiny_cfg, max_batch=6, max_src_len=128)["decoder_step"]
    assert step["cross_key_0"] == ((1, H, 1, HD), (3, H, 32, HD), (6, H, 128, HD))
    assert step["src_padding"] == ((1, 1), (3, 32), (6, 128))


def test_one_token_per_row_and_a_few_scored_ids(tiny_cfg):
    step = profiles_for(tiny_cfg)["decoder_step"]
    assert [shape[1] for shape in step["tokens"]] == [1, 1, 1]  # scoring whole targets: ort
    assert step["score_ids"] == ((1, 1, 1), (20, 1, 1), (40, 1, 64))


def test_the_scalar_input_has_empty_shapes(tiny_cfg):
    step = profiles_for(tiny_cfg)["decoder_step"]
    assert [n for n, (lo, _, _) in step.items() if lo == ()] == ["want_log_probs"]
    assert step["want_log_probs"] == ((), (), ())


def test_batch_of_one_has_opt_one(tiny_cfg):
    assert profiles_for(tiny_cfg, max_batch=1, max_beam=1)["decoder_step"]["positions"] == ((1,), (1,), (1,))


def test_profiles_from_a_manifest_equal_those_from_its_config(artifact_dir):
    manifest = open_artifact(artifact_dir).manifest
    assert derive_profiles(manifest, 4, 2, 64, 32) == derive_profiles(manifest.model, 4, 2, 64, 32)


def test_encoder_only_models_get_an_encoder_profile_only():
    cfg = ModelConfig(kind="xlmr", embed_dim=8, ffn_dim=8, encoder_layers=1, decoder_layers=0, heads=2, vocab_size=50)
    assert list(derive_profiles(cfg, 2, 1, 16, 8)) == ["encoder"]


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_batch": 0}, "--max-batch must be an integer >= 1, got 0"),
        ({"max_beam": -1}, "--max-beam must be an integer >= 1"),
        ({"max_src_len": 513}, "--max-src-len 513 exceeds the model's max_positions 512"),
        ({"max_tgt_len": 512}, "--max-tgt-len 512 must be < the model's max_positions 512"),
    ],
)
def test_nonsense_limits_are_refused(tiny_cfg, limits, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        profiles_for(tiny_cfg, **limits)


def test_longest_target_is_max_positions_minus_one(tiny_cfg):
    step = profiles_for(tiny_cfg, max_tgt_len=511)["decoder_step"]
    assert step["cache_key_0"][2][2] == 511


# -- --profile overrides ---------------------------------------------------------------------


def test_override_replaces_only_the_given_inputs(tiny_cfg):
    base = profiles_for(tiny_cfg)
    wide = {"min": [1, 1, 1], "opt": [20, 1, 4], "max": [40, 1, 128]}
    new = apply_profile_override(base, {"decoder_step": {"score_ids": wide}}, tiny_cfg)
    assert new["decoder_step"]["score_ids"] == ((1, 1, 1), (20, 1, 4), (40, 1, 128))
    assert new["decoder_step"]["tokens"] == base["decoder_step"]["tokens"]
    assert new["encoder"] == base["encoder"]
    assert base["decoder_step"]["score_ids"] == ((1, 1, 1), (20, 1, 1), (40, 1, 64))  # the input is not modified


def test_override_of_every_input_sharing_an_axis_is_accepted(tiny_cfg):
    rows = {"min": [1], "opt": [8], "max": [16]}
    new = apply_profile_override(
        profiles_for(tiny_cfg),
        {
            "decoder_step": {
                "tokens": {"min": [1, 1], "opt": [8, 1], "max": [16, 1]},
                **{name: rows for name in ("positions", "forced_tokens", "ban_eos", "only_eos", "unk_penalty")},
                "score_ids": {"min": [1, 1, 1], "opt": [8, 1, 1], "max": [16, 1, 64]},
                **{
                    f"cache_{kv}_{i}": {"min": [1, H, 0, HD], "opt": [8, H, 64, HD], "max": [16, H, 256, HD]}
                    for kv in ("key", "value")
                    for i in range(2)
                },
            }
        },
        tiny_cfg,
    )
    assert profile_axes(decoder_step_spec(tiny_cfg), new["decoder_step"])["rows"] == (1, 8, 16)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"decoder": {}}, "profile: unknown graph 'decoder' (graphs: encoder, decoder_step)"),
        (
            {"encoder": {"tokens": {"min": [1], "opt": [1], "max": [1]}}},
            "profile: encoder has no input 'tokens' (inputs: src_tokens)",
        ),
        (
            {"encoder": {"src_tokens": {"min": [1, 1], "max": [2, 2]}}},
            'profile: encoder.src_tokens must be {"min": [...], "opt": [...], "max": [...]}',
        ),
        (
            {"encoder": {"src_tokens": {"min": [1], "opt": [1, 1], "max": [2, 2]}}},
            "profile: encoder.src_tokens min has rank 1, the input has rank 2 ['batch', 'src_len']",
        ),
        (
            {"encoder": {"src_tokens": {"min": [1, 1], "opt": [1, "a"], "max": [2, 2]}}},
            "profile: encoder.src_tokens opt must be a list of integers, got [1, 'a']",
        ),
        (
            {"encoder": {"src_tokens": {"min": [1, 8], "opt": [2, 4], "max": [4, 64]}}},
            "profile: encoder.src_tokens needs min <= opt <= max in every dim, got [1, 8] / [2, 4] / [4, 64]",
        ),
        (
            {"encoder": {"src_tokens": {"min": [0, 1], "opt": [1, 1], "max": [1, 1]}}},
            "profile: encoder.src_tokens min dim 0 (batch) must be >= 1, got 0",
        ),
        (
            {"decoder_step": {"cache_key_0": {"min": [1, 8, 0, HD], "opt": [20, 8, 64, HD], "max": [40, 8, 256, HD]}}},
            "profile: decoder_step.cache_key_0 min dim 1 must be 4, got 8",
        ),
        (
            {"decoder_step": {"tokens": {"min": [1, 0], "opt": [4, 1], "max": [48, 1]}}},
            "profile: decoder_step.tokens min dim 1 (new_len) must be >= 1, got 0",
        ),
        (
            {"decoder_step": {"tokens": {"min": [1, 1], "opt": [4, 1], "max": [48, 1]}}},
            "profile: axis 'rows' differs between decoder_step.tokens (1/4/48) and decoder_step.positions (1/20/40)",
        ),
        (
            {"encoder": {"src_tokens": {"min": [1, 1], "opt": [4, 64], "max": [16, 256]}}},
            "profile: encoder allows batch up to 16 but decoder_step sents only up to 8",
        ),
    ],
)
def test_bad_overrides_are_refused_with_the_reason(tiny_cfg, override, message):
    with pytest.raises(InputError) as err:
        apply_profile_override(profiles_for(tiny_cfg), override, tiny_cfg)
    assert str(err.value) == message


def test_override_cannot_pass_the_last_position(tiny_cfg):
    cache = {"min": [1, H, 0, HD], "opt": [20, H, 64, HD], "max": [40, H, 512, HD]}
    override = {"decoder_step": {f"cache_{kv}_{i}": cache for kv in ("key", "value") for i in range(2)}}
    with pytest.raises(InputError, match="cache_len max 512 must be < the model's max_positions 512"):
        apply_profile_override(profiles_for(tiny_cfg), override, tiny_cfg)


def test_profile_file_must_exist_and_be_json(tmp_path):
    with pytest.raises(InputError, match="no such profile file"):
        load_profile_override(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not a JSON profile"):
        load_profile_override(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match="a profile is a JSON object"):
        load_profile_override(tmp_path / "list.json")


# -- trtexec command lines and precision -----------------------------------------------------


def test_trtexec_command_is_strongly_typed_without_precision_flags(tiny_cfg):
    cmd = trtexec_command(
        "a/encoder.onnx", "a/engines/encoder.plan", profiles_for(tiny_cfg)["encoder"], "a/engines/timing.cache"
    )
    assert cmd == (
        "trtexec --onnx=a/encoder.onnx --saveEngine=a/engines/encoder.plan --stronglyTyped "
        "--minShapes=src_tokens:1x1 --optShapes=src_tokens:4x64 --maxShapes=src_tokens:8x256 "
        "--timingCacheFile=a/engines/timing.cache"
    )


def test_trtexec_command_for_the_step_lists_shaped_inputs_only(tiny_cfg):
    cmd = trtexec_command("d.onnx", "d.plan", profiles_for(tiny_cfg, max_tgt_len=64)["decoder_step"], "t.cache")
    min_shapes = next(a for a in cmd.split() if a.startswith("--minShapes="))
    assert min_shapes.startswith("--minShapes=tokens:1x1,positions:1,cache_key_0:1x4x0x16,cache_value_0:1x4x0x16,")
    assert "cross_key_0:1x4x1x16," in min_shapes and min_shapes.endswith(",score_ids:1x1x1")
    assert "want_log_probs" not in cmd  # a scalar needs no shape
    assert "--maxShapes=tokens:40x1," in cmd and "cache_key_0:40x4x64x16" in cmd and "score_ids:40x1x64" in cmd
    assert "--fp16" not in cmd and "--precisionConstraints" not in cmd and "--layerPrecisions" not in cmd


def test_trtexec_command_quotes_paths(tiny_cfg):
    cmd = trtexec_command("my dir/encoder.onnx", "e.plan", profiles_for(tiny_cfg)["encoder"], "t.cache")
    assert "'--onnx=my dir/encoder.onnx'" in cmd


def test_engines_take_the_precision_of_the_artifact():
    assert engine_precision("fp32") == "fp32" and engine_precision("fp16") == "fp16"
    assert engine_precision("fp16", "fp16") == "fp16"
    with pytest.raises(InputError, match="this artifact is fp32, .* export fp16 first"):
        engine_precision("fp32", "fp16")
    with pytest.raises(InputError, match="this artifact is fp16, .* export fp32 first"):
        engine_precision("fp16", "fp32")
    with pytest.raises(InputError, match="int8 artifact holds ONNX Runtime's dynamic quantization"):
        engine_precision("int8")
    with pytest.raises(InputError, match="bf16 engines are not built"):
        engine_precision("fp32", "bf16")
    with pytest.raises(InputError, match="--precision must be one of fp32, fp16"):
        engine_precision("fp32", "int8")


# -- buffer plans ----------------------------------------------------------------------------


def step_plan(cfg, float_dtype="float32", dtypes=None, **limits):
    return plan_buffers(
        decoder_step_spec(cfg, float_dtype=float_dtype),
        profiles_for(cfg, **limits)["decoder_step"],
        dtypes,
        vocabulary_axis(cfg),
    )


def test_plan_buffers_sizes_every_tensor_at_the_profile_maximum(tiny_cfg):
    spec = decoder_step_spec(tiny_cfg)
    plan = step_plan(tiny_cfg)
    assert set(plan) == set(spec.input_names + spec.output_names)
    assert plan["cache_key_0"] == ((40, H, 256, HD), np.dtype("float32"), 40 * H * 256 * HD * 4)
    assert plan["new_value_1"] == ((40, H, 1, HD), np.dtype("float32"), 40 * H * 1 * HD * 4)
    assert plan["cross_key_0"] == ((8, H, 256, HD), np.dtype("float32"), 8 * H * 256 * HD * 4)
    assert plan["log_probs"] == ((40, 1, 97), np.dtype("float32"), 40 * 97 * 4)  # the whole vocabulary
    assert plan["topk_ids"] == ((40, 1, 10), np.dtype("int64"), 3200)
    assert plan["token_scores"] == ((40, 1, 64), np.dtype("float32"), 40 * 64 * 4)
    assert plan["score_ids"] == ((40, 1, 64), np.dtype("int64"), 40 * 64 * 8)
    assert plan["src_padding"] == ((8, 256), np.dtype("bool"), 2048)
    assert plan["positions"] == ((40,), np.dtype("int64"), 320)
    assert plan["want_log_probs"] == ((), np.dtype("bool"), 1)


def test_the_vocabulary_axis_of_log_probs_must_be_bounded(tiny_cfg):
    with pytest.raises(ArtifactError, match="decoder_step.log_probs: the profile does not bound axis 'vocab'"):
        plan_buffers(decoder_step_spec(tiny_cfg), profiles_for(tiny_cfg)["decoder_step"])


def test_plan_buffers_uses_the_engine_dtypes_and_fp16_specs(tiny_cfg):
    assert step_plan(tiny_cfg, dtypes={"topk_ids": "int32"})["topk_ids"][2] == 1600
    half = step_plan(tiny_cfg, "float16")
    assert half["cache_key_0"][1:] == (np.dtype("float16"), 40 * H * 256 * HD * 2)
    assert half["new_key_0"][1] == np.dtype("float16")
    assert half["log_probs"][1] == np.dtype("float32")


def test_device_allocations_give_every_tensor_a_buffer_and_share_cross_kv(tiny_cfg):
    p = profiles_for(tiny_cfg)
    enc = plan_buffers(encoder_spec(tiny_cfg), p["encoder"])
    step = step_plan(tiny_cfg)
    alloc = device_allocations(enc, step, tiny_cfg.decoder_layers)
    assert alloc["encoder:cross_key_0"] == 8 * H * 256 * HD * 4  # written by the encoder, read by the step
    assert not any(k.startswith("decoder_step:cross_") for k in alloc)
    assert alloc["decoder_step:cache_value_1"] == 40 * H * 256 * HD * 4  # one buffer per cache tensor
    assert alloc["decoder_step:new_key_0"] == 40 * H * HD * 4
    assert alloc["decoder_step:log_probs"] == 40 * 97 * 4
    assert alloc["decoder_step:want_log_probs"] == 256  # never less than MIN_ALLOCATION
    assert sum(alloc.values()) == sum(max(b, 256) for _, _, b in enc.values()) + sum(
        max(b, 256) for n, (_, _, b) in step.items() if not n.startswith("cross_")
    )


# -- engine compatibility and profile checks -------------------------------------------------

META = engine_metadata(
    "decoder_step",
    "engines/decoder_step.plan",
    "decoder_step.onnx",
    "ab" * 32,
    "fp16",
    {"tokens": ((1,), (20,), (40,))},
    "10.9.0.34",
    "NVIDIA H100 80GB HBM3",
    "9.0",
)


def test_a_matching_engine_is_accepted():
    check_engine_compat(META, "ab" * 32, "10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0")


def test_an_engine_of_another_onnx_file_is_refused():
    with pytest.raises(ArtifactError) as err:
        check_engine_compat(META, "cd" * 32, "10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0", where="art")
    assert str(err.value) == (
        "engine engines/decoder_step.plan: it was built from another decoder_step.onnx "
        "(sha256 abababababab..., the artifact's is cdcdcdcdcdcd...); "
        "rebuild the engines with `deltalm engines art`"
    )


def test_an_engine_of_another_tensorrt_version_is_refused():
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.9\.0\.34, this is TensorRT 10\.11\.0\.33"):
        check_engine_compat(META, "ab" * 32, "10.11.0.33", "NVIDIA H100 80GB HBM3", "9.0")


def test_an_engine_of_another_compute_capability_is_refused():
    with pytest.raises(
        ArtifactError,
        match=r"built for compute capability 9\.0 \(NVIDIA H100 80GB HBM3\), "
        r"this GPU \(NVIDIA A100-SXM4-80GB\) has 8\.0",
    ):
        check_engine_compat(META, "ab" * 32, "10.9.0.34", "NVIDIA A100-SXM4-80GB", "8.0")


def test_an_engine_of_another_gpu_model_is_refused():
    with pytest.raises(ArtifactError, match="built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H200"):
        check_engine_compat(META, "ab" * 32, "10.9.0.34", "NVIDIA H200", "9.0")


def test_every_mismatch_is_named_at_once():
    with pytest.raises(ArtifactError) as err:
        check_engine_compat(META, "cd" * 32, "10.11.0.33", "NVIDIA A100-SXM4-80GB", "8.0")
    assert str(err.value).count("; ") == 3  # three problems, then the hint


STEP_AXES = {
    "rows": (1, 20, 40),
    "new_len": (1, 1, 1),
    "cache_len": (0, 64, 256),
    "sents": (1, 4, 8),
    "batch": (1, 4, 8),
    "src_len": (1, 64, 256),
    "score_width": (1, 1, 64),
}


def test_shapes_within_the_profile_pass():
    check_within_profile(STEP_AXES, {"rows": 40, "sents": 8, "batch": 8, "src_len": 1, "cache_len": 0, "new_len": 1})


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            {"rows": 48},
            "batch x beam = 48 rows exceeds the engine profile maximum 40; rebuild engines with --max-batch/--max-beam",
        ),
        ({"batch": 9}, "a batch of 9 sentences exceeds the engine profile maximum 8; rebuild engines with --max-batch"),
        ({"sents": 9}, "a batch of 9 sentences exceeds the engine profile maximum 8; rebuild engines with --max-batch"),
        (
            {"src_len": 300},
            "a source of 300 tokens exceeds the engine profile maximum 256; rebuild engines with --max-src-len",
        ),
        (
            {"cache_len": 257},
            "target length 257 exceeds the engine profile maximum 256; rebuild engines with --max-tgt-len",
        ),
        (
            {"new_len": 7},
            "7 tokens fed per row exceeds the engine profile maximum 1; rebuild engines with a --profile "
            "whose tokens allow it (scoring whole targets runs on the ort backend)",
        ),
        (
            {"score_width": 65},
            "65 scored ids per position exceeds the engine profile maximum 64; rebuild engines with a "
            "--profile whose score_ids allow it",
        ),
        ({"rows": 0}, "batch x beam = 0 rows is below the engine profile minimum 1"),
    ],
)
def test_shapes_outside_the_profile_are_input_errors(shapes, message):
    with pytest.raises(InputError) as err:
        check_within_profile(STEP_AXES, shapes)
    assert str(err.value).startswith(message)


def test_axes_the_profile_does_not_bound_are_ignored():
    check_within_profile({"batch": (1, 1, 2)}, {"rows": 10_000, "batch": 2})


def test_profile_axes_are_read_off_every_input(tiny_cfg):
    axes = profile_axes(decoder_step_spec(tiny_cfg), profiles_for(tiny_cfg, max_tgt_len=64)["decoder_step"])
    assert axes == {
        "rows": (1, 20, 40),
        "new_len": (1, 1, 1),
        "cache_len": (0, 16, 64),
        "sents": (1, 4, 8),
        "src_len": (1, 64, 256),
        "score_width": (1, 1, 64),
    }


# -- fitting a step's feeds to the profile ---------------------------------------------------


def step_feeds_for(cfg, rows=4, sents=2, cache_len=32, src_len=32, positions=(3, 3, 17, 17), used_src=(5, 20)):
    """Feeds as the search makes them: capacities in chunks of 16, sources padded on the right of
    their width (``used_src``: each sentence's width)."""
    from deltalm.backends.interface import step_feeds
    from deltalm.graphs import cache_names, cross_names, per_layer

    rng = np.random.default_rng(0)
    spec = decoder_step_spec(cfg)
    padding = np.ones((sents, src_len), dtype=bool)
    for s, width in enumerate(used_src):
        padding[s, :width] = False
    arrays = dict(
        tokens=np.full((rows, 1), 4),
        positions=np.array(positions),
        src_padding=padding,
        forced_tokens=np.full(rows, -1),
        ban_eos=np.zeros(rows, bool),
        only_eos=np.zeros(rows, bool),
        unk_penalty=np.zeros(rows, np.float32),
        score_ids=np.full((rows, 1, 1), 2),
        want_log_probs=np.array(False),
    )
    arrays |= {n: rng.standard_normal((rows, H, cache_len, HD)) for n in per_layer(cfg, cache_names)}
    arrays |= {n: rng.standard_normal((sents, H, src_len, HD)) for n in per_layer(cfg, cross_names)}
    return spec, step_feeds(spec, **arrays)


def test_feeds_within_the_profile_are_bound_as_they_are(tiny_cfg):
    spec, feeds = step_feeds_for(tiny_cfg)
    axes = STEP_AXES | {"cache_len": (0, 8, 32), "src_len": (1, 8, 32)}
    assert feed_axes(spec, feeds) == {
        "rows": 4,
        "new_len": 1,
        "cache_len": 32,
        "sents": 2,
        "src_len": 32,
        "score_width": 1,
    }
    fitted = fit_to_profile(spec, axes, feeds)
    assert fitted is feeds


def test_capacities_beyond_the_profile_are_cut_to_what_the_rows_use(tiny_cfg):
    spec, feeds = step_feeds_for(tiny_cfg)
    fitted = fit_to_profile(spec, STEP_AXES | {"cache_len": (0, 8, 20), "src_len": (1, 8, 24)}, feeds)
    assert fitted["cache_key_1"].shape == (4, H, 17, HD)  # the largest position: 17
    np.testing.assert_array_equal(fitted["cache_key_1"], feeds["cache_key_1"][:, :, :17])
    assert fitted["cross_value_0"].shape == (2, H, 20, HD) and fitted["src_padding"].shape == (2, 20)
    np.testing.assert_array_equal(fitted["src_padding"], feeds["src_padding"][:, :20])
    assert fitted["tokens"] is feeds["tokens"]  # axes that fit are not touched


def test_a_capacity_is_cut_only_as_far_as_the_rows_allow(tiny_cfg):
    spec, feeds = step_feeds_for(tiny_cfg, positions=(3, 3, 21, 21))
    with pytest.raises(
        InputError, match="target length 21 exceeds the engine profile maximum 20; rebuild engines with --max-tgt-len"
    ):
        fit_to_profile(spec, STEP_AXES | {"cache_len": (0, 8, 20)}, feeds)
    spec, feeds = step_feeds_for(tiny_cfg, used_src=(5, 30))
    with pytest.raises(
        InputError,
        match="a source of 30 tokens exceeds the engine profile maximum 24; rebuild engines with --max-src-len",
    ):
        fit_to_profile(spec, STEP_AXES | {"src_len": (1, 8, 24)}, feeds)


def test_the_first_step_reads_an_empty_cache(tiny_cfg):
    spec, feeds = step_feeds_for(tiny_cfg, positions=(0, 0, 0, 0), cache_len=16)
    assert fit_to_profile(spec, STEP_AXES | {"cache_len": (0, 4, 12)}, feeds)["cache_value_0"].shape == (4, H, 0, HD)


def test_source_digest_is_the_onnx_hash_or_covers_external_data():
    def manifest(files: dict):
        return types.SimpleNamespace(graphs={"encoder": types.SimpleNamespace(files=tuple(files))}, files=files)

    assert graph_source_digest(manifest({"encoder.onnx": "11"}), "encoder") == "11"
    split = manifest({"encoder.onnx": "11", "encoder.onnx.data": "22"})
    other = manifest({"encoder.onnx": "11", "encoder.onnx.data": "33"})
    assert graph_source_digest(split, "encoder") != graph_source_digest(other, "encoder")
    assert len(graph_source_digest(split, "encoder")) == 64


def test_engine_dtypes_map_to_numpy():
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert numpy_dtype("INT64") == np.int64 and numpy_dtype("INT32") == np.int32 and numpy_dtype("BOOL") == np.bool_
    with pytest.raises(ArtifactError, match="BF16 is not supported"):
        numpy_dtype("BF16")


# -- the command, without TensorRT -----------------------------------------------------------


def test_modules_import_without_tensorrt():
    code = (
        "import sys; import deltalm.export.engines, deltalm.backends.trt; "
        "print(any(m.split('.')[0] in ('tensorrt', 'polygraphy') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_print_only_prints_the_plan_and_trtexec_commands(artifact_dir, capsys):
    rc = main(
        [
            "engines",
            str(artifact_dir),
            "--print-only",
            "--max-batch",
            "4",
            "--max-beam",
            "2",
            "--max-src-len",
            "64",
            "--max-tgt-len",
            "32",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "decoder_step: rows 1/4/8, new_len 1/1/1, cache_len 0/8/32, sents 1/2/4, src_len 1/16/64, "
        "score_width 1/1/64  (min/opt/max)"
    ) in out
    assert "  cache_key_0     min [1, 4, 0, 16]  opt [4, 4, 8, 16]  max [8, 4, 32, 16]" in out
    assert "device buffers of --backend trt for these profiles (allocated once): " in out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("trtexec ")]
    assert len(commands) == 2
    assert f"--onnx={artifact_dir}/encoder.onnx" in commands[0] and "--maxShapes=src_tokens:4x64" in commands[0]
    assert all("--stronglyTyped" in c and "--fp16" not in c for c in commands)  # the artifact's precision
    assert "TensorRT engines for" in out and "(fp32, strongly typed)" in out
    assert not (artifact_dir / "engines").exists()


def test_print_only_with_a_profile_file(artifact_dir, tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps({"decoder_step": {"score_ids": {"min": [1, 1, 1], "opt": [20, 1, 2], "max": [40, 1, 8]}}})
    )
    assert main(["engines", str(artifact_dir), "--print-only", "--profile", str(path)]) == 0
    assert "  score_ids       min [1, 1, 1]  opt [20, 1, 2]  max [40, 1, 8]" in capsys.readouterr().out


def test_a_bad_profile_file_is_one_line_error(artifact_dir, tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"decoder_step": {"tokens": {"min": [1, 1], "opt": [1, 1], "max": [400, 1]}}}))
    assert main(["engines", str(artifact_dir), "--print-only", "--profile", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "deltalm: error: profile: axis 'rows' differs between decoder_step.tokens (1/1/400) and decoder_step.positions (1/20/40)"
    )


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_building_without_tensorrt_says_so(artifact_dir, capsys):
    assert main(["engines", str(artifact_dir)]) == 2
    captured = capsys.readouterr()
    assert "trtexec --onnx=" in captured.out
    assert (
        "deltalm: error: TensorRT is not installed (no `tensorrt` Python module)" in captured.err
        and "no engines were built" in captured.err
    )
    assert not (artifact_dir / "engines").exists()


def test_trt_backend_needs_engines(artifact_dir):
    from deltalm.backends import load_backend

    with pytest.raises(ArtifactError, match="no TensorRT engines; build them with `deltalm engines"):
        load_backend("trt", artifact_dir, device="cuda", threads=None)


def test_trt_backend_is_cuda_only(artifact_dir):
    from deltalm.backends.trt import TrtBackend

    with pytest.raises(InputError, match="runs on --device cuda only"):
        TrtBackend.from_artifact(artifact_dir, device="cpu")


# -- on a GPU with TensorRT ------------------------------------------------------------------


def _tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("polygraphy") is None:
        return False
    from deltalm.backends.trt import gpu_identity

    try:
        gpu_identity()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs TensorRT 10.12+ or 11.x, Polygraphy and a CUDA GPU")
def test_trt_engines_translate_like_onnx_runtime(artifact_copy):
    from deltalm.backends.ort import OrtBackend
    from deltalm.backends.trt import TrtBackend
    from deltalm.batch import DecoderBatch
    from deltalm.export.parity import make_sources
    from deltalm.options import TranslateOptions
    from deltalm.search import StepRules, generate

    assert (
        main(
            [
                "engines",
                str(artifact_copy),
                "--precision",
                "fp32",
                "--max-batch",
                "3",
                "--max-beam",
                "4",
                "--max-src-len",
                "32",
                "--max-tgt-len",
                "24",
            ]
        )
        == 0
    )
    trt_backend = TrtBackend.from_artifact(artifact_copy)
    ort_backend = OrtBackend.from_artifact(artifact_copy)
    cfg = ort_backend.cfg
    src = make_sources(cfg, (5, 9, 3), np.random.default_rng(0))
    # two steps by hand, the log-probs asked for: every output agrees
    outs = []
    for backend in (trt_backend, ort_backend):
        encoded = backend.encode(src)
        batch = DecoderBatch(cfg, backend.float_dtype, 4)
        batch.admit(encoded.cross, encoded.padding, np.arange(3))
        tokens = np.full((12, 1), cfg.eos)
        rules = StepRules(np.full(12, -1), np.zeros(12, bool), np.zeros(12, bool), np.zeros(12, np.float32))
        for step in range(2):
            batch.fit_positions(step + 1)
            positions = np.full(12, step)
            out = backend.run_step(batch.feeds(backend.step_spec, tokens, positions, rules, want_log_probs=True))
            batch.write(out.new_kv, positions)
            tokens = out.topk_ids[:, :, 0]
        outs.append(out)
    assert np.abs(outs[0].log_probs - outs[1].log_probs).max() < 1e-3
    assert np.array_equal(outs[0].topk_ids[:, :, 0], outs[1].topk_ids[:, :, 0])
    # whole searches: the same tokens
    for beam in (1, 4):
        opts = TranslateOptions(beam=beam, max_len_b=20)
        got, want = generate(trt_backend, src, opts), generate(ort_backend, src, opts)
        assert [h[0].tokens for h in got] == [h[0].tokens for h in want]
    # outside the profile: an input error, not a crash
    with pytest.raises(InputError, match="exceeds the engine profile maximum"):
        generate(trt_backend, make_sources(cfg, (3, 3, 3, 3), np.random.default_rng(1)), TranslateOptions(beam=1))
    trt_backend.close()
