"""The report of a run (pure formatting over the results dict): derived figures (speed-up over
torch, roofline floor per cell), the CPU targets, markdown tables (rates, every figure,
memory and load per backend, the side-by-side comparison with CTranslate2) and the chart."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .measure import CONTENDED
from .settings import BACKEND_KINDS, GPU_KINDS
from .step_cost import step_bytes, step_floor, step_flops
from .workloads import Workload


def add_derived(results: dict) -> None:
    """Per cell: speed-up over the torch cell of the same workload, and the step's roofline floor
    (average past length n / 2, source width as padded) with floor / measured p50."""
    from deltalm.config import ModelConfig

    cfg = ModelConfig.from_dict(results["model"]["config"])
    floors = results["floors"]
    costs = results["step_graph"]
    torch_cells = {c["workload"]: c for c in results["backends"].get("torch", {}).get("cells", [])}
    for kind, b in results["backends"].items():
        precision = {"ort-fp16": "fp16", "ort-int8": "int8"}.get(kind, "fp32")
        ref_cost = costs.get("fp32") or next(iter(costs.values()))
        cost = costs.get(precision) or ref_cost
        for c in b.get("cells", []):
            ref = torch_cells.get(c["workload"])
            c["speedup_vs_torch"] = ref["total_s"] / c["total_s"] if ref else None
            rows, past = c["batch"] * c["beam"], c["n_target"] / 2
            flops = step_flops(ref_cost["matmul_weights"], cfg, rows, past, c["src_width"])
            nbytes = step_bytes(
                cost["weight_bytes"], cfg, rows, c["batch"], past, c["src_width"], 2 if precision == "fp16" else 4
            )
            fl = step_floor(flops, nbytes, floors["gemm_gflops"], floors["read_gbs"])
            fl |= {"flops": flops, "bytes": nbytes, "efficiency": fl["floor_ms"] / c["step"]["p50_ms"]}
            c["floor"] = fl


def _cell(results: dict, kind: str, beam: int, batch: int, src: int) -> dict | None:
    for c in results["backends"].get(kind, {}).get("cells", []):
        if (c["beam"], c["batch"], c["src_len"]) == (beam, batch, src):
            return c
    return None


def evaluate_targets(results: dict) -> list[dict]:
    """The CPU targets against this run (source ~30 where a workload is named)."""
    src = 30 if 30 in results["settings"]["src_lens"] else results["settings"]["src_lens"][0]
    out = []
    base = results["model"].get("size", results["model"]["name"]) == "base"  # a base-sized artifact counts too

    def add(target, measured, goal, met, note="", base_only=True):
        if base_only and not base:  # set for deltalm-base: on a small model the ratio means nothing
            return
        out.append({"target": target, "measured": measured, "goal": goal, "met": met, "note": note})

    f32_32, i8_32 = _cell(results, "ort-fp32", 5, 32, src), _cell(results, "ort-int8", 5, 32, src)
    f32_1, i8_1 = _cell(results, "ort-fp32", 5, 1, src), _cell(results, "ort-int8", 5, 1, src)
    if f32_32:
        e = f32_32["floor"]["efficiency"]
        numpy_gflops = results["floors"].get("gemm_numpy_gflops")
        at_numpy = (
            (
                f"; {f32_32['floor']['flops'] / (numpy_gflops * 1e9) * 1e3 / f32_32['step']['p50_ms']:.0%} of the "
                f"floor at numpy's {numpy_gflops:.0f} GFLOP/s"
            )
            if numpy_gflops
            else ""
        )
        add(
            "beam 5 x batch 32: ort fp32 step vs compute floor",
            f"{e:.0%} ({f32_32['step']['p50_ms']:.0f} ms vs "
            f"{f32_32['floor']['floor_ms']:.0f} ms at {results['floors']['gemm_gflops']:.0f} GFLOP/s{at_numpy})",
            ">= 75%",
            e >= 0.75,
        )
    if f32_32 and i8_32:
        r = f32_32["step"]["p50_ms"] / i8_32["step"]["p50_ms"]
        add("beam 5 x batch 32: ort int8 speed-up over fp32 (step)", f"{r:.2f}x", ">= 2x", r >= 2.0)
    if f32_1:
        x = f32_1["step"]["p50_ms"] / f32_1["floor"]["memory_ms"]
        add(
            "beam 5 x batch 1: ort fp32 step vs bandwidth floor",
            f"{x:.2f}x the floor ({f32_1['step']['p50_ms']:.1f} ms vs {f32_1['floor']['memory_ms']:.1f} ms)",
            "<= 1.3x",
            x <= 1.3,
        )
    if f32_1 and i8_1:
        r = f32_1["step"]["p50_ms"] / i8_1["step"]["p50_ms"]
        add("beam 5 x batch 1: ort int8 speed-up over fp32 (step)", f"{r:.2f}x", ">= 2.5x", r >= 2.5)
    agree = results.get("agreement", {}).get("int8")
    if agree:
        add(
            "int8 top-1 step agreement with fp32 (demo model)",
            f"{agree['top1_agreement']:.2%}",
            ">= 99%",
            agree["top1_agreement"] >= 0.99,
            base_only=False,
        )
    speedups = [
        c["speedup_vs_torch"]
        for c in results["backends"].get("ort-fp32", {}).get("cells", [])
        if c.get("speedup_vs_torch")
    ]
    if speedups:
        add(
            "ort fp32 vs torch, every workload",
            f"{min(speedups):.2f}x .. {max(speedups):.2f}x",
            "reported",
            None,
            base_only=False,
        )
    for kind in ("ort-fp32", "ort-int8"):
        b = results["backends"].get(kind, {})
        ratios = [(cell_peak_ratio(c, b), c) for c in b.get("cells", []) if cell_peak_ratio(c, b) is not None]
        if ratios:
            worst, cell = max(ratios, key=lambda rc: rc[0])
            add(
                f"{kind}: peak RSS of every cell / RSS after load",
                f"up to {worst:.2f}x ({Workload(cell['beam'], cell['batch'], cell['src_len']).name}: "
                f"{cell['peak_rss_cell_mb']:.0f} MB / {b['rss_after_load_mb']:.0f} MB)",
                "<= 1.2x",
                worst <= 1.2,
            )
    mem = results.get("memory_check")
    if mem and "ratio_to_graph_files" in mem:
        add(
            "translate (ort fp32): peak RSS / weights loaded",
            f"{mem['ratio_to_graph_files']:.2f}x ({mem['peak_rss_mb']:.0f} MB / {mem['graph_files_mb']:.0f} MB)",
            "< 1.5x",
            mem["ratio_to_graph_files"] < 1.5,
        )
    fp32_export = results.get("exports", {}).get("fp32")
    if fp32_export:
        peak = max(r["peak_rss_mb"] for r in results["exports"].values())
        add(
            "export peak RSS (largest of fp32 / fp16 / int8)",
            f"{peak / 1024:.2f} GB",
            "< 8 GB",
            peak < 8 * 1024,
            base_only=False,
        )
    for kind in GPU_KINDS:
        b = results["backends"].get(kind, {})
        if not b.get("cells"):
            add(
                f"GPU: {kind} decoder step <= 0.8 ms (batch 1), <= 1.5 ms (batch 8 x beam 5)",
                "not measured yet",
                "<= 0.8 / 1.5 ms",
                None,
                b.get("reason", ""),
                base_only=False,
            )
    return out


def _fmt(x, spec=".1f", missing="-") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_rate(tokens_per_s: float) -> str:
    """3 significant digits, no exponent: 12345.6 -> '12346', 1.234 -> '1.23'."""
    if tokens_per_s >= 100:
        return f"{tokens_per_s:.0f}"
    if tokens_per_s >= 10:
        return f"{tokens_per_s:.1f}"
    return f"{tokens_per_s:.2f}"


def summary_table(results: dict) -> str:
    """Workloads as rows, backends as columns: target tokens/s and the speed-up over torch."""
    kinds = [k for k in BACKEND_KINDS if k in results["backends"]]
    head = "| workload | " + " | ".join(kinds) + " |"
    lines = [head, "|---|" + "---:|" * len(kinds)]
    for wl in results["settings"]["workloads"]:
        cells = []
        for k in kinds:
            b = results["backends"][k]
            c = _cell(results, k, *wl)
            if c is None:
                skipped = [k, Workload(*wl).key] in [list(x) for x in results["settings"].get("skip", ())]
                cells.append("not available here" if b.get("reason") else ("not run (time budget)" if skipped else "-"))
                continue
            mark = ("*" if c["extrapolated"] else "") + ("†" if c.get("others_cpu_share", 0.0) > CONTENDED else "")
            ratio = "" if k == "torch" or c.get("speedup_vs_torch") is None else f" ({c['speedup_vs_torch']:.2f}x)"
            cells.append(f"{format_rate(c['tokens_per_s'])}{mark}{ratio}")
        lines.append(f"| {Workload(*wl).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    lines = [
        "| workload | backend | tok/s | sent/s | encoder ms | step p50 ms | step p90 ms | first token ms | "
        "x torch | step floor ms (bound) | floor / p50 | steps x reps | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wl in results["settings"]["workloads"]:
        for k in BACKEND_KINDS:
            c = _cell(results, k, *wl)
            if c is None:
                continue
            fl = c.get("floor", {})
            steps = f"{c['steps_measured']}{'*' if c['extrapolated'] else ''} x {c['reps']}"
            busy = "†" if c.get("others_cpu_share", 0.0) > CONTENDED else ""
            lines.append(
                f"| {Workload(*wl).name} | {k} | {format_rate(c['tokens_per_s'])}{busy} | {_fmt(c['sentences_per_s'], '.2f')} | "
                f"{_fmt(c['encoder']['p50_ms'])} | {_fmt(c['step']['p50_ms'], '.2f')} | {_fmt(c['step']['p90_ms'], '.2f')} | "
                f"{_fmt(c['time_to_first_token_ms'])} | {_fmt(c.get('speedup_vs_torch'), '.2f')} | "
                f"{_fmt(fl.get('floor_ms'), '.2f')} ({fl.get('bound', '-')}) | {_fmt(fl.get('efficiency'), '.0%')} | {steps} | "
                f"{_fmt(c.get('peak_rss_cell_mb', results['backends'][k].get('peak_rss_mb')), '.0f')} |"
            )
    return "\n".join(lines)


def cell_peak_ratio(cell: dict, engine: dict) -> float | None:
    """A cell's peak RSS over the engine's RSS after load (None where not measured)."""
    peak, loaded = cell.get("peak_rss_cell_mb"), engine.get("rss_after_load_mb")
    return peak / loaded if peak and loaded else None


def memory_table(results: dict) -> str:
    """Workloads as rows, backends as columns: each cell's peak RSS (warm-up included, MB) and its
    ratio to the backend's RSS after load."""
    kinds = [k for k in BACKEND_KINDS if results["backends"].get(k, {}).get("cells")]
    lines = [
        "| workload | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| RSS after load, MB | "
        + " | ".join(_fmt(results["backends"][k].get("rss_after_load_mb"), ".0f") for k in kinds)
        + " |",
    ]
    for wl in results["settings"]["workloads"]:
        row = []
        for k in kinds:
            c = _cell(results, k, *wl)
            ratio = cell_peak_ratio(c, results["backends"][k]) if c else None
            row.append("-" if ratio is None else f"{c['peak_rss_cell_mb']:.0f} ({ratio:.2f}x)")
        lines.append(f"| {Workload(*wl).name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_console_summary(results: dict, out: Path) -> str:
    """What ``deltalm bench`` prints when it is done: the tokens/s table, the verdicts, where the
    full report is (every figure, memory, targets and the profile are in the files)."""
    cfg, st = results["model"]["config"], results["settings"]
    lines = [
        f"deltalm bench: {results['model']['name']} ({cfg['embed_dim']}d, {cfg['encoder_layers']}+"
        f"{cfg['decoder_layers']} layers, vocab {cfg['vocab_size']}), {st['n']} tokens forced, "
        f"{st['threads']} threads; target tokens/s (speed-up over torch):",
        "",
        summary_table(results),
        "",
    ]
    if results.get("exports"):
        verdicts = {True: "passed", False: "failed", None: "-"}
        lines.append(
            "export parity verdicts: "
            + ", ".join(f"{p} {verdicts[r.get('parity_passed')]}" for p, r in results["exports"].items())
        )
    agree = results.get("agreement")
    if agree:
        lines.append(
            "top-1 agreement with ort fp32: " + ", ".join(f"{p} {a['top1_agreement']:.2%}" for p, a in agree.items())
        )
    judged = [t for t in results.get("targets", []) if t["met"] is not None]
    if judged:
        missed = [t["target"] for t in judged if not t["met"]]
        lines.append(
            f"targets: {len(judged) - len(missed)} of {len(judged)} met"
            + (f"; missed: {'; '.join(missed)}" if missed else "")
        )
    table = summary_table(results)
    marks = [
        (m, text)
        for m, text in (
            ("*", "fewer steps measured, the step time extrapolated"),
            ("†", f"other processes took more than {CONTENDED:.0%} of the CPU meanwhile"),
        )
        if m in table
    ]
    if marks:
        lines.append("(" + "; ".join(f"{m}: {text}" for m, text in marks) + ")")
    lines.append(f"every figure: {out / 'bench.md'} (also bench.json, bench.png, profile.md)")
    return "\n".join(lines) + "\n"


def machine_line(m: dict) -> str:
    """The machine and the versions a report's figures were taken with, one sentence."""
    date = f"Measured {m['date']} (UTC). " if m.get("date") else ""
    return (
        date
        + f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + "."
    )


def format_markdown(results: dict) -> str:
    m, fl, st = results["machine"], results["floors"], results["settings"]
    cfg = results["model"]["config"]
    lines = [
        f"# deltalm bench: {results['model']['name']} ({cfg['embed_dim']}d, {cfg['encoder_layers']}+{cfg['decoder_layers']} "
        f"layers, vocab {cfg['vocab_size']})",
        "",
        machine_line(m),
        "",
        f"Floors measured here ({m['cores']} threads, best of numpy and ONNX Runtime, before and after the run): fp32 GEMM "
        f"{fl['gemm_gflops']:.0f} GFLOP/s ({fl['gemm_n']}^3; numpy {fl.get('gemm_numpy_gflops', 0):.0f}, "
        f"ORT MatMul {fl.get('gemm_ort_gflops', 0):.0f}), read bandwidth {fl['read_gbs']:.1f} GB/s (sum of "
        f"{fl['read_bytes'] / 2**20:.0f} MiB; numpy {fl.get('read_numpy_gbs', 0):.1f}, ORT ReduceSum "
        f"{fl.get('read_ort_gbs', 0):.1f}).",
        "",
        f"Every generation forced to {st['n']} tokens + </s> ({st['n'] + 1} decoder steps); medians over repetitions "
        "after a warm-up; step latencies pool every step of every repetition; tok/s counts each sentence's "
        f"{st['n'] + 1} output tokens. Threads: {st['threads']} for every backend; OMP_WAIT_POLICY="
        f"{st.get('omp_wait_policy')} (torch's OpenMP threads sleep rather than spin while waiting). "
        "`*`: fewer steps measured, the per-step time extrapolated to the full length. `†`: other processes took more "
        f"than {CONTENDED:.0%} of the CPU while the cell ran (after a wait for quiet and one retry).",
        "",
    ]
    shares = [c.get("others_cpu_share", 0.0) for b in results["backends"].values() for c in b.get("cells", [])]
    if shares:
        lines += [
            f"Other processes on this machine took {min(shares):.0%} .. {max(shares):.0%} (median "
            f"{float(np.median(shares)):.0%}) of its CPU time while the cells ran: figures are slower than this machine "
            "does alone."
            if max(shares) > 0.05
            else "The machine was otherwise idle while the cells ran "
            f"(other processes: at most {max(shares):.0%} of its CPU).",
            "",
        ]
    lines += [
        "## Target tokens/s (speed-up over torch, same run)",
        "",
        summary_table(results),
        "",
        "## Every figure",
        "",
        detail_table(results),
        "",
        "Step floor: the larger of FLOPs / GEMM peak and bytes / read bandwidth, at the average past length "
        f"({st['n'] / 2:g}); bytes = the step graph's weights read in full (per precision) + the K/V caches. "
        "int8 is held to the fp32 GEMM peak (its own integer peak is higher), so it can exceed 100%.",
        "",
        "## Step graph",
        "",
        "| precision | weights read per step | only gathered (rows) | matmul weights (elements) |",
        "|---|---:|---:|---:|",
    ]
    for p, c in results["step_graph"].items():
        lines.append(
            f"| {p} | {c['weight_bytes'] / 1e6:.1f} MB | {c['gathered_bytes'] / 1e6:.1f} MB | {c['matmul_weights'] / 1e6:.1f} M |"
        )
    lines += [
        "",
        "## Peak RSS per cell",
        "",
        "Each cell's peak RSS (the kernel's high-water mark reset before its warm-up; MB) and, in parentheses, its "
        "ratio to the backend's RSS after load. The cells run one after the other in the backend's process, so a "
        "cell also carries what earlier cells left resident.",
        "",
        memory_table(results),
    ]
    lines += [
        "",
        "## Backends: memory and load",
        "",
        "Each backend runs in its own process. Model files: what it loads (graphs with their weights and the "
        "tokenizer files; torch: the checkpoint). Load: open the artifact -> ready to translate (imports excluded). "
        "RSS after load; peak RSS while translating (every workload, after the load); peak RSS of the whole process "
        "(VmHWM). Other processes' CPU: the share of this machine's CPU time that other processes took while the "
        "backend was measured (it slows every figure).",
        "",
        "| backend | status | model files MB | load s | RSS after load MB | peak RSS while translating MB | "
        "peak RSS MB | other processes' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in BACKEND_KINDS:
        b = results["backends"].get(k)
        if b is None:
            continue
        status = "measured" if b.get("cells") else (b.get("reason") or b.get("error", "failed"))
        lines.append(
            f"| {k} | {status} | {_fmt(b.get('model_files_mb'), '.1f')} | {_fmt(b.get('load_s'), '.2f')} | "
            f"{_fmt(b.get('rss_after_load_mb'), '.0f')} | {_fmt(b.get('peak_rss_translating_mb'), '.0f')} | "
            f"{_fmt(b.get('peak_rss_mb'), '.0f')} | {_fmt(b.get('others_cpu_share'), '.0%')} |"
        )
    if results.get("exports"):
        lines += [
            "",
            "## Export (`deltalm export`, parity checks included)",
            "",
            "| precision | wall s | peak RSS MB | parity verdict | note |",
            "|---|---:|---:|---|---|",
        ]
        for p, r in results["exports"].items():
            verdict = {True: "passed", False: "failed: " + "; ".join(r.get("parity_failures", [])[:2]), None: "-"}[
                r.get("parity_passed")
            ]
            lines.append(
                f"| {p} | {r['wall_s']:.1f} | {r['peak_rss_mb']} | {verdict} | "
                f"{'from an earlier run' if r.get('reused') else ''} |"
            )
    mem = results.get("memory_check")
    if mem:
        lines += ["", "## Memory check", "", mem.get("summary", "")]
    agree = results.get("agreement")
    if agree:
        lines += [
            "",
            "## Agreement with ort fp32 (deltalm.compare)",
            "",
            "Top-1: greedy decoding teacher-forced by fp32, the fraction of (row, step) whose best token agrees "
            "(`compare_steps`); identical: full searches, the fraction of sentences with identical ids "
            "(`compare_translations`).",
            "",
        ]
        for p, a in agree.items():
            same = ", ".join(
                f"{'greedy' if t['beam'] == 1 else 'beam ' + str(t['beam'])} {t['identical_ids']:.0%} of "
                f"{t['sentences']}"
                for t in a.get("translations", [])
            )
            lines.append(
                f"- {p}: top-1 agreement {a['top1_agreement']:.2%} over {a['rows']} rows x {a['steps']} steps"
                + (f"; identical sentences: {same}" if same else "")
            )
    if results.get("control"):
        lines += ["", control_section(results["control"])]
    if results.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(
                f"| {t['target']} | {t['measured']}{(' — ' + t['note']) if t['note'] else ''} | {t['goal']} | {met} |"
            )
    if results.get("ctranslate2"):
        lines += ["", compare_section(results["ctranslate2"])]
    return "\n".join(lines) + "\n"


def control_section(control: dict) -> str:
    """The decoding-control section of bench.md: variants, scoring, the demo model's constraint
    share."""
    lines = ["## Decoding control", ""]
    ok = {k: b for k, b in control.get("backends", {}).items() if "variants" in b}
    for k, b in control.get("backends", {}).items():
        if k not in ok:
            lines += [f"{k}: failed: {b.get('error', '')[-300:]}", ""]
    if ok:
        b = next(iter(ok.values()))
        lines += [
            f"Beam {b['beam']}, batch {b['batch']}, source ~{b['src_len']}, every sentence forced to {b['n_target']} "
            f"tokens + </s> as in the cells; the variants interleaved, {b['variants']['plain']['reps']} repetition(s) "
            "each, medians, in one process per backend. prefix: a forced target prefix of "
            f"{b['prefix_len']} random ids per sentence (counted in the output tokens: each costs a step); ordered / "
            f"unordered: {b['constraints_per_sentence']} lexical constraints of {b['constraint_len']} random ids per "
            "sentence. met: share of constraints found in the best hypothesis; ratio: tok/s over plain beam "
            "search's of the same run.",
            "",
            "| backend | plain tok/s | prefix tok/s (ratio) | ordered constraints tok/s (ratio, met) | "
            "unordered constraints tok/s (ratio, met) | other processes' CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k, b in ok.items():
            v = b["variants"]
            cons = [
                f"{v[o]['tokens_per_s']:.1f} ({v[o]['ratio_to_plain']:.2f}x, {v[o].get('constraints_met', 0):.0%})"
                for o in ("ordered", "unordered")
            ]
            lines.append(
                f"| {k} | {v['plain']['tokens_per_s']:.1f} | {v['prefix']['tokens_per_s']:.1f} "
                f"({v['prefix']['ratio_to_plain']:.2f}x) | {cons[0]} | {cons[1]} | {b['others_cpu_share']:.0%} |"
            )
        lines += [
            "",
            "Scoring the plain variant's best hypotheses (the same pairs): `score_pairs`, one teacher-forced run "
            "of the step graph over whole targets per batch (what `deltalm score` does), against per-token "
            "teacher forcing (one step run per target position over the self-attention cache, as the search "
            "steps; measured here only), and next to translating the same batch (beam search, plain).",
            "",
            "| backend | pairs | target tokens | one run: pairs/s | one run: target tok/s | per token: target tok/s | "
            "one run / per token | one run / translation tok/s | max score diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, b in ok.items():
            sc = b["scoring"]
            lines.append(
                f"| {k} | {sc['pairs']} | {sc['target_tokens']} | {sc['one_run']['pairs_per_s']:.1f} | "
                f"{sc['one_run']['target_tokens_per_s']:.0f} | {sc['per_step']['target_tokens_per_s']:.0f} | "
                f"{sc['speedup_over_per_step']:.1f}x | {sc['ratio_to_translation']:.1f}x | "
                f"{sc['max_abs_score_diff']:.1e} |"
            )
    share = control.get("constraint_share")
    if share:
        lines += ["", f"### Constraints in the output ({share.get('model', 'demo model')})", ""]
        if "error" in share:
            lines.append(f"not measured: {share['error']}")
        else:
            lines += [
                f"{share['sentences']} corpus sentences, beam {share['beam']}, one constraint (a word) per sentence. "
                "reference: a word of the sentence's reference (the demo is a copy task); nbest: a word of a "
                "lower-ranked hypothesis whose ids the best one lacks (0% without constraints by construction). "
                "Share of constraints found in the best hypothesis; completed: hypotheses that ended before the "
                "maximum length.",
                "",
                "| constraint from | constraints | without | ordered | unordered | ordered, completed hypotheses |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for kind in ("reference", "nbest"):
                r = share.get(kind, {})
                if not r.get("constraints"):
                    continue
                done = r["ordered"]
                lines.append(
                    f"| {kind} | {r['constraints']} | {r['without']:.0%} | {r['ordered']['share']:.0%} | "
                    f"{r['unordered']['share']:.0%} | {_fmt(done['share_completed'], '.0%')} of {done['completed']} |"
                )
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in BACKEND_KINDS if results["backends"].get(k, {}).get("cells")]
    wls = [tuple(w) for w in results["settings"]["workloads"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.1 * len(wls)), 9), sharex=True)
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(wls))
    for i, k in enumerate(kinds):
        tps, ratio = [], []
        for wl in wls:
            c = _cell(results, k, *wl)
            tps.append(c["tokens_per_s"] if c else np.nan)
            ratio.append(c["speedup_vs_torch"] if c and c.get("speedup_vs_torch") else np.nan)
        axes[0].bar(x + (i - (len(kinds) - 1) / 2) * width, tps, width, label=k)
        axes[1].bar(x + (i - (len(kinds) - 1) / 2) * width, ratio, width, label=k)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("target tokens / s")
    axes[0].legend(ncol=len(kinds), fontsize=8)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("speed-up over torch (same run)")
    axes[1].set_xticks(x, [Workload(*w).name.replace(", ", "\n") for w in wls], fontsize=7)
    cfg = results["model"]["config"]
    fig.suptitle(
        f"deltalm bench, {results['model']['name']} ({cfg['embed_dim']}d, vocab {cfg['vocab_size']}), "
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores, {results['settings']['n']} tokens forced"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- side by side with CTranslate2 ------------------------------------------------------------------

_COMPARE_FIGURES = (
    ("model files, MB", "model_files_mb"),
    ("RSS after load, MB", "rss_after_load_mb"),
    ("peak RSS while translating, MB", "peak_rss_translating_mb"),
    ("load, s", "load_s"),
)


def format_amount(x) -> str:
    """About 3 significant digits without exponent: 1384.2 -> '1384', 6.51 -> '6.51', 0.0042 -> '0.0042'."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format_rate(x) if x >= 1 else f"{x:.2g}"


def compare_table(cmp: dict) -> str:
    """Engines as columns (CTranslate2 then ours, per precision), tokens/s per workload and the
    memory and load figures as rows; ours carries its ratio to CTranslate2 (speed: ours / CT2,
    higher is better; memory and load: ours / CT2, lower is better)."""
    engines = cmp["engines"]
    labels = [lbl for p in ("fp32", "int8") for lbl in (f"ctranslate2 {p}", f"ours {p}") if lbl in engines]
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]

    def rival(label):
        return engines.get("ctranslate2 " + label.split()[1]) if label.startswith("ours") else None

    for beam, batch, src in cmp["workloads"]:
        row = []
        for lbl in labels:
            cell = next((c for c in engines[lbl]["cells"] if (c["beam"], c["batch"]) == (beam, batch)), None)
            if cell is None:
                row.append("-")
                continue
            text = format_rate(cell["tokens_per_s"]) + (
                "†" if (cell.get("quiet_gate") or {}).get("quiet") is False else ""
            )
            other = rival(lbl)
            oc = next((c for c in other["cells"] if (c["beam"], c["batch"]) == (beam, batch)), None) if other else None
            if oc:
                text += f" ({cell['tokens_per_s'] / oc['tokens_per_s']:.2f}x)"
            row.append(text)
        lines.append(f"| {Workload(beam, batch, src).search} batch {batch}, tok/s | " + " | ".join(row) + " |")
    for beam, batch, src in cmp["workloads"]:
        row = []
        for lbl in labels:
            cell = next((c for c in engines[lbl]["cells"] if (c["beam"], c["batch"]) == (beam, batch)), None)
            if cell is None or cell.get("peak_rss_cell_mb") is None:
                row.append("-")
                continue
            text = format_amount(cell["peak_rss_cell_mb"])
            other = rival(lbl)
            oc = next((c for c in other["cells"] if (c["beam"], c["batch"]) == (beam, batch)), None) if other else None
            if oc and oc.get("peak_rss_cell_mb"):
                text += f" ({cell['peak_rss_cell_mb'] / oc['peak_rss_cell_mb']:.2f}x)"
            row.append(text)
        if any(r != "-" for r in row):
            lines.append(
                f"| {Workload(beam, batch, src).search} batch {batch}, peak RSS MB | " + " | ".join(row) + " |"
            )
    for title, key in _COMPARE_FIGURES:
        row = []
        for lbl in labels:
            value = engines[lbl].get(key)
            text = format_amount(value)
            other = rival(lbl)
            if other and value is not None and other.get(key):
                text += f" ({value / other[key]:.2f}x)"
            row.append(text)
        lines.append(f"| {title} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare_peak_ratios(cmp: dict) -> str:
    """Engines as columns, each cell's peak RSS over the engine's RSS after load."""
    engines = cmp["engines"]
    labels = [lbl for p in ("fp32", "int8") for lbl in (f"ctranslate2 {p}", f"ours {p}") if lbl in engines]
    lines = ["| peak RSS / RSS after load | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for beam, batch, src in cmp["workloads"]:
        row = []
        for lbl in labels:
            cell = next((c for c in engines[lbl]["cells"] if (c["beam"], c["batch"]) == (beam, batch)), None)
            ratio = cell_peak_ratio(cell, engines[lbl]) if cell else None
            row.append("-" if ratio is None else f"{ratio:.2f}x")
        lines.append(f"| {Workload(beam, batch, src).search} batch {batch} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare_section(cmp: dict) -> str:
    flops = cmp.get("flops_per_token", {})
    lines = [
        "## Side by side with CTranslate2",
        "",
        f"CTranslate2 {cmp.get('ctranslate2_version', '?')} on a standard transformer with the same FLOPs per token "
        f"(decoder FFN twice DeltaLM's ffn_dim: DeltaLM's decoder layer has two FFNs; same embed dim, heads, layers, "
        f"vocabulary; random weights, seed {cmp.get('seed', 0)}"
        + (
            f"; {flops['standard'] / 1e6:.1f} M multiply-adds per target token in the matrix products, both"
            if flops
            else ""
        )
        + f"). Every sentence forced to {cmp['n'] + 1} decoder steps (ours: {cmp['n']} tokens and </s>; CTranslate2: "
        f"min = max decoding length {cmp['n'] + 1}); src ~{cmp['workloads'][0][2]} pieces; {cmp['threads']} threads each; "
        f"medians of {cmp['reps']} repetitions, the engines taking turns (each in its own process, loaded one after the "
        "other). In parentheses: ours / CTranslate2 at the same precision. `†`: the machine was not quiet before the "
        "cell (other processes kept it busy through the wait): both engines ran slower, their ratio is what to read.",
        "",
        compare_table(cmp),
    ]
    if any(c.get("peak_rss_cell_mb") for e in cmp["engines"].values() for c in e["cells"]):
        lines += [
            "",
            "Peak RSS of a cell: the engine process's high-water mark, reset before the cell's warm-up (the "
            "cells run one after the other in each engine's process).",
            "",
            compare_peak_ratios(cmp),
        ]
    return "\n".join(lines)


def format_compare_markdown(results: dict) -> str:
    """The report of a ``--compare`` run: the model, the machine, the side-by-side table."""
    m = results["machine"]
    cfg = results["model"]["config"]
    lines = [
        f"# deltalm bench --compare ctranslate2: {results['model']['name']} ({cfg['embed_dim']}d, "
        f"{cfg['encoder_layers']}+{cfg['decoder_layers']} layers, ffn {cfg['ffn_dim']}, vocab {cfg['vocab_size']})",
        "",
        machine_line(m),
        "",
        compare_section(results["ctranslate2"]),
    ]
    return "\n".join(lines) + "\n"


def format_shortlist_markdown(results: dict) -> str:
    """The report of ``--compare shortlist``: tokens/s with and without the shortlist per
    workload, the candidates each workload's batch got, memory and load, and the agreement."""
    m = results["machine"]
    cfg = results["model"]["config"]
    sl = results["shortlist"]
    engines = sl["engines"]
    full, short = (
        next(k for k in engines if k.startswith("ours ")),
        next(k for k in engines if k.startswith("ours-shortlist")),
    )
    v = cfg["vocab_size"]
    lines = [
        f"# deltalm bench --compare shortlist: {results['model']['name']} ({cfg['embed_dim']}d, "
        f"{cfg['encoder_layers']}+{cfg['decoder_layers']} layers, vocab {v})",
        "",
        machine_line(m),
        "",
        f"Shortlist: {sl['info'].get('built_from', '?')}. Every sentence forced to {sl['n'] + 1} decoder steps; "
        f"src ~{sl['workloads'][0][2]} random pieces; {sl['threads']} threads; medians of {sl['reps']} repetitions, "
        "the two engines (each in its own process) taking turns. `†`: the machine was not quiet before the cell.",
        "",
        "| | full vocabulary | shortlist | speed-up | candidates per batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for beam, batch, src in sl["workloads"]:
        wl = Workload(beam, batch, src)
        a = next(c for c in engines[full]["cells"] if c["workload"] == wl.key)
        b = next(c for c in engines[short]["cells"] if c["workload"] == wl.key)
        busy = "†" if any((c.get("quiet_gate") or {}).get("quiet") is False for c in (a, b)) else ""
        n_c = sl["candidates"][wl.key]
        lines.append(
            f"| {wl.search} batch {batch}, tok/s | {format_rate(a['tokens_per_s'])}{busy} | "
            f"{format_rate(b['tokens_per_s'])}{busy} | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x | "
            f"{n_c} ({100 * n_c / v:.1f}% of {v}) |"
        )
    for title, key in _COMPARE_FIGURES:
        a, b = engines[full].get(key), engines[short].get(key)
        ratio = f"{b / a:.2f}x" if a and b is not None else ""
        lines.append(f"| {title} | {format_amount(a)} | {format_amount(b)} | {ratio} | |")
    agree = sl.get("agreement")
    lines.append("")
    if agree:
        lines.append(
            f"Agreement with the full vocabulary ({agree['sentences']} toy-corpus sentences the shortlist was "
            f"not built from; built from the model's own beam-5 translations of {agree['built_from_sentences']} "
            "others): "
            + "; ".join(
                f"beam {b}: {100 * agree[f'beam{b}']['identical']:.1f}% identical ids (score difference on those "
                f"up to {agree[f'beam{b}']['max_score_diff_identical']:.2g}, from normalizing over the candidates)"
                for b in (1, 5)
            )
            + "."
        )
    else:
        lines.append(
            "Agreement: not measured (random weights or no corpus: a random model's near-flat distributions "
            "say nothing about it; see the tiny run)."
        )
    return "\n".join(lines) + "\n"
