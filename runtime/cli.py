"""The ``deltalm`` command. Export-side commands import ``export`` (and torch) lazily, so
``deltalm translate DIR --backend ort`` runs where torch is not installed.

Errors derived from DeltaLMError print as one line (``deltalm: error: ...``) with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
from collections.abc import Callable

from . import __version__
from .commands import corpus as cmd_corpus
from .commands import export as cmd_export
from .commands import score as cmd_score
from .commands import serve as cmd_serve
from .commands import shortlist as cmd_shortlist
from .commands import translate as cmd_translate
from .errors import DeltaLMError
from .translator import OptionError


def _cmd_bench(args) -> int:
    from deltalm.bench.command import bench_command

    return bench_command(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a suggestion for a misspelled choice or subcommand ("did you mean ...?")."""

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m and "did you mean" not in message and "maybe you meant" not in message:
            close = difflib.get_close_matches(m[1], re.findall(r"'([^']*)'", m[2]), n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        super().error(message)

    def unrecognized(self, extras: list[str]):
        """The error for arguments this (sub)command does not take, with this command's usage and
        the closest option for each misspelled one."""
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        hints = {}
        for arg in extras:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and len(name) > 1:
                close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
                if close:
                    hints[name] = close[0]
        message = f"unrecognized arguments: {' '.join(extras)}"
        if len(hints) == 1:
            message += f"; did you mean {next(iter(hints.values()))}?"
        elif hints:
            message += "; did you mean " + ", ".join(f"{o} (for {a})" for a, o in hints.items()) + "?"
        self.error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deltalm", description="DeltaLM export (ONNX / TensorRT) and inference.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"deltalm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # the commands' functions, in the tables of the two loops below (their parameter names differ)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    for name, help_, add_arguments, run in (
        (
            "inspect",
            "describe a checkpoint, an artifact directory or a preset",
            cmd_export.add_inspect_arguments,
            cmd_export.run_inspect,
        ),
        (
            "export",
            "export a checkpoint to an artifact directory (ONNX + manifest)",
            cmd_export.add_export_arguments,
            cmd_export.run_export,
        ),
        (
            "parity",
            "re-run the parity checks of an artifact against its checkpoint",
            cmd_export.add_parity_arguments,
            cmd_export.run_parity,
        ),
    ):
        s = sub.add_parser(name, help=help_)
        add_arguments(s)
        s.set_defaults(func=run, subparser=s)

    s = sub.add_parser("engines", help="build TensorRT engines for an artifact directory")
    s.add_argument("dir")
    s.add_argument("--profile", help="JSON file with min/opt/max shapes (default: derived from the manifest)")
    s.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="default: the artifact's (engines are strongly typed: export the precision you want)",
    )
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-beam", type=int, default=5)
    s.add_argument("--max-src-len", type=int, default=256)
    s.add_argument("--max-tgt-len", type=int, default=256)
    s.add_argument("--print-only", action="store_true", help="print the plan and trtexec commands, build nothing")
    s.set_defaults(func=cmd_export.run_engines, subparser=s)

    for name, help_, add_arguments, run in (
        (
            "translate",
            "translate text (stdin or --input) with a backend",
            cmd_translate.add_arguments,
            cmd_translate.run,
        ),
        (
            "score",
            "score given translations: the log-probability of each target token (fairseq --score-reference)",
            cmd_score.add_arguments,
            cmd_score.run,
        ),
        (
            "shortlist",
            "build a vocabulary shortlist for an artifact from a corpus (for translate --shortlist)",
            cmd_shortlist.add_arguments,
            cmd_shortlist.run,
        ),
        (
            "translate-corpus",
            "translate text files on a Ray cluster (the ray extra)",
            cmd_corpus.add_arguments,
            cmd_corpus.run,
        ),
        (
            "serve",
            "HTTP translation service with dynamic batching (needs the serve extra)",
            cmd_serve.add_arguments,
            cmd_serve.run,
        ),
        (
            "bench-serve",
            "benchmark deltalm serve under concurrent HTTP load (batched vs not)",
            cmd_serve.add_bench_arguments,
            cmd_serve.run_bench,
        ),
    ):
        s = sub.add_parser(name, help=help_)
        add_arguments(s)
        s.set_defaults(func=run, subparser=s)

    s = sub.add_parser("bench", help="benchmark every available backend on one model (or against CTranslate2)")
    from deltalm.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(s)
    s.set_defaults(func=_cmd_bench, subparser=s)
    return p


class _StderrLines(logging.Handler):
    """The library's log lines (``deltalm.*`` at INFO: export stages, tidied work directories) as
    plain lines on the stderr of the moment (tests swap ``sys.stderr``)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the subcommand: its usage, and the option meant
        args.subparser.unrecognized(extras)
    library = logging.getLogger("deltalm")
    handler, level, propagate = _StderrLines(logging.INFO), library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # a library that configures the root logger (ORT's quantizer) would print them twice
    try:
        return _run(args)
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        library.propagate = propagate


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except DeltaLMError as e:
        if args.debug:
            raise
        print(f"deltalm: error: {_as_command_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltalm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        # Ctrl-C / SIGTERM landing inside a library (e.g. while onnxruntime initializes) can surface
        # as another exception whose cause is the interrupt
        if not args.debug and _caused_by_interrupt(e):
            print("deltalm: interrupted", file=sys.stderr)
            return 130
        raise


# keyword names of the library whose command-line flag is not simply --name-with-dashes
_FLAGS = {"dictionary": "--dict"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _as_command_line(e: DeltaLMError) -> str:
    """An OptionError speaks of keyword names (``max_len_b``); the command line of flags."""
    if not isinstance(e, OptionError):
        return str(e)
    from dataclasses import fields

    from .translator import TranslateOptions

    names = sorted(
        {f.name for f in fields(TranslateOptions)} | {"batch_size", "max_tokens", "chunk_lines"}, key=len, reverse=True
    )
    reason = re.sub(r"(?<![\w-])(" + "|".join(names) + r")(?![\w-])", lambda m: _flag(m[1]), e.reason)
    return f"{_flag(e.option)} {reason}"


def _caused_by_interrupt(e: BaseException) -> bool:
    seen = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
