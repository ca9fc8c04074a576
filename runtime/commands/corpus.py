"""``deltalm translate-corpus``: argument parsing around ``deltalm.cluster.translate_corpus``.

The search and batching options are ``deltalm translate``'s (same definitions); Ray is imported
only when the command runs (the ``ray`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..artifact import require_directory_not_checkpoint
from ..atomic import check_output_directory
from ..backends import BACKENDS
from ..errors import InputError
from ..translator import DEFAULT_BATCH_SIZE
from .translate import add_batching_arguments, add_search_arguments, translate_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("source", help="artifact directory (every node reads it at this path)")
    m.add_argument("--backend", choices=BACKENDS, help="default: ort (trt needs --gpus-per-actor)")
    m.add_argument(
        "--shortlist",
        metavar="FILE",
        help="vocabulary shortlist of `deltalm shortlist` for every actor (every node reads it at this "
        "path; ort): faster, approximate; its SHA-256 is part of the resume fingerprint",
    )

    io_ = parser.add_argument_group("input / output")
    io_.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files, one sentence a line: local paths or URIs pyarrow reads (s3://, gs://, hdfs://)",
    )
    io_.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="NAME.txt is written to DIR/NAME.txt (text) or DIR/NAME.jsonl, each file atomically",
    )
    io_.add_argument(
        "--format",
        choices=("text", "jsonl"),
        default="text",
        help="as deltalm translate (jsonl ids are line numbers in the input file)",
    )
    io_.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8 input: fail (strict) or translate with U+FFFD (replace)",
    )
    io_.add_argument("--truncate", action="store_true", help="cut sources longer than the model's positions")
    io_.add_argument("--src-prefix", nargs="+", metavar="SYM", help="forced source prefix tokens (put SOURCE first)")
    io_.add_argument(
        "--tgt-prefix", nargs="+", metavar="SYM", help="forced target prefix tokens, removed from the text"
    )
    io_.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")

    c = parser.add_argument_group("cluster")
    c.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (ray start --head prints it; default: $RAY_ADDRESS, else a local Ray runtime)",
    )
    c.add_argument("--actors", type=int, default=1, help="translator actors, one model each (default %(default)s)")
    c.add_argument(
        "--threads-per-actor", type=int, default=1, help="CPU threads (and Ray CPUs) per actor (default %(default)s)"
    )
    c.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="GPUs per actor; > 0 runs the backend on cuda (ort CUDA / trt) (default %(default)s)",
    )
    c.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times a dead actor is restarted and its batches retried (default %(default)s)",
    )

    add_search_arguments(parser)
    add_batching_arguments(parser)


def run(args) -> int:
    from ..cluster import ClusterOptions, CorpusJob, translate_corpus

    require_directory_not_checkpoint(args.source, "translate-corpus")
    check_output_directory(args.output, "--output")  # before Ray starts or a model is loaded
    opts = translate_options(args)
    batch_size = args.batch_size
    if batch_size is None and args.max_tokens is None:
        batch_size = DEFAULT_BATCH_SIZE
    for flag, value in (
        ("--batch-size", batch_size),
        ("--max-tokens", args.max_tokens),
        ("--chunk-lines", args.chunk_lines),
    ):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.backend == "trt" and args.gpus_per_actor <= 0:
        raise InputError("--backend trt runs on GPUs: give --gpus-per-actor")
    cluster = ClusterOptions(
        address=args.address,
        actors=args.actors,
        threads_per_actor=args.threads_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        max_restarts=args.max_restarts,
    )
    job = CorpusJob(
        args.source,
        fmt=args.format,
        options=opts,
        batch_size=batch_size,
        max_tokens=args.max_tokens,
        chunk_lines=args.chunk_lines,
        errors=args.errors,
        backend=args.backend,
        src_prefix=tuple(args.src_prefix) if args.src_prefix else None,
        tgt_prefix=tuple(args.tgt_prefix) if args.tgt_prefix else None,
        shortlist=args.shortlist,
    )
    translate_corpus(
        job, args.input, args.output, cluster=cluster, progress=not args.no_progress and sys.stderr.isatty()
    )
    return 0
