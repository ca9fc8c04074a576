"""``deltalm translate``: argument parsing and files around ``deltalm.Translator``.

Input: ``--input FILE`` (read ``--chunk-lines`` lines at a time, sorted and batched), or stdin.
stdin that is a file is read the same way; stdin that is a terminal or a pipe is answered as lines
arrive: every line that is there is translated at once (together with the others that are
waiting, up to ``--chunk-lines``), so an interactive user or a program that writes a line and
waits for the answer gets it without closing the input. ``--buffer-size N`` reads N lines before
translating, as fairseq-interactive does.
Output: stdout (flushed after every chunk) or ``--output FILE``, written atomically when complete.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from ..atomic import atomic_output, check_output_file
from ..backends import BACKENDS
from ..errors import InputError
from ..translator import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_LINES, TranslateOptions, Translator, format_translation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("source", nargs="?", help="artifact directory (spm.model, dict.txt, graphs / engines)")
    m.add_argument("--checkpoint", metavar="CKPT", help="translate straight from a checkpoint (torch backend)")
    m.add_argument("--spm", help="sentencepiece model, with --checkpoint")
    m.add_argument("--dict", help="fairseq dict.txt, with --checkpoint")
    m.add_argument("--config", help="preset name or JSON file overriding the architecture, with --checkpoint")
    m.add_argument(
        "--backend",
        choices=BACKENDS,
        help="default: ort for a directory, torch for --checkpoint; torch on a directory runs the "
        "checkpoint its manifest names",
    )
    m.add_argument("--device", choices=("cpu", "cuda"), help="ort / trt only (default: cpu for ort, cuda for trt)")
    m.add_argument("--threads", type=int, metavar="N", help="CPU threads of the backend")
    m.add_argument(
        "--shortlist",
        metavar="FILE",
        help="vocabulary shortlist of `deltalm shortlist`: score only its candidates (faster, approximate; ort)",
    )

    io_ = parser.add_argument_group("input / output")
    io_.add_argument("--input", metavar="FILE", help="text to translate, one sentence a line (default: stdin)")
    io_.add_argument("--output", metavar="FILE", help="written atomically when complete (default: stdout)")
    io_.add_argument(
        "--format",
        choices=("text", "jsonl"),
        default="text",
        help="jsonl: one record per line with the n-best ids, scores (natural log) and texts",
    )
    io_.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8 input: fail (strict) or translate with U+FFFD (replace)",
    )
    io_.add_argument(
        "--truncate",
        action="store_true",
        help="cut sources longer than the model's positions (a warning names each line)",
    )
    io_.add_argument(
        "--src-prefix",
        nargs="+",
        metavar="SYM",
        help="forced source prefix tokens, e.g. a language tag (put SOURCE before this option)",
    )
    io_.add_argument(
        "--tgt-prefix", nargs="+", metavar="SYM", help="forced target prefix tokens, removed from the output text"
    )
    io_.add_argument(
        "--target-prefix",
        metavar="FILE",
        help="one target prefix a line, parallel to the input (empty line: none): each translation "
        "starts with its prefix (tokenized as a target; kept in the output)",
    )
    io_.add_argument(
        "--constraints",
        nargs="?",
        const="ordered",
        choices=("ordered", "unordered"),
        help="lexically constrained decoding (fairseq-interactive's input: the source, then each "
        "constraint after a tab, on one line): every hypothesis contains each constraint, in the "
        "given order (ordered, the default) or in any (unordered)",
    )
    io_.add_argument(
        "--buffer-size",
        type=int,
        metavar="N",
        help="stdin: read N lines, then translate them (fairseq-interactive); default: translate "
        "whatever lines are waiting as soon as they arrive",
    )
    io_.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    add_search_arguments(parser)
    add_batching_arguments(parser)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The search options (also those of ``deltalm translate-corpus``), read by ``translate_options``."""
    s = parser.add_argument_group("search (fairseq SequenceGenerator semantics)")
    d = " (default %(default)s)"
    s.add_argument("--beam", type=int, default=5, help="beam size; with --sampling, samples per line" + d)
    s.add_argument("--nbest", type=int, default=1, help="hypotheses per line, more than 1 needs --format jsonl" + d)
    s.add_argument("--lenpen", type=float, default=1.0, help="score = sum of log-probs / length ** lenpen" + d)
    s.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * the sentence's source length + b" + d)
    s.add_argument("--max-len-b", type=int, default=200, help=d.strip())
    s.add_argument("--min-len", type=int, default=1, help="</s> banned before this many tokens" + d)
    s.add_argument("--unkpen", type=float, default=0.0, help="subtracted from <unk>'s log-prob" + d)
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams of this size" + d)
    s.add_argument("--sampling", action="store_true", help="sample instead of beam search")
    s.add_argument("--temperature", type=float, default=1.0, help=d.strip())
    s.add_argument(
        "--sampling-topk", type=int, default=-1, help="sample from the k most likely tokens (with --sampling)"
    )
    s.add_argument(
        "--sampling-topp", type=float, default=-1.0, help="sample from the nucleus of mass p (with --sampling)"
    )
    # the names of earlier versions, kept working (hidden: --topk is also export's in-graph k)
    s.add_argument("--topk", type=int, dest="sampling_topk", help=argparse.SUPPRESS)
    s.add_argument("--topp", type=float, dest="sampling_topp", help=argparse.SUPPRESS)
    s.add_argument("--seed", type=int, help="random seed of --sampling")


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    b = parser.add_argument_group("batching")
    b.add_argument(
        "--batch-size",
        type=int,
        help=f"sentences per batch (default {DEFAULT_BATCH_SIZE}; no limit when only --max-tokens is given)",
    )
    b.add_argument("--max-tokens", type=int, help="padded source tokens per batch (sentences x longest source)")
    b.add_argument(
        "--chunk-lines",
        type=int,
        default=DEFAULT_CHUNK_LINES,
        help="lines read, sorted by length and batched at a time",
    )


