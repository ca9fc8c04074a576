"""``deltalm score``: the score of given translations (argument parsing and files around
``deltalm.Translator.score_batch``): one result per line pair of ``--source`` and ``--target``."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..artifact import require_directory_not_checkpoint
from ..atomic import atomic_output, check_output_file
from ..backends import BACKENDS
from ..errors import InputError
from ..tokenizer import read_text_lines
from ..translator import Translator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="artifact directory (deltalm export)")
    parser.add_argument("--source", required=True, metavar="FILE", help="source sentences, one a line")
    parser.add_argument("--target", required=True, metavar="FILE", help="their translations, one a line (same order)")
    parser.add_argument(
        "--format",
        choices=("text", "jsonl"),
        default="text",
        help="text: the score of each pair; jsonl: {id, tokens, score, positional_scores} (default %(default)s)",
    )
    parser.add_argument("--output", metavar="FILE", help="written atomically when complete (default: stdout)")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "trt"], help="default: ort")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads of the backend")
    parser.add_argument("--src-prefix", nargs="+", metavar="SYM", help="source prefix symbols (e.g. a language tag)")
    parser.add_argument(
        "--tgt-prefix",
        nargs="+",
        metavar="SYM",
        help="target prefix symbols, put before every target (as translations have them)",
    )
    parser.add_argument("--truncate", action="store_true", help="cut sources longer than the model's positions")
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="padded target tokens per decoder run (default: as many as 256 MB of logits hold)",
    )


def run(args) -> int:
    require_directory_not_checkpoint(args.model, "score")
    if args.output:
        check_output_file(args.output, "--output")
    for flag, value in (("--threads", args.threads), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    sources, targets = read_text_lines(args.source, "--source"), read_text_lines(args.target, "--target")
    if len(sources) != len(targets):
        raise InputError(
            f"--source {args.source} has {len(sources)} lines but --target {args.target} has "
            f"{len(targets)}: give one translation per source line"
        )
    with Translator(
        args.model, backend=args.backend, threads=args.threads, src_prefix=args.src_prefix, tgt_prefix=args.tgt_prefix
    ) as translator:
        scores = translator.score_batch(
            sources, targets, truncate=args.truncate, max_tokens=args.max_tokens, source_name=args.source
        )
    lines = [s.to_json() if args.format == "jsonl" else repr(s.score) for s in scores]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_output(args.output)) if args.output else sys.stdout.buffer
        out.write("".join(line + "\n" for line in lines).encode("utf-8"))
        out.flush()
    return 0
