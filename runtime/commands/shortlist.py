"""``deltalm shortlist``: build a vocabulary shortlist for an artifact from a corpus (argument
parsing and files around ``deltalm.shortlist_from_corpus``)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..artifact import require_directory_not_checkpoint
from ..atomic import check_output_file
from ..errors import InputError
from ..shortlist import FREQUENT, PER_SOURCE, shortlist_from_corpus
from ..tokenizer import read_text_lines
from ..translator import Translator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_model", metavar="DIR", help="artifact directory the shortlist is for")
    parser.add_argument(
        "--source", required=True, metavar="FILE", help="source side of the corpus, one sentence a line"
    )
    parser.add_argument(
        "--target",
        metavar="FILE",
        help="target side (a parallel corpus, same line order); without it the model translates --source "
        "(full vocabulary) and its own translations are the target side",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="shortlist file to write (.npz), atomically")
    parser.add_argument(
        "--frequent",
        type=int,
        default=FREQUENT,
        help=f"most frequent target tokens, always candidates (default {FREQUENT})",
    )
    parser.add_argument(
        "--per-source",
        type=int,
        default=PER_SOURCE,
        help=f"target tokens kept per source token, by Dice association (default {PER_SOURCE})",
    )
    parser.add_argument("--min-count", type=int, default=1, help="sentences a pair must co-occur in (default 1)")
    parser.add_argument("--beam", type=int, default=5, help="beam of the model's own translations (default 5)")
    parser.add_argument("--src-prefix", nargs="+", metavar="SYM", help="source prefix symbols (e.g. a language tag)")
    parser.add_argument("--tgt-prefix", nargs="+", metavar="SYM", help="forced target prefix symbols")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads of the backend")


def run(args) -> int:
    require_directory_not_checkpoint(args.source_model, "shortlist")
    check_output_file(args.out, "--out")
    for flag, value in (("--frequent", args.frequent), ("--per-source", args.per_source)):
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if args.min_count < 1:
        raise InputError(f"--min-count must be >= 1, got {args.min_count}")
    sources = read_text_lines(args.source)
    targets = read_text_lines(args.target) if args.target else None
    with Translator(
        args.source_model, threads=args.threads, src_prefix=args.src_prefix, tgt_prefix=args.tgt_prefix
    ) as translator:
        shortlist = shortlist_from_corpus(
            translator,
            sources,
            targets,
            options={"beam": args.beam},
            frequent=args.frequent,
            per_source=args.per_source,
            min_count=args.min_count,
        )
    shortlist.save(args.out)
    lists = np.diff(shortlist.offsets)
    covered = int(np.count_nonzero(lists))
    print(
        f"wrote {args.out}: {len(sources)} sentences ({shortlist.info['built_from']}); {shortlist.frequent.size} "
        f"frequent tokens; {covered} source tokens with {lists.sum() / max(covered, 1):.1f} candidates each "
        f"(vocabulary {shortlist.vocab_size})",
        file=sys.stderr,
    )
    return 0
