"""File-level translation: ``deltalm translate``.

The input is read in chunks of ``chunk_lines`` lines (never the whole file); inside a chunk the
sentences are sorted by source length (longest first, so a batch that does not fit in memory fails
at once), cut into batches by sentence count and / or padded tokens, decoded with the one search
loop, and written back in input order: exactly one output per input line.

Line numbers in messages are 1-based (as editors count); JSONL ``id`` fields are 0-based.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import MANIFEST, read_manifest, verify_files
from .atomic import atomic_output, previous_artifact_of
from .backends import BACKENDS, load_backend
from .errors import DeltaLMError, InputError
from .search import Hypothesis, SearchOptions, generate
from .tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHUNK_LINES = 2000


def _warn_stderr(message: str) -> None:
    print(f"deltalm: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class StreamOptions:
    """How lines are read, checked and batched (what to search for is ``SearchOptions``)."""

    batch_size: int | None = DEFAULT_BATCH_SIZE  # sentences per batch; None: only max_tokens limits
    max_tokens: int | None = None  # padded source width x rows per batch
    chunk_lines: int = DEFAULT_CHUNK_LINES  # lines read (and sorted) at a time
    truncate: bool = False  # cut over-long sources (with a warning) instead of failing
    errors: str = "strict"  # invalid UTF-8 input: "strict" fails, "replace" puts U+FFFD
    warn: Callable[[str], None] = _warn_stderr

    def validate(self) -> None:
        if self.batch_size is None and self.max_tokens is None:
            raise InputError("give --batch-size or --max-tokens")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.chunk_lines < 1:
            raise InputError(f"--chunk-lines must be >= 1, got {self.chunk_lines}")
        if self.errors not in ("strict", "replace"):
            raise InputError(f"--errors must be strict or replace, got {self.errors!r}")


@dataclass
class Translation:
    """The result for one input line."""

    index: int  # 0-based input line number
    hypotheses: list[Hypothesis] = field(default_factory=list)  # n-best, best first; [] for an empty line
    texts: list[str] = field(default_factory=list)  # text of each hypothesis, forced target prefix removed

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def to_json(self) -> dict:
        return {
            "id": self.index,
            "nbest": [
                {
                    "tokens": list(h.tokens),
                    "score": _json_float(h.score),
                    "positional_scores": [_json_float(s) for s in h.positional_scores],
                    "text": text,
                }
                for h, text in zip(self.hypotheses, self.texts)
            ],
        }


def _json_float(x: float) -> float | None:
    # JSON has no -inf / NaN; null keeps every line parseable by strict readers.
    x = float(x)
    return x if math.isfinite(x) else None


def format_translation(t: Translation, fmt: str) -> str:
    """One output line, without its newline."""
    if fmt == "jsonl":
        return json.dumps(t.to_json(), ensure_ascii=False)
    return t.text


# --- the pipeline (no files) ----------------------------------------------------------------------


def translate_stream(
    backend,
    tokenizer: Tokenizer,
    lines: Iterable[str | bytes],
    search_opts: SearchOptions,
    opts: StreamOptions | None = None,
) -> Iterator[list[Translation]]:
    """Translate ``lines`` (str, or bytes decoded as UTF-8; a trailing "\\n" / "\\r\\n" is
    ignored). Options and model limits are checked now; the lines are then read lazily,
    ``opts.chunk_lines`` at a time, and the returned iterator yields one list per chunk: its
    translations in input order, one per line. A failing batch raises a DeltaLMError naming its
    input lines."""
    opts = opts or StreamOptions()
    opts.validate()
    search_opts.validate()
    _check_model(backend, tokenizer, search_opts)
    return _chunks(backend, tokenizer, iter(lines), search_opts, opts)


def _check_model(backend, tokenizer: Tokenizer, search_opts: SearchOptions) -> None:
    """What the model must allow for every sentence, checked once (not once per batch)."""
    cfg = backend.cfg
    if len(tokenizer) > cfg.vocab_size:
        raise InputError(
            f"the dictionary has {len(tokenizer)} symbols but the model's vocabulary only "
            f"{cfg.vocab_size}: {tokenizer.dict_path} does not belong to this model"
        )
    if search_opts.beam >= cfg.vocab_size:
        raise InputError(f"--beam {search_opts.beam} must be smaller than the vocabulary ({cfg.vocab_size})")
    if len(tokenizer.src_prefix) + 2 > cfg.max_positions:
        raise InputError(
            f"the source prefix ({len(tokenizer.src_prefix)} tokens) leaves no room for text in the "
            f"model's {cfg.max_positions} source positions"
        )
    if search_opts.min_len > cfg.max_positions - 1:
        raise InputError(f"--min-len {search_opts.min_len} exceeds the model's maximum length {cfg.max_positions - 1}")
    limit = getattr(backend, "max_target_len", None)  # TensorRT: the engine profile's past_len maximum
    if limit is not None and search_opts.max_len_a == 0 and min(search_opts.max_len_b, cfg.max_positions - 1) > limit:
        raise InputError(
            f"--max-len-b {search_opts.max_len_b} exceeds the {limit} target tokens the TensorRT engines were built "
            f"for; pass --max-len-b {limit} or rebuild them with `deltalm engines DIR --max-tgt-len ...`"
        )


def _chunks(backend, tokenizer, lines: Iterator, search_opts, opts) -> Iterator[list[Translation]]:
    start = 0
    while True:
        chunk = list(itertools.islice(lines, opts.chunk_lines))
        if not chunk:
            return
        yield _translate_chunk(backend, tokenizer, chunk, start, search_opts, opts)
        start += len(chunk)


def _decode_line(raw: str | bytes, index: int, errors: str) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise InputError(
                f"input line {index + 1} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1}); pass --errors replace to translate it with U+FFFD for bad bytes"
            ) from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise InputError(f"input line {index + 1} is a {type(raw).__name__}, not text")
    text = text.removesuffix("\n").removesuffix("\r")
    if index == 0:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not text
    return text


def _translate_chunk(backend, tokenizer, chunk, start, search_opts, opts) -> list[Translation]:
    max_src = backend.cfg.max_positions  # source tokens, source prefix and </s> included
    bare = len(tokenizer.src_prefix) + 1  # length of a source with no text
    results: list[Translation | None] = [None] * len(chunk)
    sources: list[tuple[int, list[int]]] = []  # (position in chunk, ids)
    for k, raw in enumerate(chunk):
        line_no = start + k + 1
        try:
            ids = tokenizer.encode(_decode_line(raw, start + k, opts.errors))
        except DeltaLMError as e:
            if str(e).startswith("input line"):
                raise
            raise type(e)(f"input line {line_no}: {e}") from None
        if len(ids) == bare:  # nothing sentencepiece keeps (empty / blank line): nothing to decode
            results[k] = Translation(start + k)
            continue
        if len(ids) > max_src:
            if not opts.truncate:
                raise InputError(
                    f"input line {line_no} has {len(ids)} source tokens (with </s> and the source "
                    f"prefix); the model takes at most {max_src}. Pass --truncate to cut it"
                )
            opts.warn(f"input line {line_no}: {len(ids)} source tokens, truncated to the model's {max_src}")
            ids = ids[: max_src - 1] + [tokenizer.eos]
        if opts.max_tokens is not None and len(ids) > opts.max_tokens:
            raise InputError(
                f"input line {line_no} has {len(ids)} source tokens, more than --max-tokens {opts.max_tokens}"
            )
        sources.append((k, ids))

    prefix = list(search_opts.prefix_tokens)
    by_length = sorted(sources, key=lambda s: (-len(s[1]), s[0]))
    for batch in make_batches(by_length, opts.batch_size, opts.max_tokens):
        try:
            nbest = generate(backend, tokenizer.collate([ids for _, ids in batch]), search_opts)
            for (k, _), hyps in zip(batch, nbest):
                results[k] = Translation(start + k, hyps, [_hypothesis_text(tokenizer, h.tokens, prefix) for h in hyps])
        except Exception as e:
            raise _batch_error(e, sorted(start + k + 1 for k, _ in batch)) from e
    return results  # type: ignore[return-value]  # every slot is filled above


def make_batches(
    items: list[tuple[int, list[int]]], batch_size: int | None, max_tokens: int | None
) -> list[list[tuple[int, list[int]]]]:
    """Cut ``items`` (in their order) into batches of at most ``batch_size`` rows and at most
    ``max_tokens`` padded tokens (rows x longest source); a None limit does not apply."""
    batches: list[list[tuple[int, list[int]]]] = []
    current: list[tuple[int, list[int]]] = []
    width = 0
    for item in items:
        w = max(width, len(item[1]))
        full = (batch_size is not None and len(current) + 1 > batch_size) or (
            max_tokens is not None and w * (len(current) + 1) > max_tokens
        )
        if current and full:
            batches.append(current)
            current, w = [], len(item[1])
        current.append(item)
        width = w
    if current:
        batches.append(current)
    return batches


def _hypothesis_text(tokenizer: Tokenizer, tokens: list[int], prefix: list[int]) -> str:
    if prefix and tokens[: len(prefix)] == prefix:
        tokens = tokens[len(prefix) :]
    return tokenizer.decode(tokens)


def _line_ranges(numbers: list[int], limit: int = 12) -> str:
    """[3, 4, 5, 9] -> "3-5, 9" (at most ``limit`` ranges shown)."""
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(numbers), key=lambda p: p[1] - p[0]):
        run = [n for _, n in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    shown = ", ".join(ranges[:limit])
    return shown if len(ranges) <= limit else f"{shown}, ... ({len(numbers)} lines)"


def _batch_error(e: Exception, line_numbers: list[int]) -> DeltaLMError:
    where = f"input line{'s' if len(line_numbers) > 1 else ''} {_line_ranges(line_numbers)}"
    if isinstance(e, DeltaLMError):
        try:
            return type(e)(f"{where}: {e}")
        except TypeError:  # a subclass with another constructor
            pass
    return DeltaLMError(f"translation failed for {where}: {type(e).__name__}: {e}")


# --- the command ----------------------------------------------------------------------------------


def add_translate_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("source", nargs="?", help="artifact directory (spm.model, dict.txt, graphs / engines)")
    m.add_argument("--checkpoint", metavar="CKPT", help="translate straight from a checkpoint (torch backend)")
    m.add_argument("--spm", help="sentencepiece model, with --checkpoint")
    m.add_argument("--dict", help="fairseq dict.txt, with --checkpoint")
    m.add_argument("--config", help="preset name or JSON file overriding the architecture, with --checkpoint")
    m.add_argument("--backend", choices=BACKENDS, help="default: ort for a directory, torch for --checkpoint")
    m.add_argument("--device", choices=("cpu", "cuda"), help="ort / trt only (default: cpu for ort, cuda for trt)")
    m.add_argument("--threads", type=int, metavar="N", help="CPU threads of the backend")

    io_ = parser.add_argument_group("input / output")
    io_.add_argument("--input", metavar="FILE", help="text to translate, one sentence a line (default: stdin)")
    io_.add_argument("--output", metavar="FILE", help="written atomically when complete (default: stdout)")
    io_.add_argument("--format", choices=("text", "jsonl"), default="text")
    io_.add_argument("--errors", choices=("strict", "replace"), default="strict",
                     help="invalid UTF-8 input: fail (strict) or translate with U+FFFD (replace)")
    io_.add_argument("--truncate", action="store_true",
                     help="cut sources longer than the model's positions (a warning names each line)")
    io_.add_argument("--src-prefix", nargs="+", metavar="SYM",
                     help="forced source prefix tokens, e.g. a language tag (put SOURCE before this option)")
    io_.add_argument("--tgt-prefix", nargs="+", metavar="SYM",
                     help="forced target prefix tokens, removed from the output text")
    io_.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    s = parser.add_argument_group("search (fairseq SequenceGenerator semantics)")
    d = " (default %(default)s)"
    s.add_argument("--beam", type=int, default=5, help="beam size; with --sampling, samples per line" + d)
    s.add_argument("--nbest", type=int, default=1, help="hypotheses per line, more than 1 needs --format jsonl" + d)
    s.add_argument("--lenpen", type=float, default=1.0, help="score = sum of log-probs / length ** lenpen" + d)
    s.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * source width + b" + d)
    s.add_argument("--max-len-b", type=int, default=200, help=d.strip())
    s.add_argument("--min-len", type=int, default=1, help="</s> banned before this many tokens" + d)
    s.add_argument("--unkpen", type=float, default=0.0, help="subtracted from <unk>'s log-prob" + d)
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams of this size" + d)
    s.add_argument("--sampling", action="store_true", help="sample instead of beam search")
    s.add_argument("--temperature", type=float, default=1.0, help=d.strip())
    s.add_argument("--topk", type=int, default=-1, help="sample from the k most likely tokens (with --sampling)")
    s.add_argument("--topp", type=float, default=-1.0, help="sample from the nucleus of mass p (with --sampling)")
    s.add_argument("--seed", type=int, help="random seed of --sampling")

    b = parser.add_argument_group("batching")
    b.add_argument("--batch-size", type=int,
                   help=f"sentences per batch (default {DEFAULT_BATCH_SIZE}; no limit when only --max-tokens is given)")
    b.add_argument("--max-tokens", type=int, help="padded source tokens per batch (rows x longest source)")
    b.add_argument("--chunk-lines", type=int, default=DEFAULT_CHUNK_LINES,
                   help="lines read, sorted by length and batched at a time")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "artifact" or "checkpoint"
    path: str
    backend: str
    device: str | None  # None for torch


def model_source(args) -> ModelSource:
    """Which model the options name, with every contradiction reported as an InputError."""
    given = [opt for opt in ("spm", "dict", "config") if getattr(args, opt, None)]
    if args.source and args.checkpoint:
        raise InputError(f"give an artifact directory ({args.source}) or --checkpoint ({args.checkpoint}), not both")
    if args.checkpoint:
        missing = [f"--{opt}" for opt in ("spm", "dict") if not getattr(args, opt, None)]
        if missing:
            raise InputError(f"--checkpoint needs {' and '.join(missing)}")
        backend = args.backend or "torch"
        if backend != "torch":
            raise InputError(f"--backend {backend} runs an artifact directory; a checkpoint runs with --backend torch")
        if args.device == "cuda":
            raise InputError("--device applies to the ort and trt backends; the torch backend runs on the CPU")
        return ModelSource("checkpoint", args.checkpoint, "torch", None)
    if args.source:
        if given:
            opts = ", ".join(f"--{opt}" for opt in given)
            raise InputError(f"{opts} go with --checkpoint; an artifact directory has its own")
        backend = args.backend or "ort"
        if backend == "torch":
            raise InputError("--backend torch runs a checkpoint: use --checkpoint CKPT --spm SPM --dict DICT")
        device = args.device or ("cuda" if backend == "trt" else "cpu")
        if backend == "trt" and device != "cuda":
            raise InputError("--backend trt runs on --device cuda only")
        return ModelSource("artifact", args.source, backend, device)
    hint = ""
    if args.src_prefix or args.tgt_prefix:
        hint = " (a directory written after --src-prefix / --tgt-prefix is read as a prefix symbol: put it first)"
    raise InputError(f"nothing to translate with: give an artifact directory or --checkpoint CKPT --spm SPM --dict DICT{hint}")


def options_from_args(args) -> tuple[SearchOptions, StreamOptions]:
    """Every check that needs no file: a bad option fails before any model is loaded. The
    target prefix ids are filled in once the dictionary is open."""
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    for flag, value in (("--lenpen", args.lenpen), ("--unkpen", args.unkpen), ("--max-len-a", args.max_len_a),
                        ("--temperature", args.temperature), ("--topp", args.topp)):
        if not math.isfinite(value):  # argparse's float() accepts "nan" and "inf"
            raise InputError(f"{flag} must be a finite number, got {value}")
    if args.max_len_b < 0:
        raise InputError(f"--max-len-b must be >= 0, got {args.max_len_b}")
    if not args.sampling and (args.topk != -1 or args.topp != -1.0):
        raise InputError("--topk / --topp apply only with --sampling")
    if args.topk != -1 and args.topp != -1.0:
        raise InputError("give --topk or --topp, not both")
    if args.topp != -1.0 and not 0 < args.topp <= 1:
        raise InputError(f"--topp must be in (0, 1], got {args.topp}")
    if args.nbest > 1 and args.format != "jsonl":
        raise InputError("--nbest > 1 needs --format jsonl (text output has one line per input line)")
    if args.max_len_a == 0 and args.min_len > args.max_len_b:
        raise InputError(f"--min-len {args.min_len} exceeds --max-len-b {args.max_len_b}")
    search = SearchOptions(
        beam=args.beam,
        nbest=args.nbest,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        min_len=args.min_len,
        lenpen=args.lenpen,
        unkpen=args.unkpen,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        sampling=args.sampling,
        temperature=args.temperature,
        sampling_topk=args.topk,
        sampling_topp=args.topp,
        seed=args.seed,
    )
    search.validate()
    batch_size = args.batch_size
    if batch_size is None and args.max_tokens is None:
        batch_size = DEFAULT_BATCH_SIZE
    stream = StreamOptions(
        batch_size=batch_size,
        max_tokens=args.max_tokens,
        chunk_lines=args.chunk_lines,
        truncate=args.truncate,
        errors=args.errors,
    )
    stream.validate()
    return search, stream


def open_model(args):
    """(backend, tokenizer) for the options. The tokenizer is opened (and the prefixes looked up)
    first, so that a wrong dictionary or tag fails before the slow backend load."""
    src = model_source(args)
    if src.kind == "artifact":
        directory = Path(src.path)
        if not directory.is_dir():
            raise InputError(f"artifact directory {directory} does not exist{_set_aside_hint(directory)}")
        spm, dict_path = directory / "spm.model", directory / "dict.txt"
        # The manifest first (cheap): a newer format, an unfinished export or a directory that is no
        # artifact at all is reported as such, not as some missing or unreadable tokenizer file.
        if (directory / MANIFEST).exists() or not spm.exists():
            manifest = read_manifest(directory)
            names = manifest.get("tokenizer") or {}
            spm, dict_path = directory / names.get("spm", "spm.model"), directory / names.get("dict", "dict.txt")
            verify_files(directory, manifest, [spm.name, dict_path.name])
        tokenizer = Tokenizer.from_files(spm, dict_path, args.src_prefix)
        tokenizer.encode_target_prefix(args.tgt_prefix or [])
        backend = load_backend(src.backend, directory, device=src.device, threads=args.threads)
    else:
        if not Path(src.path).exists():
            raise InputError(f"checkpoint {src.path} does not exist")
        tokenizer = Tokenizer.from_files(args.spm, args.dict, args.src_prefix)
        tokenizer.encode_target_prefix(args.tgt_prefix or [])
        backend = load_backend("torch", src.path, config=args.config, dict_path=args.dict, threads=args.threads)
    return backend, tokenizer


def _set_aside_hint(directory: Path) -> str:
    kept = previous_artifact_of(directory)
    return f" (an interrupted export left the previous artifact in {kept}: rename it back)" if kept else ""


def _stdio_path(p: str | None) -> str | None:
    return None if p in (None, "-") else p


def _check_paths(args) -> None:
    inp, out = _stdio_path(args.input), _stdio_path(args.output)
    if inp is not None and not Path(inp).is_file():
        raise InputError(f"input file {inp} does not exist" if not Path(inp).exists() else f"--input {inp} is not a file")
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise InputError(f"--output {out} is a directory")
        if not path.absolute().parent.is_dir():
            raise InputError(f"directory of --output {out} does not exist")


class _Progress:
    """One self-overwriting stderr line: share of the input file read, lines done, lines/s."""

    def __init__(self, total_bytes: int, stream=None) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = 0.0

    def update(self, done_bytes: int, lines: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.shown < 0.2:
            return
        self.shown = now
        rate = lines / max(now - self.start, 1e-9)
        pct = 100.0 * min(done_bytes / self.total, 1.0)
        self.stream.write(f"\rtranslate: {pct:5.1f}%  {lines} lines  {rate:.1f} lines/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_translate(args) -> int:
    search_opts, stream_opts = options_from_args(args)
    model_source(args)
    _check_paths(args)
    inp, out_path = _stdio_path(args.input), _stdio_path(args.output)
    backend, tokenizer = open_model(args)
    search_opts.prefix_tokens = tokenizer.encode_target_prefix(args.tgt_prefix or [])

    with contextlib.ExitStack() as stack:
        if inp is None:
            source = sys.stdin.buffer
        else:
            try:
                source = stack.enter_context(open(inp, "rb"))
            except OSError as e:
                raise InputError(f"cannot read --input {inp}: {e.strerror or e}") from None
        if out_path is None:
            sys.stdout.flush()
            out = sys.stdout.buffer
        else:
            out = stack.enter_context(atomic_output(out_path))
        progress = None
        if inp is not None and not args.no_progress and sys.stderr.isatty():
            progress = _Progress(os.fstat(source.fileno()).st_size)
            stack.callback(progress.close)  # runs first on the way out: errors start on a new line
        done = 0
        for chunk in translate_stream(backend, tokenizer, source, search_opts, stream_opts):
            out.write("".join(format_translation(t, args.format) + "\n" for t in chunk).encode("utf-8"))
            done += len(chunk)
            if out_path is None:
                out.flush()
            if progress:
                progress.update(source.tell(), done)
        if progress:
            progress.update(source.tell(), done, final=True)
    return 0
