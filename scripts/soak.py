"""`make soak`: translate 10,000 lines with the tiny model through ONNX Runtime and check that the
process holds constant memory (RSS growth under 5% after a warm-up) and that every line is
answered, in order.

Without --artifact, the tiny demo model is fitted and exported (``deltalm export``) in a child
process first, so that this process imports only the runtime (no torch) and its RSS is the
runtime's. The lines are made on the fly: the input is never held whole."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def prepare(workdir: Path, steps: int) -> Path:
    """Fit the tiny demo model and export it (in this process: run as the child)."""
    import torch

    from deltalm.cli import main
    from deltalm.export.toy_model import build_demo_checkpoint

    torch.set_num_threads(1)  # threads waiting on each other on a busy machine cost more than they give
    spm, dict_path, ckpt = build_demo_checkpoint(workdir, steps=steps)
    artifact = workdir / "artifact"
    rc = main(["export", str(ckpt), "--spm", str(spm), "--dict", str(dict_path), "--out", str(artifact), "--force"])
    if rc != 0:
        sys.exit(rc)
    return artifact


def longest_line() -> str:
    """The longest line ``soak_lines`` can make: its four longest corpus sentences."""
    from deltalm.export.toy_data import toy_corpus

    return " ".join(sorted(toy_corpus(), key=len)[-4:])


def soak_lines(count: int, seed: int = 0):
    """``count`` input lines: corpus sentences alone and in runs of up to four, blank lines, and
    sentences with odd characters (control characters, other scripts, <unk> material)."""
    from deltalm.export.toy_data import toy_corpus

    corpus = toy_corpus()
    odd = ["\t", "\x00", "\u00a0", "\u3000", "ﬁ", "\U0001f600", "漢字", "«»", "\x85"]
    rng = random.Random(seed)
    for _ in range(count):
        r = rng.random()
        if r < 0.04:
            yield rng.choice(["", " ", "\t"]) + "\n"
        elif r < 0.10:
            s = rng.choice(corpus)
            cut = rng.randrange(len(s))
            yield s[:cut] + rng.choice(odd) + s[cut:] + "\n"
        else:
            yield " ".join(rng.choice(corpus) for _ in range(1 + int(rng.random() ** 3 * 4))) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", help="artifact directory to use (default: fit and export the tiny model)")
    p.add_argument("--workdir", help="where the tiny model is built (default: a temporary directory)")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument(
        "--warmup",
        type=int,
        default=1_000,
        help="lines translated before the RSS baseline (after one batch of the longest lines)",
    )
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-lines", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (memory, not speed, is measured)")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after the warm-up")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.prepare_only:
        prepare(Path(args.workdir), args.steps)
        return 0

    with tempfile.TemporaryDirectory(prefix="deltalm-soak-") as tmp:
        artifact = Path(args.artifact) if args.artifact else None
        if artifact is None:
            workdir = Path(args.workdir or tmp)
            print(
                f"soak: fitting the tiny model ({args.steps} steps) and exporting it to {workdir}/artifact", flush=True
            )
            subprocess.run(
                [sys.executable, __file__, "--prepare-only", "--workdir", str(workdir), "--steps", str(args.steps)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            artifact = workdir / "artifact"
        return soak(artifact, args)


def soak(artifact: Path, args) -> int:
    from deltalm import Translator

    assert "torch" not in sys.modules
    rss_start = rss_bytes()
    translator = Translator(artifact, backend="ort", device="cpu", threads=args.threads)
    tokenizer = translator.tokenizer
    rss_loaded = rss_bytes()
    options = {"beam": args.beam, "batch_size": args.batch_size, "chunk_lines": args.chunk_lines}

    # Warm-up, part 1: one full batch of the longest input, so that the allocators (ONNX Runtime's
    # arena, malloc) reach the high-water mark of the largest shapes now, not whenever the random
    # input happens to produce its longest batch. Part 2 is the first --warmup lines themselves.
    for _ in translator.translate_iterable([longest_line()] * args.batch_size, **options):
        pass
    rss_worst = rss_bytes()

    inputs = soak_lines(args.lines)
    blank: list[int] = []  # input lines with nothing to translate

    def read():
        for i, line in enumerate(inputs):
            if not tokenizer.pieces(line.rstrip("\n")):
                blank.append(i)
            yield line

    done = answered = empty_answers = 0
    baseline = None
    samples = []  # (lines done, rss) after each chunk past the warm-up
    t0 = time.perf_counter()
    for t in translator.translate_iterable(read(), **options):
        if t.index != done:
            print(f"soak: FAILED: line {done} answered as {t.index} (order lost)", file=sys.stderr)
            return 1
        done += 1
        if t.hypotheses:
            answered += 1
            empty_answers += t.text == ""
        if done % args.chunk_lines and done != args.lines:
            continue  # RSS is sampled once per chunk, as the chunk's last line comes out
        rss = rss_bytes()
        if baseline is None and done >= args.warmup:
            baseline = rss
        elif baseline is not None:
            samples.append((done, rss))
        print(f"\rsoak: {done}/{args.lines} lines, RSS {rss / 2**20:.1f} MiB", end="", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)

    blank_set = set(blank)
    unanswered = done - answered - len(blank_set)
    final = rss_bytes()
    peak = max([rss for _, rss in samples] or [final])
    growth = (final - baseline) / baseline if baseline else float("nan")
    peak_growth = (peak - baseline) / baseline if baseline else float("nan")
    ok = done == args.lines and unanswered == 0 and baseline is not None and growth < args.max_growth

    print(f"soak: {artifact} on ort (cpu), beam {args.beam}, batch {args.batch_size}, chunks of {args.chunk_lines}")
    print(f"  lines translated   {done} of {args.lines} ({len(blank_set)} blank, answered with empty lines)")
    print(
        f"  lines answered     {answered} with a hypothesis ({empty_answers} of them decode to empty text); "
        f"unanswered {unanswered}"
    )
    print(f"  time               {seconds:.1f} s, {done / seconds:.0f} lines/s")
    mib = 2**20
    print(
        f"  RSS                start {rss_start / mib:.1f} MiB, model loaded {rss_loaded / mib:.1f} MiB, "
        f"after a batch of the longest lines {rss_worst / mib:.1f} MiB, "
        f"after {args.warmup} lines {baseline / mib if baseline else float('nan'):.1f} MiB (baseline), "
        f"end {final / mib:.1f} MiB, peak after warm-up {peak / mib:.1f} MiB"
    )
    quarters = [samples[len(samples) * q // 4] for q in range(4)] + samples[-1:] if samples else []
    print("  RSS by lines done  " + ", ".join(f"{n}: {rss / mib:.1f} MiB" for n, rss in quarters))
    print(
        f"  RSS growth         {growth:+.2%} at the end, {peak_growth:+.2%} at the peak (limit {args.max_growth:.0%})"
    )
    print(f"soak: {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
