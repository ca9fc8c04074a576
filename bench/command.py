"""``deltalm bench``: the same model and the same inputs through every available backend, each
figure next to the ``torch`` baseline of the same run and next to this machine's floors; or, with
``--compare ctranslate2``, ours against a FLOP-identical CTranslate2 model, interleaved.

Flow: the model (tiny: the demo checkpoint; base: a random deltalm-base-sized checkpoint; or an
artifact directory given by path) -> artifacts per precision (each export in a child process:
wall time and peak RSS) -> this machine's floors -> one child process per backend runs every
workload (load time, RSS after load, peak RSS while translating: per backend) -> the memory check
(``deltalm translate`` in a child) -> agreement of int8 / fp16 with fp32 (deltalm.compare) ->
ONNX Runtime's profiler on the decoder step -> bench.json, bench.md, bench.png, profile.md.

Every generation is forced to a fixed length (``min_len = max_len_b = N``, ``max_len_a = 0``):
N + 1 decoder steps (the last one emits ``</s>``), so random-weight models do the same work on
every backend. Where a cell would take too long (the torch baseline at batch 32 x beam 5), fewer
steps are measured and the per-step median is extrapolated to N + 1 steps; such cells are marked.
Everything is written under ``--out``; nothing is read by a path relative to the repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from deltalm.artifact import read_manifest
from deltalm.atomic import check_output_directory

# The bench modules are imported when the command runs, not when ``deltalm`` builds its parser.


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny", help="tiny | base | path to an artifact directory")
    parser.add_argument(
        "--out", default="bench_out", help="directory for the model, artifacts and reports (default bench_out)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer workloads and shorter generations")
    parser.add_argument(
        "--compare",
        choices=["ctranslate2", "shortlist"],
        help="ctranslate2: only ours against a FLOP-identical CTranslate2 model, interleaved in one run "
        "(needs the bench extra); shortlist: ours with and without a vocabulary shortlist",
    )
    parser.add_argument(
        "--shortlist",
        metavar="FILE",
        help="with --compare shortlist: this shortlist (default: built from the toy corpus for tiny, "
        "random lists of the default sizes otherwise)",
    )
    parser.add_argument(
        "--export-memory",
        action="store_true",
        help="only the export's memory: peak RSS and time of every stage of deltalm export on fairseq "
        "checkpoints of the --shapes written here (deltalm-large: 3.4 GB, ~10 GB of RAM free)",
    )
    parser.add_argument(
        "--shapes",
        default="base,large",
        help="with --export-memory: checkpoint shapes, comma-separated (base, large; default base,large)",
    )
    parser.add_argument(
        "--precisions",
        default="fp32,int8",
        help="with --export-memory: export precisions, comma-separated (default fp32,int8)",
    )


def _require(module: str, extra: str, what: str) -> None:
    from deltalm.errors import InputError, install_extra

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{what} needs {module}: {install_extra(extra)}")


def _prepare(model: str, out: Path, precisions, progress) -> tuple[dict, dict, dict]:
    """(model description, {precision: artifact dir}, export records) for --model."""
    from .models import export_artifacts, given_artifact, prepare_base, prepare_tiny

    if model in ("tiny", "base"):
        _require("torch", "export", f"--model {model} (a checkpoint to export)")
        progress.stage(f"model {model}")
        files = prepare_tiny(out / "model") if model == "tiny" else prepare_base(out / "model")
        progress.done()
        progress.stage("export")
        art_root = out / "artifacts"
        exports = export_artifacts(files, art_root, precisions)
        progress.done()
        artifacts = {p: art_root / p for p in precisions if (art_root / p / "manifest.json").exists()}
        return (
            {"name": model, "checkpoint": str(files.checkpoint), "spm": str(files.spm), "dict": str(files.dict)},
            artifacts,
            exports,
        )
    artifacts = given_artifact(Path(model))
    progress.done(2)
    path = next(iter(artifacts.values()))
    return {"name": path.name, "artifact": str(path)}, artifacts, {}


def bench_command(args) -> int:
    """``deltalm bench --model tiny|base|DIR --out DIR [--quick] [--compare ctranslate2]``."""
    from .progress import Progress

    # OpenMP threads (torch) sleep instead of spinning while they wait: on a machine other
    # processes also load, spinning made a tiny torch step 130x slower here (1000 ms instead of
    # 8 ms at 2 threads). Set before torch is imported; children (exports, workers) inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.shortlist and args.compare != "shortlist":
        from deltalm.errors import InputError

        raise InputError("--shortlist goes with --compare shortlist")
    if args.compare == "ctranslate2":
        _require("ctranslate2", "bench", "--compare ctranslate2")
    elif not args.compare:
        _require("matplotlib", "bench", "deltalm bench (its chart)")
        _require("onnx", "export", "deltalm bench (counting the step graph's weights)")
    out = Path(args.out)
    check_output_directory(out, "--out")  # before any model is built or loaded
    out.mkdir(parents=True, exist_ok=True)
    if args.export_memory:
        return _export_memory_run(args, out)
    with Progress(total=2, desc="bench") as progress:  # model, export; the run adds its own stages
        if args.compare == "shortlist":
            return _shortlist_run(args, out, progress)
        if args.compare:
            return _compare_run(args, out, progress)
        return _full_run(args, out, progress)


def _full_run(args, out: Path, progress) -> int:
    from .children import run_task, wait_for_quiet
    from .floors import machine_info, measure_floors
    from .measure import measure_agreement, memory_check
    from .models import PRECISIONS
    from .profile import format_profile
    from .progress import log
    from .report import add_derived, evaluate_targets, format_console_summary, format_markdown, write_chart
    from .settings import BACKEND_KINDS, artifact_for, backend_availability, settings_for, size_of
    from .step_cost import step_graph_cost
    from .workloads import workloads

    t_start = time.perf_counter()
    work = out / "work"
    threads = os.cpu_count() or 1
    phases = {}
    t = time.perf_counter()
    described, artifacts, exports = _prepare(args.model, out, PRECISIONS, progress)
    phases["model_and_export"] = time.perf_counter() - t
    ref_dir = artifact_for("ort-fp32", artifacts)
    manifest = read_manifest(ref_dir)
    preset = args.model if args.model in ("tiny", "base") else None
    size = preset or size_of(manifest.model.to_dict())
    st = settings_for(size, args.quick)
    wls = workloads(st.src_lens)
    available = {kind: backend_availability(kind, artifacts) for kind in BACKEND_KINDS}
    progress.add(1 + sum(ok for ok, _ in available.values()) + 2)  # floors, backends, checks, profile
    results: dict = {
        "model": described | {"config": manifest.model.to_dict(), "size": size},
        "machine": machine_info(),
        "settings": asdict(st)
        | {
            "threads": threads,
            "quick": bool(args.quick),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "workloads": [[w.beam, w.batch, w.src_len] for w in wls],
        },
        "exports": exports,
        "backends": {},
        "phases_s": phases,
    }

    t = time.perf_counter()
    progress.stage("floors")
    log("measuring this machine's floors (GEMM, read bandwidth)")
    results["floors_quiet_gate"] = wait_for_quiet(st.quiet_wait_s) if st.quiet_wait_s else None
    results["floors"] = measure_floors(st.gemm_n, st.read_bytes)
    import onnx

    results["step_graph"] = {}
    for p, d in artifacts.items():
        g = onnx.load(str(d / "decoder_step.onnx"), load_external_data=False)
        results["step_graph"][p] = asdict(step_graph_cost(g))
        del g
    progress.done()
    phases["floors"] = time.perf_counter() - t

    t = time.perf_counter()
    for kind in BACKEND_KINDS:
        ok, reason = available[kind]
        if not ok:
            results["backends"][kind] = {"reason": reason, "cells": []}
            log(f"{kind}: {reason}")
            continue
        progress.stage(kind)
        log(f"{kind}: {len(wls)} workloads")
        spec = {
            "kind": kind,
            "artifact": str(artifact_for(kind, artifacts)),
            "n": st.n,
            "workloads": [[w.beam, w.batch, w.src_len] for w in wls if (kind, w.key) not in st.skip],
            "budget_s": st.budget_s,
            "max_reps": st.max_reps,
            "min_reps": st.min_reps,
            "seed": 0,
            "threads": threads,
            "quiet_wait_s": st.quiet_wait_s,
        }
        res, child = run_task("worker", spec, work, kind)
        progress.done()
        if res is None:
            results["backends"][kind] = {"error": child.stderr[-2000:], "cells": []}
            log(f"{kind}: failed\n{child.stderr[-2000:]}")
            continue
        res |= {"wall_s": child.wall_s, "others_cpu_share": round(child.others_cpu_share, 3)}
        results["backends"][kind] = res
    phases["backends"] = time.perf_counter() - t

    t = time.perf_counter()
    results["control"] = _control_run(args, out, st, artifacts, available, threads, work, progress)
    phases["control"] = time.perf_counter() - t

    t = time.perf_counter()
    progress.stage("memory check")
    log(f"memory check: deltalm translate through ort {ref_dir.name}")
    results["memory_check"] = memory_check(ref_dir, st.memory_lines, st.memory_len, threads, work)
    if preset == "tiny" and "fp32" in artifacts:
        progress.stage("agreement")
        results["agreement"] = measure_agreement(artifacts, Path(described["spm"]), Path(described["dict"]), threads)
    progress.done()
    phases["memory_and_agreement"] = time.perf_counter() - t

    t = time.perf_counter()
    precision = manifest.precision
    progress.stage("profile")
    log(f"profiling the {precision} decoder step (ONNX Runtime profiler)")
    prof_dir = out / "profile"
    prof_dir.mkdir(exist_ok=True)
    src = 30 if 30 in st.src_lens else st.src_lens[0]
    prof, child = run_task(
        "profile",
        {
            "artifact": str(ref_dir),
            "cases": [[5, 1, src], [5, 32, src]],
            "n": st.profile_steps,
            "threads": threads,
            "out_dir": str(prof_dir.resolve()),
        },
        work,
        "profile",
    )
    results["profile"] = prof if prof is not None else {"error": child.stderr[-2000:]}
    if prof is not None:
        (out / "profile.md").write_text(format_profile(prof, precision))
    progress.done()
    phases["profile"] = time.perf_counter() - t

    # the floors are physical limits: keep the best of a measurement before and after the run
    if st.quiet_wait_s:
        wait_for_quiet(st.quiet_wait_s)
    again = measure_floors(st.gemm_n, st.read_bytes)
    results["floors_at_end"] = again
    for key in ("gemm_numpy_gflops", "gemm_ort_gflops", "read_numpy_gbs", "read_ort_gbs", "gemm_gflops", "read_gbs"):
        results["floors"][key] = max(results["floors"][key], again[key])
    add_derived(results)
    results["targets"] = evaluate_targets(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = format_markdown(results)
    (out / "bench.md").write_text(md)
    write_chart(results, out / "bench.png")
    progress.close()
    print(format_console_summary(results, out), end="")
    log(f"wrote {out}/bench.json, bench.md, bench.png, profile.md in {results['wall_s']:.0f}s")
    return 0


CONTROL_KINDS = ("ort-fp32", "ort-int8")


def _control_run(args, out: Path, st, artifacts: dict, available: dict, threads: int, work: Path, progress) -> dict:
    """Decoding control (bench/control.py): per ort backend (fp32, int8) plain beam search against
    a target prefix and lexical constraints on one batch, and teacher-forced scoring against
    per-token teacher forcing, each in a child; then, on the demo model (this run's for --model
    tiny, built once under OUT/demo for base, the given one for an artifact directory), the share
    of constraints that reach the output."""
    from .children import run_task
    from .control import constraint_share
    from .models import export_artifacts, prepare_tiny
    from .progress import log
    from .settings import artifact_for

    kinds = [k for k in CONTROL_KINDS if available[k][0]]
    progress.add(len(kinds) + 1)
    src = 30 if 30 in st.src_lens else st.src_lens[0]
    control: dict = {"backends": {}}
    for kind in kinds:
        progress.stage(f"control {kind}")
        log(f"{kind}: decoding control (beam 5 x batch {st.control_batch}: plain, prefix, constraints; scoring)")
        spec = {
            "kind": kind,
            "artifact": str(artifact_for(kind, artifacts)),
            "threads": threads,
            "beam": 5,
            "batch": st.control_batch,
            "src_len": src,
            "n": st.n,
            "prefix_len": st.control_prefix_len,
            "constraints": st.control_constraints,
            "constraint_len": st.control_constraint_len,
            "reps": st.control_reps,
            "seed": 0,
            "quiet_wait_s": st.quiet_wait_s,
        }
        res, child = run_task("control", spec, work, f"control-{kind}")
        control["backends"][kind] = res if res is not None else {"error": child.stderr[-2000:]}
        progress.done()
    progress.stage("constraint share (demo model)")
    try:
        if args.model == "base":
            log(f"constraint share: the demo model (built once under {out / 'demo'})")
            files = prepare_tiny(out / "demo" / "model")
            export_artifacts(files, out / "demo" / "artifacts", ("fp32",))
            demo, which = out / "demo" / "artifacts" / "fp32", "the demo model"
        else:  # tiny: the demo model this run exported; an artifact directory: that model
            demo = artifact_for("ort-fp32", artifacts)
            which = "the demo model" if args.model == "tiny" else f"the artifact {demo.name}"
        control["constraint_share"] = constraint_share(demo, threads) | {"model": which, "artifact": str(demo)}
    except Exception as e:  # noqa: BLE001 - the report says why (no torch to build the demo model, ...)
        control["constraint_share"] = {"error": f"{type(e).__name__}: {e}"}
    progress.done()
    return control


def _export_memory_run(args, out: Path) -> int:
    from deltalm.errors import InputError

    from .export_memory import SHAPES, format_export_memory, run_export_memory
    from .models import PRECISIONS

    _require("torch", "export", "--export-memory")
    shapes = [s for s in args.shapes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [s for s in shapes if s not in SHAPES] + [p for p in precisions if p not in PRECISIONS]
    if bad or not shapes or not precisions:
        raise InputError(
            f"--shapes takes {', '.join(SHAPES)} and --precisions {', '.join(PRECISIONS)}; got "
            f"{', '.join(bad) or 'nothing'}"
        )
    t0 = time.perf_counter()
    results = run_export_memory(out, shapes, precisions)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    md = format_export_memory(results)
    (out / "export-memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "export-memory.md").write_text(md)
    print(md)
    return 0


def _write_report(out: Path, stem: str, results: dict, md: str, progress) -> int:
    """OUT/STEM.json (every figure) and OUT/STEM.md (the tables), the tables also on stdout."""
    from .progress import log

    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(md)
    progress.close()
    print(md)
    log(f"wrote {out}/{stem}.json, {stem}.md in {results['wall_s']:.0f}s")
    return 0


def _compare_run(args, out: Path, progress) -> int:
    import ctranslate2

    from deltalm.errors import InputError

    from .ct2_model import build_ct2_model, ct2_step_flops_per_token
    from .floors import machine_info
    from .progress import log
    from .report import format_compare_markdown
    from .settings import settings_for, size_of
    from .side_by_side import compare_side_by_side
    from .workloads import workloads

    t_start = time.perf_counter()
    threads = os.cpu_count() or 1
    described, artifacts, exports = _prepare(args.model, out, ("fp32", "int8"), progress)
    precisions = [p for p in ("fp32", "int8") if p in artifacts]
    if not precisions:
        raise InputError(
            f"--compare ctranslate2 compares fp32 or int8 artifacts; {args.model} is {', '.join(artifacts)}"
        )
    manifest = read_manifest(artifacts[precisions[0]])
    cfg = manifest.model
    size = args.model if args.model in ("tiny", "base") else size_of(cfg.to_dict())
    st = settings_for(size, args.quick)
    src = 30 if 30 in st.src_lens else st.src_lens[0]
    cells = workloads(src_lens=(src,))
    progress.add(len(precisions) * (1 + len(cells)))
    pairs = {}
    for p in precisions:
        progress.stage(f"ctranslate2 model {p}")
        log(f"compare: building the CTranslate2 model ({p}) in {out / 'ctranslate2' / p}")
        pairs[p] = {
            "ctranslate2": {"engine": "ctranslate2", "path": build_ct2_model(cfg, out / "ctranslate2" / p, p, seed=0)},
            "ours": {"engine": "ours", "path": artifacts[p]},
        }
        progress.done()
    cmp = compare_side_by_side(pairs, cells, st.n, st.compare_reps, threads, out / "work", st.quiet_wait_s, progress)
    cmp |= {"ctranslate2_version": ctranslate2.__version__, "seed": 0, "flops_per_token": ct2_step_flops_per_token(cfg)}
    results = {
        "model": described | {"config": cfg.to_dict(), "size": size},
        "machine": machine_info(),
        "exports": exports,
        "ctranslate2": cmp,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return _write_report(out, "compare", results, format_compare_markdown(results), progress)


def _shortlist_run(args, out: Path, progress) -> int:
    """Ours with and without a vocabulary shortlist, interleaved (the engines of --compare), and
    on the tiny demo model how many corpus sentences the shortlist leaves unchanged."""
    from deltalm.shortlist import Shortlist

    from .floors import machine_info
    from .measure import shortlist_agreement
    from .progress import log
    from .report import format_shortlist_markdown
    from .settings import settings_for, size_of
    from .side_by_side import cell_seed, compare_side_by_side
    from .workloads import make_sources, random_shortlist, workloads

    t_start = time.perf_counter()
    threads = os.cpu_count() or 1
    described, artifacts, exports = _prepare(args.model, out, ("fp32",), progress)
    precision, artifact = next(iter(artifacts.items()))
    cfg = read_manifest(artifact).model
    size = args.model if args.model in ("tiny", "base") else size_of(cfg.to_dict())
    st = settings_for(size, args.quick)
    cells = workloads(src_lens=(30 if 30 in st.src_lens else st.src_lens[0],))
    progress.add(2 + len(cells))
    progress.stage("shortlist")
    agreement = None
    path = Path(args.shortlist) if args.shortlist else out / "shortlist.npz"
    if args.shortlist:
        shortlist = Shortlist.load(path)
    elif args.model == "tiny":
        shortlist, agreement = shortlist_agreement(artifact, threads)
        shortlist.save(path)
    else:
        shortlist = random_shortlist(cfg.vocab_size)
        shortlist.save(path)
    log(f"compare: shortlist {path} ({shortlist.info.get('built_from', '?')})")
    progress.done()
    pairs = {
        precision: {
            "ours": {"engine": "ours", "path": artifact},
            "ours-shortlist": {"engine": "ours", "path": artifact, "shortlist": path},
        }
    }
    cmp = compare_side_by_side(pairs, cells, st.n, st.compare_reps, threads, out / "work", st.quiet_wait_s, progress)
    topk = read_manifest(artifact).export_options.topk
    cmp["candidates"] = {
        w.key: int(
            shortlist.candidates(
                make_sources(cfg.vocab_size, cfg.eos, cfg.pad, w.batch, w.src_len, cell_seed(w)),
                [cfg.eos, cfg.unk],
                topk + 3,
            ).size
        )
        for w in cells
    }
    results = {
        "model": described | {"config": cfg.to_dict(), "size": size},
        "machine": machine_info(),
        "exports": exports,
        "shortlist": cmp | {"file": str(path), "info": shortlist.info, "agreement": agreement},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return _write_report(out, "shortlist", results, format_shortlist_markdown(results), progress)


def run(args) -> int:
    return bench_command(args)