def translate_options(args) -> TranslateOptions:
    """The search options of the command line, checked (``OptionError`` naming the option)."""
    opts = TranslateOptions(
        beam=args.beam,
        nbest=args.nbest,
        lenpen=args.lenpen,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        min_len=args.min_len,
        unkpen=args.unkpen,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        sampling=args.sampling,
        temperature=args.temperature,
        sampling_topk=args.sampling_topk,
        sampling_topp=args.sampling_topp,
        seed=args.seed,
        truncate=args.truncate,
        constraint_order=getattr(args, "constraints", None) or "ordered",
    )
    opts.validate()
    return opts


def _batching(args) -> dict:
    batch_size = args.batch_size
    if batch_size is None and args.max_tokens is None:
        batch_size = DEFAULT_BATCH_SIZE
    for flag, value in (
        ("--batch-size", batch_size),
        ("--max-tokens", args.max_tokens),
        ("--chunk-lines", args.chunk_lines),
        ("--buffer-size", args.buffer_size),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    return {"batch_size": batch_size, "max_tokens": args.max_tokens}


def _check_model_arguments(args) -> None:
    """Contradictions between the model options, reported in the command line's terms."""
    given = [opt for opt in ("spm", "dict", "config") if getattr(args, opt, None)]
    if args.source and args.checkpoint:
        raise InputError(f"give an artifact directory ({args.source}) or --checkpoint ({args.checkpoint}), not both")
    if args.checkpoint:
        missing = [f"--{opt}" for opt in ("spm", "dict") if not getattr(args, opt, None)]
        if missing:
            raise InputError(f"--checkpoint needs {' and '.join(missing)}")
        if (args.backend or "torch") != "torch":
            raise InputError(
                f"--backend {args.backend} runs an artifact directory; a checkpoint runs with --backend torch"
            )
        if args.device == "cuda":
            raise InputError("--device applies to the ort and trt backends; the torch backend runs on the CPU")
        if not Path(args.checkpoint).exists():
            raise InputError(f"checkpoint {args.checkpoint} does not exist")
        if getattr(args, "shortlist", None):
            raise InputError("--shortlist runs on an artifact directory with --backend ort, not on a checkpoint")
        return
    if not args.source:
        hint = ""
        if args.src_prefix or args.tgt_prefix:
            hint = " (a directory written after --src-prefix / --tgt-prefix is read as a prefix symbol: put it first)"
        raise InputError(
            f"nothing to translate with: give an artifact directory or --checkpoint CKPT --spm SPM --dict DICT{hint}"
        )
    if given:
        raise InputError(
            f"{', '.join(f'--{opt}' for opt in given)} go with --checkpoint; an artifact directory has its own"
        )
    if Path(args.source).is_file():
        raise InputError(
            f"{args.source} is a file, not an artifact directory: translate a checkpoint with "
            f"`--checkpoint {args.source} --spm SPM --dict DICT`, or export it first with `deltalm export`"
        )
    backend = args.backend or "ort"
    if backend == "trt" and (args.device or "cuda") != "cuda":
        raise InputError("--backend trt runs on --device cuda only")
    if backend == "torch" and args.device == "cuda":
        raise InputError("--device applies to the ort and trt backends; the torch backend runs on the CPU")


def _check_paths(inp: str | None, out: str | None, prefixes: str | None = None) -> None:
    if inp is not None and not Path(inp).is_file():
        raise InputError(
            f"input file {inp} does not exist" if not Path(inp).exists() else f"--input {inp} is not a file"
        )
    if prefixes is not None and not Path(prefixes).is_file():
        raise InputError(f"--target-prefix {prefixes}: no such file")
    if out is not None:
        check_output_file(out, "--output")


def _warning(message: str) -> None:
    print(f"deltalm: warning: {message}", file=sys.stderr, flush=True)


def open_translator(args) -> Translator:
    """The Translator the model options name (the tokenizer, and so a wrong prefix symbol, is
    checked before the slow backend load)."""
    warn = _warning
    if args.checkpoint:
        return Translator(
            args.checkpoint,
            backend="torch",
            threads=args.threads,
            spm=args.spm,
            dictionary=args.dict,
            config=args.config,
            src_prefix=args.src_prefix,
            tgt_prefix=args.tgt_prefix,
            warn=warn,
        )
    return Translator(
        args.source,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        src_prefix=args.src_prefix,
        tgt_prefix=args.tgt_prefix,
        shortlist=args.shortlist,
        warn=warn,
    )


def _stdio_path(p: str | None) -> str | None:
    return None if p in (None, "-") else p


def _arriving_chunks(fd: int, max_lines: int) -> Iterator[list[bytes]]:
    """Lines of a pipe or terminal, grouped as they arrive: each chunk is every complete line that
    one read returned (at most ``max_lines`` a chunk), so nothing waits for lines not yet written."""
    pending = b""
    while True:
        block = os.read(fd, 1 << 16)
        if not block:
            if pending:
                yield [pending]
            return
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for i in range(0, len(lines), max_lines):
            yield [line + b"\n" for line in lines[i : i + max_lines]]


def _fixed_chunks(stream, size: int) -> Iterator[list[bytes]]:
    while chunk := [line for _, line in zip(range(size), stream)]:
        yield chunk


def _interactive_fd(stream) -> int | None:
    """The descriptor of ``stream`` when it is a pipe, terminal or socket (lines arrive over
    time); None for a regular file or an in-memory stream."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    mode = os.fstat(fd).st_mode
    return fd if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode) else None


class _Progress:
    """tqdm on stderr: input bytes read (so an ETA), lines done, lines/s and target tokens/s."""

    def __init__(self, total_bytes: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=max(total_bytes, 1),
            unit="B",
            unit_scale=True,
            desc="translate",
            file=sys.stderr,
            mininterval=0.2,
            dynamic_ncols=True,
        )
        self.lines = self.tokens = 0
        self.read = 0

    def update(self, done_bytes: int, lines: int, tokens: int) -> None:
        self.lines += lines
        self.tokens += tokens
        self.bar.update(done_bytes - self.read)
        self.read = done_bytes
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(
            f"{self.lines} lines, {self.lines / elapsed:.1f} lines/s, {self.tokens / elapsed:.0f} tok/s", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


def run(args) -> int:
    if args.nbest > 1 and args.format != "jsonl":
        raise InputError("--nbest > 1 needs --format jsonl (text output has one line per input line)")
    opts = translate_options(args)
    batching = _batching(args)
    _check_model_arguments(args)
    inp, out_path = _stdio_path(args.input), _stdio_path(args.output)
    _check_paths(inp, out_path, args.target_prefix)
    if args.constraints and (args.target_prefix or args.tgt_prefix):
        raise InputError(
            "--constraints cannot be combined with a forced target prefix (--target-prefix, --tgt-prefix): "
            "fairseq's constrained search drops the forced tokens"
        )
    translator = open_translator(args)
    if translator.topk and translator.config.vocab_size > opts.beam > translator.topk // 2 and not opts.sampling:
        print(
            f"deltalm: note: --beam {opts.beam} is more than half the artifact's in-graph top-k "
            f"({translator.topk}): every step fetches the full log-probs (slower); export with "
            f"--topk {2 * opts.beam} for the fast path",
            file=sys.stderr,
        )

    with contextlib.ExitStack() as stack:
        stack.callback(translator.close)
        if inp is None:
            source = sys.stdin.buffer
            if args.buffer_size:
                chunks = _fixed_chunks(source, args.buffer_size)
            elif (fd := _interactive_fd(source)) is not None:
                chunks = _arriving_chunks(fd, args.chunk_lines)
            else:
                chunks = _fixed_chunks(source, args.chunk_lines)
        else:
            try:
                source = stack.enter_context(open(inp, "rb"))
            except OSError as e:
                raise InputError(f"cannot read --input {inp}: {e.strerror or e}") from None
            chunks = _fixed_chunks(source, args.chunk_lines)
        if out_path is None:
            sys.stdout.flush()
            out = sys.stdout.buffer
        else:
            out = stack.enter_context(atomic_output(out_path))
        progress = None
        if inp is not None and not args.no_progress and sys.stderr.isatty():
            progress = _Progress(os.fstat(source.fileno()).st_size)
            stack.callback(progress.close)  # runs first on the way out: errors start on a new line
        counts = {"lines": 0, "tokens": 0}

        def feed_of(chunks) -> Iterator[list[bytes]]:
            # translate_chunks asks for the next chunk only once every translation of the previous
            # one has been yielded (and written): the moment to flush and to show progress
            for chunk in chunks:
                yield chunk
                if out_path is None:
                    out.flush()
                if progress:
                    progress.update(source.tell(), counts["lines"], counts["tokens"])
                counts["lines"] = counts["tokens"] = 0

        # per line, in step with the chunks' lines (None: not given)
        target_prefix: Iterator[str | None] | None = None
        constraints: Iterator[list[str]] | None = None
        if args.target_prefix:
            prefix_file = stack.enter_context(open(args.target_prefix, "rb"))
            target_prefix = (_text_of(line, args.target_prefix, k) or None for k, line in enumerate(prefix_file))
        if args.constraints:
            chunks, constraints = _split_constraints(chunks)
        for t in translator.translate_chunks(
            feed_of(chunks),
            options=opts,
            errors=args.errors,
            source=inp,
            **batching,
            target_prefix=target_prefix,
            constraints=constraints,
        ):
            out.write((format_translation(t, args.format) + "\n").encode("utf-8"))
            counts["lines"] += 1
            counts["tokens"] += len(t.hypotheses[0].tokens) if t.hypotheses else 0
    return 0


def _text_of(line: bytes, name: str, index: int) -> str:
    try:
        return line.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise InputError(f"{name} line {index + 1} is not valid UTF-8") from None


def _split_constraints(chunks: Iterator[list[bytes]]) -> tuple[Iterator[list[bytes]], Iterator[list[str]]]:
    """fairseq-interactive's input with --constraints: ``source<TAB>constraint<TAB>...`` a line.
    Returns the chunks of sources and, in step, each line's constraints: the translator reads a
    chunk's constraints right after the chunk, when they are there."""
    pending: collections.deque[list[str]] = collections.deque()

    def sources() -> Iterator[list[bytes]]:
        for chunk in chunks:
            out = []
            for line in chunk:
                text, *terms = line.rstrip(b"\r\n").split(b"\t")
                out.append(text + b"\n")
                pending.append([t.decode("utf-8", errors="replace") for t in terms])
            yield out

    def constraints() -> Iterator[list[str]]:
        while pending:
            yield pending.popleft()

    return sources(), constraints()
