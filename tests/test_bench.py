"""The pure parts of ``deltalm bench``: statistics, cell planning, floors, FLOP / byte counting of
a step graph, profile summaries, tables and targets. No timing is asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from deltalm.bench import children, measure, models, profile, report, step_cost, workloads


def test_time_stats_gives_milliseconds_median_and_p90():
    s = workloads.time_stats([0.001, 0.002, 0.003, 0.004, 0.005])
    assert s["n"] == 5
    assert s["p50_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(4.6)  # linear interpolation between 4 and 5
    assert s["mean_ms"] == pytest.approx(3.0)
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((1.0, 5.0))


def test_time_stats_of_nothing_is_empty():
    assert workloads.time_stats([]) == {"n": 0}


def test_plan_cell_runs_the_full_length_when_it_fits():
    # a run: 0.1 + 51 x 0.01 = 0.61 s; 10 s fits 16 runs, capped at max_reps
    assert workloads.plan_cell(50, 0.1, 0.01, 10.0, max_reps=5) == (50, 5)
    # exactly three runs fit
    assert workloads.plan_cell(50, 0.1, 0.01, 1.83, max_reps=5) == (50, 3)


def test_plan_cell_measures_fewer_steps_when_the_full_length_does_not_fit():
    # a step of 1 s, 60 s for 3 runs: 20 s a run -> 19 steps -> generate 18 tokens
    steps, reps = workloads.plan_cell(50, 0.5, 1.0, 60.0, max_reps=3)
    assert (steps, reps) == (18, 3)
    assert 0.5 + (steps + 1) * 1.0 <= 20.0
    # never fewer than min_steps
    assert workloads.plan_cell(50, 0.5, 100.0, 60.0, max_reps=3) == (4, 3)


def test_forced_length_options_pin_every_hypothesis_to_n_tokens_and_eos(fake_backend):
    backend = fake_backend(vocab=8, topk=10)
    timed = measure.TimedBackend(backend)
    src = np.array([[4, 5, 2], [1, 6, 2]], dtype=np.int64)
    run = measure.generate_timed(timed, src, beam=2, n=5)
    assert len(run["step_s"]) == 6  # 5 tokens and </s>
    assert run["total_s"] >= run["encode_s"] + sum(run["step_s"])
    assert [c[0][0] for c in backend.calls] == list(range(6))  # the position of the first row


def test_make_sources_is_left_padded_deterministic_and_near_the_asked_length():
    a = workloads.make_sources(1000, eos=2, pad=1, batch=32, src_len=30, seed=3)
    b = workloads.make_sources(1000, eos=2, pad=1, batch=32, src_len=30, seed=3)
    np.testing.assert_array_equal(a, b)
    assert (a[:, -1] == 2).all()
    lengths = (a != 1).sum(axis=1)
    assert lengths.min() >= 24 and lengths.max() <= 36 and a.shape[1] == lengths.max()
    for row, n in zip(a, lengths):  # pads only on the left
        assert (row[: a.shape[1] - n] == 1).all() and (row[a.shape[1] - n :] >= 2).all()
    one = workloads.make_sources(1000, eos=2, pad=1, batch=1, src_len=10, seed=0)
    assert one.shape == (1, 10)


def test_write_filler_dictionary_reaches_the_exact_vocabulary(tmp_path):
    from deltalm.tokenizer import Dictionary

    path = tmp_path / "dict.txt"
    path.write_text("▁a 10\n▁b 5\n", encoding="utf-8")
    assert models.write_filler_dictionary(path, 1000) == 996
    d = Dictionary.load(path)
    assert len(d) == 1000
    assert d.symbols[4:6] == ["▁a", "▁b"]


# --- floors ------------------------------------------------------------------------------------


def _base_cfg():
    from deltalm.config import ModelConfig

    return ModelConfig.from_name("deltalm-base")


def test_step_flops_counts_two_per_weight_per_row_plus_attention():
    cfg = _base_cfg()
    # 1 row, no past, no source: Q.K and P.V over the one new key, per layer: 4 x D
    assert step_cost.step_flops(1000, cfg, rows=1, past_len=0, src_len=0) == 2 * 1000 + 6 * 4 * 768
    two = step_cost.step_flops(1000, cfg, rows=2, past_len=9, src_len=20)
    assert two == 2 * 1000 * 2 + 2 * 6 * 4 * 768 * (10 + 20)


def test_step_flops_of_base_at_batch_32_beam_5_matches_the_issue():
    cfg = _base_cfg()
    # the step's matmul weights: 6 decoder layers without cross K/V projections + the output projection
    per_layer = 4 * 768 * 768 + 2 * 2 * 768 * 3072 + 2 * 768 * 768
    weights = 6 * per_layer + 250001 * 768
    flops = step_cost.step_flops(weights, cfg, rows=160, past_len=25, src_len=30)
    assert flops == pytest.approx(86e9, rel=0.02)  # issue 5: "~86 GFLOP"


def test_step_bytes_adds_caches_of_rows_and_cross_kv_of_sentences():
    cfg = _base_cfg()
    assert step_cost.step_bytes(10**9, cfg, rows=5, sents=1, past_len=0, src_len=0, kv_itemsize=4) == 10**9
    kv = step_cost.step_bytes(0, cfg, rows=5, sents=1, past_len=10, src_len=30, kv_itemsize=2)
    assert kv == 6 * 2 * 768 * 2 * (5 * 10 + 1 * 30)


def test_step_floor_is_the_larger_bound():
    f = step_cost.step_floor(flops=100e9, nbytes=1e9, gflops=100.0, gbs=10.0)
    assert f["compute_ms"] == pytest.approx(1000.0) and f["memory_ms"] == pytest.approx(100.0)
    assert (f["floor_ms"], f["bound"]) == (pytest.approx(1000.0), "compute")
    g = step_cost.step_floor(flops=1e9, nbytes=1.08e9, gflops=100.0, gbs=29.0)
    assert g["bound"] == "bandwidth" and g["floor_ms"] == pytest.approx(37.2, rel=0.01)


# --- FLOP / byte counting of ONNX graphs ---------------------------------------------------------


def _graph(nodes, inits):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_step_graph_cost_counts_matmul_weights_and_separates_gathered_tables():
    from onnx import helper

    inits = {
        "w": np.zeros((4, 3), np.float32),  # MatMul weight: read in full
        "w16": np.zeros((4, 5), np.float16),  # behind a Cast: still a MatMul weight
        "pos": np.zeros((10, 4), np.float32),  # only gathered from
        "table": np.zeros((4, 7), np.float32),  # gathered from and multiplied: read in full
        "bias": np.zeros((3,), np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Add", ["a", "bias"], ["b"]),
        helper.make_node("Cast", ["w16"], ["w16f"], to=1),
        helper.make_node("MatMul", ["x", "w16f"], ["c"]),
        helper.make_node("Gather", ["pos", "ids"], ["p"]),
        helper.make_node("Gather", ["table", "ids"], ["t"], axis=1),
        helper.make_node("MatMul", ["x", "table"], ["y"]),
    ]
    cost = step_cost.step_graph_cost(_graph(nodes, inits))
    assert cost.matmul_weights == 12 + 20 + 28
    assert cost.gathered_bytes == 10 * 4 * 4
    assert cost.weight_bytes == 12 * 4 + 20 * 2 + 28 * 4 + 3 * 4
    assert cost.bytes_by_dtype == {"float32": 12 * 4 + 28 * 4 + 3 * 4, "float16": 40}
    assert cost.largest[0][0] == "table"


def test_step_graph_cost_of_an_exported_tiny_step_graph(tmp_path, tiny_model):
    import onnx
    import torch

    from deltalm.export.onnx_export import export_graphs

    export_graphs(tiny_model, tmp_path, "fp32", topk=10)
    cost = step_cost.step_graph_cost(onnx.load(str(tmp_path / "decoder_step.onnx")))
    cfg = tiny_model.cfg
    # every decoder Linear except the cross-attention K/V projections (those run in the encoder
    # graph), plus the tied output projection
    linear = sum(
        m.weight.numel()
        for name, m in tiny_model.decoder.layers.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj"))
    )
    assert cost.matmul_weights == linear + cfg.vocab_size * cfg.embed_dim
    # the position table and the token table are gathered from (the token table's bytes are also
    # the output projection's, under a name of its own: counted there as a weight, once)
    assert cost.gathered_bytes == (cfg.position_rows + cfg.vocab_size) * cfg.embed_dim * 4
    step_params = sum(
        p.numel()
        for name, p in tiny_model.decoder.named_parameters()
        if "encoder_attn.k_proj" not in name and "encoder_attn.v_proj" not in name and "embed_positions" not in name
    )
    assert step_params * 4 <= cost.weight_bytes <= step_params * 4 + 64 * cfg.vocab_size + 4096


# --- profile summaries ---------------------------------------------------------------------------


def test_summarize_profile_skips_warm_up_runs_and_ranks_op_types():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        run(0, 100),
        node("mm0", "MatMul", 10, 80),  # warm-up run: skipped
        run(200, 100),
        node("mm0", "MatMul", 210, 60),
        node("ls", "LogSoftmax", 280, 20),
        run(400, 100),
        node("mm0", "MatMul", 410, 40),
        node("ls", "LogSoftmax", 460, 40),
        {"cat": "Session", "name": "model_loading_uri", "ts": 0, "dur": 5000},
    ]
    s = profile.summarize_profile(events, skip_runs=1)
    assert s["runs"] == 2
    assert s["run_ms_per_step"] == pytest.approx(0.1)
    assert s["node_ms_per_step"] == pytest.approx(0.08)
    assert [o["op"] for o in s["top_ops"]] == ["MatMul", "LogSoftmax"]
    assert s["top_ops"][0]["share"] == pytest.approx(100 / 160)
    assert s["top_ops"][0]["nodes_per_step"] == pytest.approx(1.0)
    assert s["top_nodes"][0] == {
        "node": "mm0",
        "op": "MatMul",
        "ms_per_step": pytest.approx(0.05),
        "share": pytest.approx(100 / 160),
    }


# --- tables and targets --------------------------------------------------------------------------


def _cell(beam, batch, src, total_s, step_ms, extrapolated=False):
    return {
        "workload": workloads.Workload(beam, batch, src).key,
        "beam": beam,
        "batch": batch,
        "src_len": src,
        "src_width": src,
        "n_target": 50,
        "steps_measured": 51,
        "reps": 3,
        "extrapolated": extrapolated,
        "total_s": total_s,
        "tokens_per_s": batch * 51 / total_s,
        "sentences_per_s": batch / total_s,
        "encoder": {"p50_ms": 5.0},
        "step": {"p50_ms": step_ms, "p90_ms": step_ms * 1.1},
        "time_to_first_token_ms": 5.0 + step_ms,
    }


def _results():
    from deltalm.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    wls = [[5, 1, 30], [5, 32, 30]]
    return {
        "model": {"name": "tiny", "config": cfg.to_dict()},
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 1, "versions": {"python": "3"}},
        "floors": {"gemm_gflops": 100.0, "read_gbs": 20.0, "gemm_n": 1024, "read_bytes": 1 << 30},
        "settings": {"n": 50, "src_lens": [30], "workloads": wls, "threads": 2},
        "step_graph": {
            "fp32": {"matmul_weights": 10**6, "weight_bytes": 4 * 10**6, "gathered_bytes": 0},
            "int8": {"matmul_weights": 10**6, "weight_bytes": 10**6, "gathered_bytes": 0},
        },
        "backends": {
            "torch": {
                "cells": [_cell(5, 1, 30, 10.0, 100.0), _cell(5, 32, 30, 40.0, 800.0, extrapolated=True)],
                "peak_rss_mb": 900,
            },
            "ort-fp32": {"cells": [_cell(5, 1, 30, 2.0, 0.25), _cell(5, 32, 30, 10.0, 4.0)], "peak_rss_mb": 300},
            "ort-int8": {"cells": [_cell(5, 1, 30, 1.0, 0.1), _cell(5, 32, 30, 8.0, 1.0)], "peak_rss_mb": 200},
            "ort-cuda": {"reason": "not available here (no CUDA)", "cells": []},
        },
        "memory_check": {"peak_rss_mb": 300.0, "graph_files_mb": 250.0, "ratio_to_graph_files": 1.2},
        "exports": {"fp32": {"wall_s": 1.0, "peak_rss_mb": 9000}},
    }


def test_summary_table_shows_rates_speedups_extrapolation_and_missing_backends():
    r = _results()
    report.add_derived(r)
    table = report.summary_table(r)
    lines = table.splitlines()
    assert lines[0] == "| workload | torch | ort-fp32 | ort-int8 | ort-cuda |"
    assert lines[2] == "| beam 5, batch 1, src ~30 | 5.10 | 25.5 (5.00x) | 51.0 (10.00x) | not available here |"
    assert lines[3].startswith("| beam 5, batch 32, src ~30 | 40.8* | 163 (4.00x) | 204 (5.00x) |")


def test_add_derived_gives_each_cell_its_floor_and_efficiency():
    r = _results()
    report.add_derived(r)
    c = report._cell(r, "ort-fp32", 5, 32, 30)
    cfg_layers, d = 2, 64
    flops = 2 * 10**6 * 160 + 160 * cfg_layers * 4 * d * (26 + 30)
    assert c["floor"]["flops"] == flops
    assert c["floor"]["compute_ms"] == pytest.approx(flops / 100e9 * 1e3)
    assert c["floor"]["efficiency"] == pytest.approx(c["floor"]["floor_ms"] / 4.0)
    i8 = report._cell(r, "ort-int8", 5, 1, 30)
    assert i8["floor"]["bytes"] >= 10**6 and i8["floor"]["bytes"] < 4 * 10**6  # the int8 graph's bytes


def test_targets_report_met_and_missed_with_measured_values():
    r = _results()
    r["model"]["name"] = "base"
    report.add_derived(r)
    targets = {t["target"]: t for t in report.evaluate_targets(r)}
    assert targets["beam 5 x batch 32: ort int8 speed-up over fp32 (step)"]["met"] is True  # 4x
    assert targets["beam 5 x batch 1: ort int8 speed-up over fp32 (step)"]["measured"] == "2.50x"
    assert targets["beam 5 x batch 1: ort int8 speed-up over fp32 (step)"]["met"] is True
    assert targets["translate (ort fp32): peak RSS / weights loaded"]["met"] is True
    assert targets["export peak RSS (largest of fp32 / fp16 / int8)"]["met"] is False  # 9000 MB
    gpu = [t for t in targets.values() if t["target"].startswith("GPU: ort-cuda")]
    assert gpu and gpu[0]["measured"] == "not measured yet" and gpu[0]["met"] is None


def test_targets_set_for_deltalm_base_are_left_out_on_the_tiny_model():
    r = _results()
    report.add_derived(r)
    targets = {t["target"]: t for t in report.evaluate_targets(r)}
    for left_out in (
        "beam 5 x batch 32: ort int8 speed-up over fp32 (step)",
        "beam 5 x batch 1: ort fp32 step vs bandwidth floor",
        "translate (ort fp32): peak RSS / weights loaded",
    ):
        assert left_out not in targets
    assert targets["export peak RSS (largest of fp32 / fp16 / int8)"]["met"] is False


def test_the_console_gets_the_rates_and_verdicts_and_the_file_gets_every_figure(tmp_path):
    r = _results()
    report.add_derived(r)
    r["targets"] = report.evaluate_targets(r)
    r["exports"]["fp32"]["parity_passed"] = True
    text = report.format_console_summary(r, tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("deltalm bench: tiny (")
    assert report.summary_table(r) in text
    assert "export parity verdicts: fp32 passed" in lines
    assert "targets: 0 of 1 met; missed: export peak RSS (largest of fp32 / fp16 / int8)" in lines
    assert lines[-1] == f"every figure: {tmp_path / 'bench.md'} (also bench.json, bench.png, profile.md)"
    assert len(lines) < 20 and "Every figure" not in text and "floor" not in text


def test_markdown_report_has_every_section():
    r = _results()
    report.add_derived(r)
    r["targets"] = report.evaluate_targets(r)
    md = report.format_markdown(r)
    for heading in ("## Target tokens/s", "## Every figure", "## Step graph", "## Backends", "## Targets"):
        assert heading in md
    assert "| beam 5, batch 32, src ~30 | torch | 40.8 |" in md
    assert "52* x 3" not in md and "51* x 3" in md  # extrapolated cells are marked


def test_chart_is_written(tmp_path):
    r = _results()
    report.add_derived(r)
    report.write_chart(r, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_artifacts_keeps_an_artifact_of_the_current_export_code(tmp_path, monkeypatch):
    import json

    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "manifest.json").write_text("{}")
    record = {"fp32": {"wall_s": 1.0, "peak_rss_mb": 10, "export_code": models.export_code_fingerprint()}}
    (tmp_path / "exports.json").write_text(json.dumps(record))
    monkeypatch.setattr(models, "run_cli", lambda *a, **k: pytest.fail("exported again"))
    out = models.export_artifacts(None, tmp_path, ["fp32"])
    assert out["fp32"]["reused"] is True and out["fp32"]["wall_s"] == 1.0


def test_export_artifacts_redoes_an_artifact_of_other_export_code(tmp_path, monkeypatch):
    import json

    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "manifest.json").write_text("{}")
    (tmp_path / "exports.json").write_text(
        json.dumps({"fp32": {"wall_s": 1.0, "peak_rss_mb": 10, "export_code": "old"}})
    )
    calls = []

    def fake_export(args, record, stdin=None):
        calls.append(args)
        (tmp_path / "fp32" / "parity.json").write_text(json.dumps({"timings_s": {"export": 2.0}}))
        return 123.0, children.ChildResult(0, 5.0)

    monkeypatch.setattr(models, "run_cli", fake_export)
    files = models.ModelFiles("tiny", tmp_path / "c.pt", tmp_path / "spm.model", tmp_path / "dict.txt")
    out = models.export_artifacts(files, tmp_path, ["fp32"])
    assert calls and calls[0][0] == "export" and "--precision" in calls[0]
    assert out["fp32"]["peak_rss_mb"] == 123 and out["fp32"]["reused"] is False
    assert out["fp32"]["export_code"] == models.export_code_fingerprint()


# --- a tool of its own: installed files, a given artifact, progress ---------------------------------


def test_export_code_fingerprint_reads_the_imported_modules_not_the_working_directory(tmp_path, monkeypatch):
    import hashlib
    from pathlib import Path

    import deltalm.config
    import deltalm.export
    import deltalm.graphs

    paths = sorted(Path(deltalm.export.__file__).parent.glob("*.py"))
    paths += [Path(deltalm.config.__file__), Path(deltalm.graphs.__file__)]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    monkeypatch.chdir(tmp_path)  # another directory: nothing is read by a repository-relative path
    assert models.export_code_fingerprint() == h.hexdigest()[:16]


def test_progress_bar_only_on_a_terminal():
    import fcntl
    import io
    import os
    import select
    import struct
    import termios

    from deltalm.bench.progress import Progress

    plain = io.StringIO()
    with Progress(total=2, stream=plain) as p:
        p.stage("export")
        p.done()
    assert not p.shown and plain.getvalue() == ""

    for columns in (120, 0):  # a terminal that reports no size (0 x 0) still gets a bar
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
        try:
            with open(slave, "w", closefd=False) as tty:
                with Progress(total=2, stream=tty) as p:
                    assert p.shown
                    p.stage("export")
                    p.done(2)
                tty.flush()
            chunks = []
            while select.select([master], [], [], 1.0)[0]:  # everything written, with a timeout
                chunks.append(os.read(master, 65536))
            shown = b"".join(chunks).decode()
        finally:
            os.close(master)
            os.close(slave)
        assert "2/2 stages" in shown and "export" in shown


def test_bench_refuses_a_missing_model_or_a_file_in_one_line(tmp_path):
    from cli_support import assert_one_line_error, run_cli

    assert_one_line_error(
        run_cli(["bench", "--model", tmp_path / "nowhere", "--out", tmp_path / "out"]),
        "no such artifact directory",
        "tiny | base",
    )
    (tmp_path / "model.pt").write_bytes(b"x")
    assert_one_line_error(
        run_cli(["bench", "--model", tmp_path / "model.pt", "--out", tmp_path / "out"]),
        "a file, not an artifact directory",
    )


def test_bench_measures_a_given_artifact_directory(tiny, tmp_path, monkeypatch):
    """``--model DIR``: the artifact's own precision through ort, torch from the checkpoint its
    manifest names, the other precisions reported missing; run from another directory."""
    import json

    from cli_support import run_cli

    from deltalm.artifact import read_manifest

    def listing():
        return sorted(str(p) for p in tiny.artifact.parent.rglob("*"))

    before = listing()
    monkeypatch.chdir(tmp_path)
    res = run_cli(["bench", "--model", tiny.artifact, "--quick", "--out", "out"])
    assert res.rc == 0, res.err
    assert listing() == before  # everything is written under --out
    assert "stages |" not in res.err  # stderr is not a terminal: no progress bar
    r = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert r["model"]["name"] == tiny.artifact.name and r["model"]["artifact"] == str(tiny.artifact.resolve())
    assert r["model"]["config"] == read_manifest(tiny.artifact).model.to_dict()
    assert r["exports"] == {}  # nothing exported: the artifact is used as given
    b = r["backends"]
    assert (
        b["ort-int8"] == {"reason": "artifact missing", "cells": []} and b["ort-fp16"]["reason"] == "artifact missing"
    )
    for kind in ("ort-fp32", "torch"):
        assert len(b[kind]["cells"]) == len(r["settings"]["workloads"]) == 8
        assert all(c["tokens_per_s"] > 0 for c in b[kind]["cells"])
        assert b[kind]["rss_after_load_mb"] > 0 and b[kind]["load_s"] > 0
        assert b[kind]["peak_rss_mb"] >= b[kind]["peak_rss_translating_mb"] > 0
    manifest = read_manifest(tiny.artifact)
    graphs = sum(
        (tiny.artifact / f).stat().st_size
        for f in {f for g in ("encoder", "decoder_step") for f in manifest.graphs[g].files}
    )
    tokenizer = (tiny.artifact / manifest.tokenizer["spm"]).stat().st_size + (
        tiny.artifact / manifest.tokenizer["dict"]
    ).stat().st_size
    assert b["ort-fp32"]["model_files_mb"] == pytest.approx((graphs + tokenizer) / 2**20)
    assert b["torch"]["model_files_mb"] == pytest.approx((tiny.checkpoint.stat().st_size + tokenizer) / 2**20)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert f"| ort-fp32 | measured | {b['ort-fp32']['model_files_mb']:.1f} |" in md
    assert r["memory_check"]["precision"] == "fp32" and r["memory_check"]["peak_rss_mb"] > 0
    assert (tmp_path / "out" / "profile.md").exists() and (tmp_path / "out" / "bench.png").exists()
    control = r["control"]  # the ort backends there are (fp32 only here), and the given model's constraint share
    assert set(control["backends"]) == {"ort-fp32"}
    v = control["backends"]["ort-fp32"]["variants"]
    assert (
        v["ordered"]["constraints_met"] == v["unordered"]["constraints_met"] == 1.0
        and v["prefix"]["prefix_kept"] == 1.0
    )
    assert control["backends"]["ort-fp32"]["scoring"]["agree"] == 1.0
    assert control["constraint_share"]["model"] == f"the artifact {tiny.artifact.name}"
    assert "## Decoding control" in md and "### Constraints in the output (the artifact" in md


# --- side by side with CTranslate2 -------------------------------------------------------------------


def test_ct2_model_has_the_flops_of_deltalm_with_one_decoder_ffn_of_twice_the_width():
    pytest.importorskip("ctranslate2")
    from deltalm.bench.ct2_model import build_ct2_spec, ct2_step_flops_per_token
    from deltalm.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    spec = build_ct2_spec(cfg, seed=3)
    d, f = cfg.embed_dim, cfg.ffn_dim
    assert len(spec.encoder.layer) == cfg.encoder_layers and len(spec.decoder.layer) == cfg.decoder_layers
    assert spec.decoder.layer[0].ffn.linear_0.weight.shape == (2 * f, d)
    assert spec.decoder.layer[0].ffn.linear_1.weight.shape == (d, 2 * f)
    assert spec.encoder.layer[0].ffn.linear_0.weight.shape == (f, d)
    assert spec.decoder.projection.weight.shape == (cfg.vocab_size, d)
    assert spec.decoder.projection.weight is spec.encoder.embeddings[0].weight  # tied, as in DeltaLM
    # the decoder's matrix products: the same multiply-adds per token as DeltaLM's decoder step graph
    flops = ct2_step_flops_per_token(cfg)
    assert flops["standard"] == flops["deltalm"]
    layer = spec.decoder.layer[0]
    per_layer = sum(
        int(np.prod(x.weight.shape))
        for x in (
            *layer.self_attention.linear,
            layer.attention.linear[0],
            layer.attention.linear[2],
            layer.ffn.linear_0,
            layer.ffn.linear_1,
        )
    )
    assert cfg.decoder_layers * per_layer + cfg.vocab_size * d == flops["standard"]
    again = build_ct2_spec(cfg, seed=3)
    np.testing.assert_array_equal(again.decoder.layer[1].ffn.linear_0.weight, spec.decoder.layer[1].ffn.linear_0.weight)


def test_compare_ctranslate2_runs_both_engines_interleaved_on_the_tiny_model(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ctranslate2")
    import json

    from cli_support import run_cli

    monkeypatch.chdir(tmp_path)
    res = run_cli(["bench", "--model", tiny.artifact, "--quick", "--compare", "ctranslate2", "--out", "out"])
    assert res.rc == 0, res.err
    r = json.loads((tmp_path / "out" / "compare.json").read_text())["ctranslate2"]
    assert set(r["engines"]) == {"ctranslate2 fp32", "ours fp32"}  # the artifact is fp32: one pair
    assert r["workloads"] == [[1, 1, 30], [1, 32, 30], [5, 1, 30], [5, 32, 30]]
    for e in r["engines"].values():
        assert [(c["beam"], c["batch"]) for c in e["cells"]] == [(1, 1), (1, 32), (5, 1), (5, 32)]
        for c in e["cells"]:
            assert len(c["runs_s"]) == r["reps"] == 2
            assert c["tokens_per_s"] == pytest.approx(c["batch"] * (r["n"] + 1) / float(np.median(c["runs_s"])))
        assert e["load_s"] > 0 and e["rss_after_load_mb"] > 0 and e["peak_rss_translating_mb"] > 0
    ct2_dir = tmp_path / "out" / "ctranslate2" / "fp32"
    ct2_files = sum(p.stat().st_size for p in ct2_dir.iterdir() if p.name != "bench_record.json")
    assert r["engines"]["ctranslate2 fp32"]["model_files_mb"] == pytest.approx(ct2_files / 2**20)
    assert r["flops_per_token"]["standard"] == r["flops_per_token"]["deltalm"]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| | ctranslate2 fp32 | ours fp32 |" in md and "| greedy batch 32, tok/s |" in md and "| load, s |" in md


def test_compare_shortlist_runs_ours_with_and_without_it(tiny, tmp_path, monkeypatch):
    import json

    from cli_support import run_cli

    from deltalm.shortlist import build_shortlist

    monkeypatch.chdir(tmp_path)
    build_shortlist([([5, 6, 7], [8, 9])], 265, frequent=10, per_source=3).save(tmp_path / "sl.npz")
    res = run_cli(
        [
            "bench",
            "--model",
            tiny.artifact,
            "--quick",
            "--compare",
            "shortlist",
            "--shortlist",
            "sl.npz",
            "--out",
            "out",
        ]
    )
    assert res.rc == 0, res.err
    r = json.loads((tmp_path / "out" / "shortlist.json").read_text())["shortlist"]
    assert set(r["engines"]) == {"ours fp32", "ours-shortlist fp32"}
    for e in r["engines"].values():
        assert [(c["beam"], c["batch"]) for c in e["cells"]] == [(1, 1), (1, 32), (5, 1), (5, 32)]
        assert e["load_s"] > 0 and e["peak_rss_translating_mb"] > 0
    # batch 1 of ~30 random pieces: the 10 frequent ids, its sources, eos / unk, at least k + 3
    assert 13 <= r["candidates"]["b1-n1-s30"] <= r["candidates"]["b1-n32-s30"] <= 265
    assert r["agreement"] is None  # a given shortlist, no corpus: not measured
    md = (tmp_path / "out" / "shortlist.md").read_text()
    assert (
        "| | full vocabulary | shortlist | speed-up | candidates per batch |" in md
        and "| beam 5 batch 32, tok/s |" in md
    )
    assert_fails = run_cli(["bench", "--model", tiny.artifact, "--shortlist", "sl.npz", "--out", "o2"])
    assert assert_fails.rc == 2 and "--shortlist goes with --compare shortlist" in assert_fails.err


def test_random_shortlist_has_the_default_sizes():
    from deltalm.bench.workloads import random_shortlist
    from deltalm.shortlist import FREQUENT, PER_SOURCE

    sl = random_shortlist(5000)
    assert sl.frequent.size == FREQUENT and np.diff(sl.offsets).tolist() == [PER_SOURCE] * 5000
    assert sl.frequent.min() >= 4 and sl.targets.min() >= 4 and sl.targets.max() < 5000


def test_compare_table_puts_ours_next_to_ctranslate2_with_ratios_and_marks_busy_cells():
    def engine(tps, files, rss, peak, load, quiet=True):
        cells = [
            {"beam": b, "batch": n, "tokens_per_s": tps * n * b, "quiet_gate": {"quiet": quiet}}
            for b in (1, 5)
            for n in (1, 32)
        ]
        return {
            "cells": cells,
            "model_files_mb": files,
            "rss_after_load_mb": rss,
            "peak_rss_translating_mb": peak,
            "load_s": load,
        }

    cmp = {
        "workloads": [[1, 1, 30], [1, 32, 30], [5, 1, 30], [5, 32, 30]],
        "n": 50,
        "reps": 5,
        "threads": 2,
        "engines": {
            "ctranslate2 fp32": engine(10.0, 1384.0, 1474.0, 2252.0, 1.0),
            "ours fp32": engine(20.0, 2116.0, 3097.0, 4661.0, 6.5, quiet=False),
        },
    }
    lines = report.compare_table(cmp).splitlines()
    assert lines[0] == "| | ctranslate2 fp32 | ours fp32 |"
    assert lines[2] == "| greedy batch 1, tok/s | 10.0 | 20.0† (2.00x) |"
    assert lines[5] == "| beam 5 batch 32, tok/s | 1600 | 3200† (2.00x) |"
    assert lines[6] == "| model files, MB | 1384 | 2116 (1.53x) |"
    assert lines[8] == "| peak RSS while translating, MB | 2252 | 4661 (2.07x) |"
    assert lines[9] == "| load, s | 1.00 | 6.50 (6.50x) |"


def test_peak_meter_gives_each_section_its_own_peak():
    meter = children.PeakMeter()
    meter.start()
    big = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB written: resident
    del big
    first = meter.stop()
    if not meter.resettable:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    start = meter.start()
    second = meter.stop()
    assert first - start >= 60  # the first section saw the 64 MiB
    assert second < first - 60  # the second did not: its mark was reset
    assert meter.overall >= first


def test_memory_table_gives_each_cell_its_peak_and_ratio_to_the_rss_after_load():
    r = _results()
    for kind, peaks in (("ort-fp32", (330, 390)), ("ort-int8", (220, 400))):
        r["backends"][kind]["rss_after_load_mb"] = 300 if kind == "ort-fp32" else 200
        for c, peak in zip(r["backends"][kind]["cells"], peaks):
            c["peak_rss_cell_mb"] = peak
    lines = report.memory_table(r).splitlines()
    assert lines[0] == "| workload | torch | ort-fp32 | ort-int8 |"
    assert lines[2] == "| RSS after load, MB | - | 300 | 200 |"
    assert lines[4] == "| beam 5, batch 32, src ~30 | - | 390 (1.30x) | 400 (2.00x) |"
    report.add_derived(r)
    r["model"]["name"] = "base"
    targets = {t["target"]: t for t in report.evaluate_targets(r)}
    assert targets["ort-fp32: peak RSS of every cell / RSS after load"]["met"] is False
    assert targets["ort-fp32: peak RSS of every cell / RSS after load"]["measured"].startswith("up to 1.30x")


def test_compare_table_gives_each_cells_peak_rss_next_to_ctranslate2s():
    def engine(rss, peaks):
        cells = [
            {"beam": b, "batch": n, "tokens_per_s": 1.0, "peak_rss_cell_mb": peaks[(b, n)]}
            for b in (1, 5)
            for n in (1, 32)
        ]
        return {"cells": cells, "rss_after_load_mb": rss}

    peaks = {(1, 1): 1500, (1, 32): 1600, (5, 1): 1500, (5, 32): 2000}
    cmp = {
        "workloads": [[1, 1, 30], [1, 32, 30], [5, 1, 30], [5, 32, 30]],
        "n": 50,
        "reps": 5,
        "threads": 2,
        "engines": {
            "ctranslate2 fp32": engine(1000.0, peaks),
            "ours fp32": engine(1250.0, {k: v // 2 for k, v in peaks.items()}),
        },
    }
    table = report.compare_table(cmp).splitlines()
    assert "| beam 5 batch 32, peak RSS MB | 2000 | 1000 (0.50x) |" in table
    ratios = report.compare_peak_ratios(cmp).splitlines()
    assert ratios[0] == "| peak RSS / RSS after load | ctranslate2 fp32 | ours fp32 |"
    assert ratios[5] == "| beam 5 batch 32 | 2.00x | 0.80x |"


# --- decoding control ----------------------------------------------------------------------------------


def test_occurs_finds_contiguous_runs_only():
    from deltalm.bench.control import occurs

    assert occurs([5, 6, 7, 2], [6, 7]) and occurs([5, 6, 7, 2], [5])
    assert not occurs([5, 6, 7, 2], [5, 7]) and not occurs([5, 6], [6, 7]) and not occurs([5], [])


def test_pick_constraint_takes_the_first_word_the_best_lacks():
    from deltalm.bench.control import pick_constraint

    ids = {"a": [4], "b": [5], "cd": [6, 7], "e": [8]}.get
    assert pick_constraint([4, 5, 2], ["a", "b", "cd", "e"], ids) == "cd"
    assert pick_constraint([4, 6, 7, 2], ["a", "cd"], ids) is None


def test_control_variants_keep_forced_lengths_prefixes_and_constraints(artifact_dir):
    """Plain / prefix / constraints on one batch of a real (random tiny) step graph: every
    variant emits n + 1 tokens per sentence, the prefixes are kept, every constraint is met, and
    scoring in one run agrees with per-token teacher forcing. No timing is asserted."""
    from deltalm.backends import load_backend
    from deltalm.bench.control import VARIANTS, measure_control

    backend = load_backend("ort", artifact_dir, device="cpu", threads=1)
    spec = {
        "beam": 5,
        "batch": 3,
        "src_len": 10,
        "n": 8,
        "prefix_len": 3,
        "constraints": 2,
        "constraint_len": 2,
        "reps": 1,
        "seed": 0,
    }
    r = measure_control(backend, spec)
    backend.close()
    v = r["variants"]
    assert set(v) == set(VARIANTS)
    for name in VARIANTS:
        assert v[name]["lengths"] == [9] and v[name]["output_tokens"] == 3 * 9
        assert v[name]["tokens_per_s"] > 0 and v[name]["ratio_to_plain"] > 0
    assert v["plain"]["ratio_to_plain"] == 1.0
    assert v["prefix"]["prefix_kept"] == 1.0
    for order in ("ordered", "unordered"):
        assert v[order]["constraints"] == 6 and v[order]["constraints_met"] == 1.0
    sc = r["scoring"]
    assert sc["pairs"] == 3 and sc["target_tokens"] == 27 and sc["agree"] == 1.0 and sc["max_abs_score_diff"] < 1e-3
    assert sc["one_run"]["pairs_per_s"] > 0 and sc["per_step"]["target_tokens_per_s"] > 0
    assert sc["speedup_over_per_step"] > 0 and sc["translation_tokens_per_s"] == v["plain"]["tokens_per_s"]


def test_score_per_step_equals_score_pairs_on_targets_of_different_lengths(artifact_dir):
    from deltalm.backends import load_backend
    from deltalm.bench.control import score_per_step
    from deltalm.scoring import score_pairs

    backend = load_backend("ort", artifact_dir, device="cpu", threads=1)
    sources = [(5, 6, 7, 2), (8, 2)]
    targets = [(9, 10, 11, 12, 2), (13, 2)]
    want, got = score_pairs(backend, sources, targets), score_per_step(backend, sources, targets)
    backend.close()
    assert [len(g) for g in got] == [5, 2]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_constraint_share_on_the_demo_model_is_whole_with_constraints(tiny):
    """Every constraint is in the best hypothesis of constrained decoding where that hypothesis
    ended before the maximum length (the tests' demo model is fitted for a few steps only: a
    hypothesis may run to the maximum and end without); the nbest constraints are, by
    construction, in none of the best hypotheses without constraints."""
    from deltalm.bench.control import constraint_share

    r = constraint_share(tiny.artifact, threads=1, sentences=6)
    assert r["sentences"] == 6 and r["reference"]["constraints"] == 6
    for kind in ("reference", "nbest"):
        rec = r[kind]
        if not rec["constraints"]:
            continue
        for order in ("ordered", "unordered"):
            assert 1 <= rec[order]["completed"] <= rec["constraints"]
            assert rec[order]["share_completed"] == 1.0
            assert rec[order]["share"] >= rec[order]["completed"] / rec["constraints"]
        assert 0.0 <= rec["without"] <= 1.0
    assert r["nbest"]["constraints"] > 0 and r["nbest"]["without"] == 0.0
    again = constraint_share(tiny.artifact, threads=1, sentences=6)
    assert again == r  # deterministic


def test_control_section_reports_ratios_scoring_and_the_constraint_share():
    variants = {
        v: {"tokens_per_s": t, "ratio_to_plain": t / 100.0, "reps": 3}
        for v, t in (("plain", 100.0), ("prefix", 98.0), ("ordered", 80.0), ("unordered", 75.0))
    }
    variants["ordered"]["constraints_met"] = variants["unordered"]["constraints_met"] = 1.0
    scoring = {
        "pairs": 8,
        "target_tokens": 408,
        "one_run": {"pairs_per_s": 40.0, "target_tokens_per_s": 2040.0},
        "per_step": {"target_tokens_per_s": 300.0},
        "speedup_over_per_step": 6.8,
        "ratio_to_translation": 20.4,
        "max_abs_score_diff": 2e-6,
    }
    rec = {
        "beam": 5,
        "batch": 8,
        "src_len": 30,
        "n_target": 50,
        "prefix_len": 4,
        "constraints_per_sentence": 2,
        "constraint_len": 2,
        "variants": variants,
        "scoring": scoring,
        "others_cpu_share": 0.02,
    }
    share = {
        "sentences": 24,
        "beam": 5,
        "model": "the demo model",
        "reference": {
            "constraints": 24,
            "without": 0.958,
            "ordered": {"share": 1.0, "completed": 24, "share_completed": 1.0},
            "unordered": {"share": 1.0},
        },
        "nbest": {
            "constraints": 20,
            "without": 0.0,
            "ordered": {"share": 1.0, "completed": 20, "share_completed": 1.0},
            "unordered": {"share": 1.0},
        },
    }
    md = report.control_section(
        {"backends": {"ort-fp32": rec, "ort-int8": {"error": "boom"}}, "constraint_share": share}
    )
    assert "| ort-fp32 | 100.0 | 98.0 (0.98x) | 80.0 (0.80x, 100%) | 75.0 (0.75x, 100%) | 2% |" in md
    assert "| ort-fp32 | 8 | 408 | 40.0 | 2040 | 300 | 6.8x | 20.4x | 2.0e-06 |" in md
    assert "ort-int8: failed: boom" in md
    assert "### Constraints in the output (the demo model)" in md
    assert (
        "| reference | 24 | 96% | 100% | 100% | 100% of 24 |" in md
        and "| nbest | 20 | 0% | 100% | 100% | 100% of 20 |" in md
    )
