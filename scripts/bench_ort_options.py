"""Evidence for what to change next, measured on an exported artifact (not part of `deltalm bench`).

    python scripts/bench_ort_options.py bench_out/base/artifacts/fp32 [--out FILE.json]

1. Session options (each in a fresh child process, so RSS figures do not mix): the default
   options of runtime/backends/ort.py, with weight prepacking disabled
   (``session.disable_prepacking``), and with spin-waiting disabled
   (``session.intra_op.allow_spinning``), without the CPU memory arena (``enable_cpu_mem_arena``),
   and without both prepacking and arena. Per variant: RSS after loading, decoder step p50 at
   beam 5 x batch 1 and beam 5 x batch 32, peak RSS.
2. The end of the step graph on [rows, vocab] logits in ONNX Runtime: ``full_rules`` (log_softmax,
   fairseq's rules as masked full-vocabulary ops, top-k: the step graph before commit 7314d87),
   ``candidate_rules`` (log_softmax, top-(k + 3), the rules on the candidates:
   ``export.graphs.topk_with_rules``) and ``minimal`` (ReduceLogSumExp and TopK(k + 3) only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "default": {},
    "no_prepacking": {"session.disable_prepacking": "1"},
    "no_spinning": {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
    "no_arena": {"enable_cpu_mem_arena": False},  # a SessionOptions attribute, not a config entry
    "no_prepacking_no_arena": {"session.disable_prepacking": "1", "enable_cpu_mem_arena": False},
}


def measure_variant(artifact: str, variant: str, steps: int, threads: int) -> dict:
    """In this process: load OrtBackend with the variant's session config entries, time steps."""
    import deltalm.backends.ort as ort_backend
    from deltalm.bench.children import current_rss_mb as _current_rss_mb
    from deltalm.bench.children import peak_rss_mb as _peak_rss_mb
    from deltalm.bench.measure import TimedBackend, generate_timed
    from deltalm.bench.workloads import make_sources, time_stats

    plain = ort_backend.session_options

    def patched(threads=None):
        so = plain(threads)
        for key, value in VARIANTS[variant].items():
            if key.startswith("session."):
                so.add_session_config_entry(key, value)
            else:
                setattr(so, key, value)
        return so

    ort_backend.session_options = patched
    t0 = time.perf_counter()
    backend = ort_backend.OrtBackend.from_artifact(artifact, threads=threads)
    out = {"variant": variant, "load_s": time.perf_counter() - t0, "rss_after_load_mb": _current_rss_mb()}
    timed = TimedBackend(backend)
    cfg = backend.cfg
    for beam, batch in ((5, 1), (5, 32)):
        src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, 30, seed=1)
        generate_timed(timed, src, beam, 1)  # warm-up
        run = generate_timed(timed, src, beam, steps)
        out[f"step_b{beam}_n{batch}"] = time_stats(run["step_s"][1:])
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def tail_graphs(vocab: int, k: int, tmp: Path) -> dict[str, Path]:
    """The three tails as ONNX files."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from deltalm.config import ModelConfig
    from deltalm.export.graphs import apply_rules, topk_with_rules

    cfg = ModelConfig.from_name("deltalm-base").replace(vocab_size=vocab)

    class FullRules(torch.nn.Module):
        def forward(self, logits, forced, ban_eos, only_eos, unk_penalty):
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            ruled = apply_rules(log_probs, cfg, forced, ban_eos, only_eos, unk_penalty)
            scores, ids = torch.topk(ruled, k, dim=-1)
            return scores, ids, log_probs

    class CandidateRules(torch.nn.Module):
        def forward(self, logits, forced, ban_eos, only_eos, unk_penalty):
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            scores, ids = topk_with_rules(log_probs, k, cfg, forced, ban_eos, only_eos, unk_penalty)
            return scores, ids, log_probs

    args = (torch.randn(4, vocab), torch.full((4,), -1), torch.tensor(False), torch.tensor(False), torch.tensor(0.0))
    paths = {}
    warnings.simplefilter("ignore")
    for name, module in (("full_rules", FullRules()), ("candidate_rules", CandidateRules())):
        paths[name] = tmp / f"{name}.onnx"
        torch.onnx.export(
            module,
            args,
            str(paths[name]),
            input_names=["logits", "forced", "ban_eos", "only_eos", "unk_penalty"],
            output_names=["scores", "ids", "log_probs"],
            dynamic_axes={"logits": {0: "rows"}, "forced": {0: "rows"}},
            opset_version=17,
            dynamo=False,
        )
    nodes = [
        helper.make_node("ReduceLogSumExp", ["logits"], ["lse"], axes=[-1], keepdims=1),
        helper.make_node("Constant", [], ["kk"], value=helper.make_tensor("kk", TensorProto.INT64, [1], [k + 3])),
        helper.make_node("TopK", ["logits", "kk"], ["vals", "ids"], axis=-1),
        helper.make_node("Sub", ["vals", "lse"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "minimal_tail",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", vocab])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", k + 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", k + 3]),
        ],
    )
    paths["minimal"] = tmp / "minimal.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(paths["minimal"]))
    return paths


def measure_tails(vocab: int, k: int, threads: int, reps: int = 5) -> list[dict]:
    import onnxruntime as ort

    from deltalm.bench.workloads import time_stats

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = tail_graphs(vocab, k, Path(tmp))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sessions = {
            name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for name, p in paths.items()
        }
        rng = np.random.default_rng(0)
        for rows in (5, 160):
            logits = rng.standard_normal((rows, vocab), dtype=np.float32)
            full = {
                "logits": logits,
                "forced": np.full(rows, -1, dtype=np.int64),
                "ban_eos": np.array(True),
                "only_eos": np.array(False),
                "unk_penalty": np.array(0.0, dtype=np.float32),
            }
            feeds = {"full_rules": full, "candidate_rules": full, "minimal": {"logits": logits}}
            row = {"rows": rows}
            for name, sess in sessions.items():
                sess.run(None, feeds[name])
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    sess.run(None, feeds[name])
                    times.append(time.perf_counter() - t0)
                row[name] = time_stats(times)
            out.append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    threads = os.cpu_count() or 1
    if args.variant:
        print(json.dumps(measure_variant(args.artifact, args.variant, args.steps, threads)))
        return 0
    import subprocess

    from deltalm.artifact import open_artifact

    results = {"variants": [], "tails": None}
    for variant in VARIANTS:
        res = subprocess.run(
            [sys.executable, __file__, args.artifact, "--steps", str(args.steps), "--variant", variant],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        results["variants"].append(row)
        print(
            f"{variant:<14} load {row['load_s']:5.1f}s  RSS after load {row['rss_after_load_mb']:6.0f} MB  "
            f"step b5xn1 p50 {row['step_b5_n1']['p50_ms']:7.1f} ms  b5xn32 p50 {row['step_b5_n32']['p50_ms']:7.1f} ms  "
            f"peak {row['peak_rss_mb']:6.0f} MB",
            flush=True,
        )
    cfg = open_artifact(args.artifact).config
    results["tails"] = measure_tails(cfg.vocab_size, 10, threads)
    for row in results["tails"]:
        print(
            f"tail, {row['rows']:3d} rows x {cfg.vocab_size}: full_rules {row['full_rules']['p50_ms']:7.1f} ms, "
            f"candidate_rules {row['candidate_rules']['p50_ms']:7.1f} ms, minimal {row['minimal']['p50_ms']:7.1f} ms",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
