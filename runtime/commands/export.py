"""``deltalm inspect | export | parity | engines``: argument parsing around ``deltalm.export``.

torch and onnx are imported only when one of these commands runs; without the ``export`` extra
installed they fail in one line naming it.
"""

from __future__ import annotations

import argparse
import json

from ..errors import InputError, install_extra


def require_export_extra(command: str) -> None:
    """One line naming the extra when torch / onnx are missing."""
    import importlib.util

    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"`deltalm {command}` needs {' and '.join(missing)}: {install_extra('export')}")


def _config_argument(parser) -> None:
    parser.add_argument(
        "--config", help="preset name (deltalm-base, deltalm-large, tiny) or JSON file overriding the architecture"
    )


def add_inspect_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", nargs="?", help="checkpoint file or Hugging Face directory, or an artifact directory")
    _config_argument(s)
    s.add_argument("--dict", help="dict.txt (checks the vocabulary size)")
    s.add_argument("--json", action="store_true", help="print JSON")


def add_export_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint")
    s.add_argument("--spm", help="sentencepiece model (spm.model)")
    s.add_argument("--dict", help="fairseq dict.txt")
    s.add_argument("--out", required=True, help="artifact directory to write")
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    _config_argument(s)
    s.add_argument(
        "--topk",
        type=int,
        default=10,
        help="k of the in-graph top-k, the beam search fast path (>= 2 x the largest beam; default 10)",
    )
    s.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="fp32 parity limit on log-probs (max abs, default 1e-4); fp16 / int8 have their own verdict",
    )
    s.add_argument("--as-deltalm", action="store_true", help="seed a DeltaLM from an XLM-R checkpoint")
    s.add_argument(
        "--no-optimize",
        action="store_true",
        help="do not list ONNX Runtime's transformer fusions in the manifest (saves time; "
        "the graphs are the same, ONNX Runtime still fuses them when it loads them)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    s.add_argument(
        "--verbose",
        action="store_true",
        help="print the parity table (every graph output and case; parity.json always holds it)",
    )
    s.add_argument(
        "--allow-parity-failure",
        action="store_true",
        help="write the artifact even if its parity verdict fails (parity.json records it)",
    )
    _parity_corpus_argument(s)


def _parity_corpus_argument(parser) -> None:
    parser.add_argument(
        "--parity-corpus",
        metavar="FILE",
        help="sentences of yours (UTF-8, one a line; 16 are used) for the parity check, instead of "
        "text sampled from the sentencepiece model",
    )


def add_parity_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir")
    s.add_argument("--checkpoint", help="checkpoint to compare with (default: the one recorded in the manifest)")
    s.add_argument("--tolerance", type=float, default=None, help="fp32 only: limit on log-probs (max abs)")
    s.add_argument("--verbose", action="store_true", help="print the parity table (every graph output and case)")
    _parity_corpus_argument(s)


def run_inspect(args) -> int:
    from pathlib import Path

    from ..artifact import MANIFEST, describe_artifact, open_artifact

    if args.checkpoint is None:
        if not args.config:
            raise InputError("give a checkpoint or artifact directory to inspect, or --config PRESET")
        from ..config import resolve_config

        info = {"config": resolve_config(args.config).to_dict()}
    elif Path(args.checkpoint).is_dir() and (Path(args.checkpoint) / MANIFEST).exists():
        info = describe_artifact(open_artifact(args.checkpoint, verify=False))
    else:
        require_export_extra("inspect")
        from ..export import inspect_checkpoint

        info = inspect_checkpoint(args.checkpoint, args.config, args.dict)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    _print_nested(info)
    return 0


def _print_nested(info: dict, indent: str = "") -> None:
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_nested(value, indent + "  ")
        elif isinstance(value, list):
            print(f"{indent}{key}: {'none' if not value else ''}")
            for v in value:
                print(f"{indent}  - {v}")
        else:
            print(f"{indent}{key}: {value}")


def _check_config_file(config: str | None) -> None:
    if config:
        from ..config import resolve_config

        resolve_config(config)  # a missing / malformed file or an unknown preset: one line, now


def _refuse_an_artifact_as_checkpoint(path: str) -> None:
    """``deltalm export DIR`` where DIR is already an artifact: say so, and what to do instead."""
    from pathlib import Path

    from ..artifact import MANIFEST, read_manifest
    from ..errors import DeltaLMError

    if not (Path(path).is_dir() and (Path(path) / MANIFEST).is_file()):
        return
    try:
        source = read_manifest(path).source.checkpoint
    except DeltaLMError:
        source = None
    raise InputError(
        f"{path} is an artifact directory (exported already), not a checkpoint: use it as it is "
        f"(`deltalm translate {path}`); to export again, give the checkpoint it was exported from"
        + (f" ({source})" if source else "")
    )


def run_export(args) -> int:
    _refuse_an_artifact_as_checkpoint(args.checkpoint)
    require_export_extra("export")
    _check_config_file(args.config)
    from ..export import export_checkpoint

    export_checkpoint(
        args.checkpoint,
        args.out,
        spm=args.spm,
        dictionary=args.dict,
        precision=args.precision,
        config=args.config,
        topk=args.topk,
        tolerance=args.tolerance,
        as_deltalm=args.as_deltalm,
        optimize=not args.no_optimize,
        force=args.force,
        allow_parity_failure=args.allow_parity_failure,
        verbose=args.verbose,
        parity_corpus=args.parity_corpus,
    )
    return 0


def run_parity(args) -> int:
    require_export_extra("parity")
    from ..export import check_parity

    check_parity(
        args.dir,
        checkpoint=args.checkpoint,
        tolerance=args.tolerance,
        log=print,
        verbose=args.verbose,
        parity_corpus=args.parity_corpus,
    )
    return 0


def run_engines(args) -> int:
    from ..export.engines import engines_command

    return engines_command(args)


__all__ = [
    "add_inspect_arguments",
    "add_export_arguments",
    "add_parity_arguments",
    "run_inspect",
    "run_export",
    "run_parity",
    "run_engines",
    "require_export_extra",
]
