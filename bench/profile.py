"""ONNX Runtime's profiler on the decoder step: one profiling session per case, the profile's
events summarized per op type and per node (warm-up runs skipped), and a markdown page."""

from __future__ import annotations

import json
from pathlib import Path

from .measure import TimedBackend, generate_timed
from .workloads import make_sources, time_stats


def summarize_profile(events: list[dict], skip_runs: int = 1, top: int = 10) -> dict:
    """ORT profile events -> time per op type and per node, over the runs after the first
    ``skip_runs`` (warm-up). Node events are ``cat == "Node"`` named ``NODE_kernel_time``."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if skip_runs and len(runs) > skip_runs else 0
    kept_runs = [r for r in runs if r["ts"] >= start]
    by_op: dict[str, float] = {}
    count_op: dict[str, int] = {}
    by_node: dict[str, tuple[str, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_op[op] = by_op.get(op, 0.0) + e["dur"]
        count_op[op] = count_op.get(op, 0) + 1
        by_node[node] = (op, by_node.get(node, (op, 0.0))[1] + e["dur"])
    node_total = sum(by_op.values())
    run_total = sum(r["dur"] for r in kept_runs)
    n_runs = max(len(kept_runs), 1)
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])
    return {
        "runs": len(kept_runs),
        "run_ms_per_step": run_total / n_runs / 1e3,
        "node_ms_per_step": node_total / n_runs / 1e3,
        "top_ops": [
            {
                "op": op,
                "ms_per_step": us / n_runs / 1e3,
                "share": us / node_total if node_total else 0.0,
                "nodes_per_step": count_op[op] / n_runs,
            }
            for op, us in ops[:top]
        ],
        "top_nodes": [
            {"node": name, "op": op, "ms_per_step": us / n_runs / 1e3, "share": us / node_total if node_total else 0.0}
            for name, (op, us) in nodes[:top]
        ],
    }


def profile_decoder_step(
    artifact_dir: str, cases: list[tuple[int, int, int]], n: int, threads: int, out_dir: Path
) -> list[dict]:
    """Run forced-length generations through OrtBackend with a profiling decoder session; one
    session (and one profile file) per case (beam, batch, src_len)."""
    import onnxruntime as ort

    from deltalm.backends.ort import OrtBackend, session_options

    backend = OrtBackend.from_artifact(artifact_dir, threads=threads)
    path = backend.artifact.graph_path("decoder_step")
    cfg = backend.cfg
    results = []
    for beam, batch, src_len in cases:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(out_dir / f"ort_profile_b{beam}_n{batch}")
        backend.decoder = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, src_len, seed=7)
        timed = TimedBackend(backend)
        generate_timed(timed, src, beam, n)
        prof = backend.decoder.end_profiling()
        events = json.loads(Path(prof).read_text())
        summary = summarize_profile(events, skip_runs=2)
        summary |= {
            "beam": beam,
            "batch": batch,
            "src_len": src_len,
            "steps": n + 1,
            "file": Path(prof).name,
            "step_p50_ms_unprofiled_wrapper": time_stats(timed.step_s[2:])["p50_ms"],
        }
        results.append(summary)
        backend.decoder = None
    return results


def format_profile(results: list[dict], precision: str = "fp32") -> str:
    lines = [f"# ONNX Runtime profile of the {precision} decoder step", ""]
    for r in results:
        lines += [
            f"## beam {r['beam']} x batch {r['batch']} (src ~{r['src_len']}), {r['runs']} steps after warm-up",
            "",
            f"model_run {r['run_ms_per_step']:.2f} ms per step, of which kernels {r['node_ms_per_step']:.2f} ms",
            "",
            "| op type | ms / step | share of kernel time | nodes / step |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {o['op']} | {o['ms_per_step']:.3f} | {o['share']:.1%} | {o['nodes_per_step']:.0f} |"
            for o in r["top_ops"]
        ]
        lines += ["", "| node | op | ms / step | share |", "|---|---|---:|---:|"]
        lines += [f"| {o['node']} | {o['op']} | {o['ms_per_step']:.3f} | {o['share']:.1%} |" for o in r["top_nodes"]]
        lines.append("")
    return "\n".join(lines)
