"""``deltalm serve DIR``: the HTTP translation service; ``deltalm bench-serve``: its benchmark.
Argument parsing only: the service is ``deltalm.serve``."""

from __future__ import annotations

import argparse
import re
import sys

from ..artifact import require_directory_not_checkpoint
from ..atomic import check_output_directory
from ..backends import BACKENDS
from ..errors import InputError, install_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("dir", help="artifact directory (deltalm export)")
    m.add_argument("--backend", choices=BACKENDS, help="default: ort")
    m.add_argument("--device", choices=("cpu", "cuda"), help="ort / trt only (default: cpu for ort, cuda for trt)")
    m.add_argument("--threads", type=int, metavar="N", help="CPU threads of the backend")
    m.add_argument(
        "--src-prefix", nargs="+", metavar="SYM", help="default source prefix symbols (a request may give its own)"
    )
    m.add_argument("--tgt-prefix", nargs="+", metavar="SYM", help="default forced target prefix symbols")
    m.add_argument(
        "--shortlist",
        metavar="FILE",
        help="vocabulary shortlist of `deltalm shortlist`: every batch scores only its candidates "
        "(faster, approximate; ort; /health names it)",
    )

    h = parser.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    h.add_argument(
        "--port", type=int, default=8000, help="0: any free port (the ready line shows it) (default %(default)s)"
    )
    h.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level on stderr (default %(default)s)",
    )

    b = parser.add_argument_group("batching")
    b.add_argument(
        "--batching",
        choices=("inflight", "request"),
        default="inflight",
        help="inflight: sentences join the decoding batch at the next step and leave it when done; "
        "request: a batch forms while nothing decodes and runs to its last sentence "
        "(default %(default)s)",
    )
    b.add_argument(
        "--max-batch-rows",
        type=int,
        default=160,
        help="hypotheses decoding at once, beam x sentences (default %(default)s)",
    )
    b.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        help="padded source tokens decoding at once, sentences x longest source (default %(default)s)",
    )
    b.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="--batching request: how long a forming batch waits for more sentences (default %(default)s)",
    )
    b.add_argument(
        "--max-queue-sentences",
        type=int,
        default=1024,
        help="sentences waiting to join the batch at most; beyond, requests get 503 with Retry-After "
        "(default %(default)s)",
    )

    r = parser.add_argument_group("request limits")
    r.add_argument("--max-body-bytes", type=int, default=1 << 20, help="413 beyond (default %(default)s)")
    r.add_argument(
        "--max-sentences", type=int, default=64, help="sentences per request, 413 beyond (default %(default)s)"
    )
    r.add_argument(
        "--max-sentence-tokens",
        type=int,
        help="source tokens per sentence, 422 beyond (default: the model's positions)",
    )
    r.add_argument("--timeout-s", type=float, default=60.0, help="per request, 504 beyond (default %(default)s)")


