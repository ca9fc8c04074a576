#!/usr/bin/env bash
# Every GPU check in one run: a thin wrapper over `python -m deltalm.export.gpu_check` (its
# docstring says what runs; options and environment variables pass through). Writes
# ${OUT:-gpu_report}/gpu_report.json, gpu_report.md and gpu_check.log (this run's output).
#
#   bash scripts/gpu_check.sh                  # needs the repo's .venv (make venv) or python3 with deltalm
#
# Without a GPU it prints "no GPU found: GPU checks skipped", writes {"gpu": null, "status":
# "skipped (no GPU)", ...} and exits 0. GPU_CHECK_SELFTEST=1: the CPU stands in for the GPU.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
REPORT_DIR=${OUT:-gpu_report}
mkdir -p "$REPORT_DIR"
PYTHONUNBUFFERED=1 "$PY" -m deltalm.export.gpu_check --out "$REPORT_DIR" "$@" 2>&1 | tee "$REPORT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
