"""Ray's cost on one machine: ``translate-corpus`` with 1 and 2 actors (one thread each) against
``deltalm translate --threads 2`` on the same file, outputs checked identical.

    python -m deltalm.cluster.bench --artifact DIR [--lines 400] [--chunk-lines 50]

Prints one line per run (wall time, lines/s, target tokens/s) and, for the Ray runs, the start-up
(``ray.init``, first translated chunk: actor start and model load) and an estimate of the cost of
one actor call beyond the translation itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "die katze sieht den roten apfel der hund schläft im haus ein kind liest das buch wir gehen "
    "heute nach hause morgen regnet es in der stadt"
).split()


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltalm.cluster.bench", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--lines", type=int, default=400)
    p.add_argument("--chunk-lines", type=int, default=50)
    p.add_argument("--search", default="--beam 4 --max-len-b 32", help="search options of both commands")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from . import ClusterOptions, CorpusJob, translate_corpus

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltalm-corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corpus.txt"
    src.write_text("\n".join(corpus_lines(args.lines)) + "\n")
    search = args.search.split()
    deltalm = Path(sys.executable).parent / "deltalm"
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; {args.lines} lines, "
        f"--chunk-lines {args.chunk_lines}, {args.search}"
    )

    ref = work / "translate.txt"
    t = time.perf_counter()
    subprocess.run(
        [
            str(deltalm),
            "translate",
            args.artifact,
            "--input",
            str(src),
            "--output",
            str(ref),
            "--threads",
            "2",
            "--chunk-lines",
            str(args.chunk_lines),
            "--no-progress",
            *search,
        ],
        check=True,
    )
    wall = time.perf_counter() - t
    print(f"deltalm translate --threads 2: {wall:.1f} s wall (model load included), {args.lines / wall:.1f} lines/s")

    opts = _search_options(search)
    for actors in (1, 2):
        out = work / f"ray{actors}"
        t = time.perf_counter()
        s = translate_corpus(
            CorpusJob(args.artifact, options=opts, chunk_lines=args.chunk_lines),
            [str(src)],
            out,
            progress=False,
            cluster=ClusterOptions(actors=actors, threads_per_actor=1),
            log=lambda line: None,
        )
        wall = time.perf_counter() - t
        same = (out / src.name).read_bytes() == ref.read_bytes()
        busy = sum(a.busy_seconds for a in s.actors.values())
        busiest = max(a.busy_seconds for a in s.actors.values())
        print(
            f"translate-corpus --actors {actors} --threads-per-actor 1: {wall:.1f} s wall, "
            f"{s.lines / wall:.1f} lines/s, {s.tokens / wall:.0f} tok/s; identical to translate: {same}"
        )
        print(
            f"  ray.init {s.ray_init_seconds:.1f} s, first chunk back after {s.first_result_seconds:.1f} s, "
            f"pipeline {s.pipeline_seconds:.1f} s, {s.calls} actor calls, actors busy {busy:.1f} s in total; "
            f"pipeline time not spent translating by the busiest actor: {s.pipeline_seconds - busiest:.1f} s "
            f"(actor start, model load, moving {s.calls} chunks)"
        )
        for name, a in sorted(s.actors.items()):
            print(
                f"  actor {name}: {a.lines} lines in {a.busy_seconds:.1f} s busy "
                f"({a.lines / max(a.busy_seconds, 1e-9):.1f} lines/s)"
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


def _search_options(search: list[str]):
    """``["--beam", "4", "--max-len-b", "32", "--sampling"]`` -> TranslateOptions (a flag without a
    value is true; values are read as JSON numbers where they parse)."""
    import json

    from ..translator import TranslateOptions

    values: dict = {}
    i = 0
    while i < len(search):
        name = search[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(search) and not search[i + 1].startswith("--"):
            try:
                values[name] = json.loads(search[i + 1])
            except ValueError:
                values[name] = search[i + 1]
            i += 2
        else:
            values[name] = True
            i += 1
    return TranslateOptions.from_mapping(values)


if __name__ == "__main__":
    sys.exit(main())