def run(args) -> int:
    require_directory_not_checkpoint(args.dir, "serve")
    for flag in (
        "threads",
        "max_batch_rows",
        "max_batch_tokens",
        "max_queue_sentences",
        "max_body_bytes",
        "max_sentences",
        "max_sentence_tokens",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_wait_ms < 0 or args.timeout_s <= 0:
        raise InputError("--max-wait-ms must be >= 0 and --timeout-s > 0")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    try:
        from deltalm.serve.app import RequestLimits, create_app
        from deltalm.serve.scheduler import Scheduling
        from deltalm.serve.server import check_listen_address, serve_app
    except ImportError as e:
        raise InputError(f"deltalm serve needs the serve extra ({install_extra('serve')}): {e}") from None
    from ..translator import Translator

    check_listen_address(args.host, args.port)  # a busy port is one line, before the model loads

    # a bad model or shortlist fails here, before the port is bound
    translator = Translator(
        args.dir,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        src_prefix=args.src_prefix,
        tgt_prefix=args.tgt_prefix,
        shortlist=args.shortlist,
        warn=serve_warning,
    )
    max_src = translator.config.max_positions
    app = create_app(
        translator,
        Scheduling(
            args.batching, args.max_batch_rows, args.max_batch_tokens, args.max_queue_sentences, args.max_wait_ms / 1000
        ),
        RequestLimits(
            args.max_body_bytes, args.max_sentences, min(args.max_sentence_tokens or max_src, max_src), args.timeout_s
        ),
        shortlist_file=args.shortlist,
    )

    def ready(address: str) -> None:
        print(f"deltalm serve: ready on {address}", flush=True)

    try:
        serve_app(app, args.host, args.port, ready, log_level=args.log_level)
    finally:
        translator.close()
    print("deltalm serve: stopped", file=sys.stderr, flush=True)
    return 0


def serve_warning(message: str) -> None:
    """The translator's warnings number the sentences of the batch it decodes ("input line 1: ...
    truncated"), which mean nothing to a client: a batch mixes requests, and the API counts a
    request's sentences from 0. Said without the number."""
    message = re.sub(r"^input lines? [\d, -]+: ", "a sentence of a request: ", message)
    print(f"deltalm serve: warning: {message}", file=sys.stderr, flush=True)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (the demo model, exported here) | base (a random deltalm-base, exported here: "
        "~7 GB of memory) | an artifact directory",
    )
    parser.add_argument("--out", default="bench_out/serve", help="where bench.json / bench.md / bench.png go")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent clients per cell (default %(default)s)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="per cell (default %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="a cell's duration in this many rounds, the two servers taking turns (default %(default)s)",
    )
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument(
        "--length", type=int, default=20, help="target tokens forced per sentence (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of the server's backend (default %(default)s)")
    parser.add_argument("--max-batch-rows", type=int, default=160, help="of both servers (default %(default)s)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="of the --batching request server (default %(default)s)"
    )
    parser.add_argument("--modes", default="inflight,request", help="servers to measure (default %(default)s)")
    parser.add_argument(
        "--workloads",
        default="uniform,mixed",
        help="uniform (every output --length tokens) and / or mixed (mostly short requests, "
        "some long: --long-share, --long-tokens) (default %(default)s)",
    )
    parser.add_argument(
        "--long-share", type=float, default=0.1, help="mixed: share of long requests (default %(default)s)"
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=100,
        help="mixed: source and target tokens of a long request (default %(default)s)",
    )


def run_bench(args) -> int:
    from pathlib import Path

    try:
        from deltalm.serve.bench import BenchPlan
        from deltalm.serve.bench import run_bench as bench
    except ImportError as e:
        raise InputError(f"deltalm bench-serve needs the serve and bench extras: {e}") from None
    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        raise InputError(f"--clients takes numbers separated by commas, got {args.clients!r}") from None
    if min(clients) < 1 or args.duration_s <= 0 or args.length < 1 or args.beam < 1 or args.rounds < 1:
        raise InputError("--clients, --duration-s, --length, --beam and --rounds must be positive")
    out = Path(args.out)
    check_output_directory(out, "--out")  # before any model is built or loaded
    if args.model in ("tiny", "base"):
        from deltalm.serve.bench import prepare_artifact

        artifact, name = prepare_artifact(args.model, out), args.model
    else:
        artifact = Path(args.model)
        # an export's directory is often named "artifact": the report names its parent then
        name = artifact.resolve().parent.name if artifact.name == "artifact" else artifact.name
        if not (artifact / "manifest.json").exists():
            raise InputError(f"--model {args.model}: not tiny, base or an artifact directory")
    plan = BenchPlan(
        clients,
        args.beam,
        args.length,
        args.duration_s,
        args.threads,
        max_batch_rows=args.max_batch_rows,
        max_wait_ms=args.max_wait_ms,
        modes=tuple(args.modes.split(",")),
        workloads=tuple(args.workloads.split(",")),
        long_share=args.long_share,
        long_tokens=args.long_tokens,
        rounds=args.rounds,
    )
    if not set(plan.modes) <= {"inflight", "request"}:
        raise InputError(f"--modes takes inflight and / or request, got {args.modes!r}")
    if not set(plan.workloads) <= {"uniform", "mixed"}:
        raise InputError(f"--workloads takes uniform and / or mixed, got {args.workloads!r}")
    if not 0 <= args.long_share <= 1 or args.long_tokens < 1:
        raise InputError("--long-share must be between 0 and 1 and --long-tokens positive")
    bench(artifact, name, out, plan)
    return 0
