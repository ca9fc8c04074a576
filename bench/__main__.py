"""The benchmark's child processes: ``python -m deltalm.bench TASK ...``.

    worker SPEC.json OUT.json     every workload of one backend (measure.worker)
    profile SPEC.json OUT.json    ONNX Runtime's profiler on the decoder step
    control SPEC.json OUT.json    decoding control of one ort backend (control.control_worker)
    engine SPEC.json              an engine of the side-by-side comparison (JSON lines on stdin / stdout)
    cli OUT.json ARGS...          ``deltalm ARGS``, then its peak RSS into OUT.json

The benchmark itself is ``deltalm bench`` (deltalm.bench.command)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    task = argv[0]
    if task == "cli":
        import runpy

        from .children import peak_rss_mb

        sys.argv = ["deltalm", *argv[2:]]
        rc = 1
        try:
            runpy.run_module("deltalm", run_name="__main__")  # the command, as `python -m deltalm` runs it
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            Path(argv[1]).write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return rc
    spec = json.loads(Path(argv[1]).read_text())
    if task == "engine":
        from .side_by_side import serve_engine

        return serve_engine(spec, sys.stdin, sys.stdout)
    if task == "worker":
        from .measure import worker

        result = worker(spec)
    elif task == "control":
        from .control import control_worker

        result = control_worker(spec)
    elif task == "profile":
        from .profile import profile_decoder_step

        result = profile_decoder_step(
            spec["artifact"], spec["cases"], spec["n"], spec["threads"], Path(spec["out_dir"])
        )
    else:
        print(f"unknown task {task!r}\n{__doc__}", file=sys.stderr)
        return 2
    Path(argv[2]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
