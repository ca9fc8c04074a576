"""The ``deltalm`` command. Export-side commands import ``export`` (and torch) lazily, so
``deltalm translate DIR --backend ort`` runs where torch is not installed.

Errors derived from DeltaLMError print as one line (``deltalm: error: ...``) with exit code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from .errors import DeltaLMError


def _cmd_inspect(args) -> int:
    from deltalm.export.commands import inspect_command

    return inspect_command(args)


def _cmd_export(args) -> int:
    from deltalm.export.commands import export_command

    return export_command(args)


def _cmd_parity(args) -> int:
    from deltalm.export.commands import parity_command

    return parity_command(args)


def _cmd_engines(args) -> int:
    from deltalm.export.commands import engines_command

    return engines_command(args)


def _cmd_translate(args) -> int:
    from .translate import run_translate

    return run_translate(args)


def _cmd_bench(args) -> int:
    from deltalm.bench.command import bench_command

    return bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltalm", description="DeltaLM export (ONNX / TensorRT) and inference.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe a checkpoint: format, architecture, parameters, key problems")
    s.add_argument("checkpoint")
    s.add_argument("--config", help="preset name or JSON file overriding the architecture")
    s.add_argument("--dict", help="dict.txt (checks the vocabulary size)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("export", help="export a checkpoint to an artifact directory (ONNX + manifest)")
    s.add_argument("checkpoint")
    s.add_argument("--spm", help="sentencepiece model (spm.model)")
    s.add_argument("--dict", help="fairseq dict.txt")
    s.add_argument("--out", required=True, help="artifact directory to write")
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    s.add_argument("--config", help="preset name or JSON file overriding the architecture")
    s.add_argument("--topk", type=int, default=10, help="k of the in-graph top-k (>= 2 x the largest beam)")
    s.add_argument("--tolerance", type=float, default=1e-4, help="fp32 parity limit on log-probs (max abs)")
    s.add_argument("--as-deltalm", action="store_true", help="seed a DeltaLM from an XLM-R checkpoint")
    s.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's transformer fusions")
    s.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    s.add_argument("--allow-parity-failure", action="store_true",
                   help="write the artifact even if its parity verdict fails (parity.json records it); for benchmarks "
                        "of random-weight models, whose near-flat distributions no reduced precision reproduces")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("parity", help="re-run the parity checks of an artifact against its checkpoint")
    s.add_argument("dir")
    s.add_argument("--checkpoint", help="checkpoint to compare with (default: the one recorded in the manifest)")
    s.add_argument("--tolerance", type=float, default=None)
    s.set_defaults(func=_cmd_parity)

    s = sub.add_parser("engines", help="build TensorRT engines for an artifact directory")
    s.add_argument("dir")
    s.add_argument("--profile", help="JSON file with min/opt/max shapes (default: derived from the manifest)")
    s.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-beam", type=int, default=5)
    s.add_argument("--max-src-len", type=int, default=256)
    s.add_argument("--max-tgt-len", type=int, default=256)
    s.add_argument("--print-only", action="store_true", help="print the plan and trtexec commands, build nothing")
    s.set_defaults(func=_cmd_engines)

    s = sub.add_parser("translate", help="translate text (stdin or --input) with a backend")
    from .translate import add_translate_arguments

    add_translate_arguments(s)
    s.set_defaults(func=_cmd_translate)

    s = sub.add_parser("bench", help="benchmark every available backend on one model (or against CTranslate2)")
    from deltalm.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(s)
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeltaLMError as e:
        if args.debug:
            raise
        print(f"deltalm: error: {e}", file=sys.stderr)
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


def _caused_by_interrupt(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
