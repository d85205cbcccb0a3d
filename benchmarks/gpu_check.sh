#!/usr/bin/env bash
# GPU check of ssb (see benchmarks/gpu_check.py for the steps and the rules):
#   bash benchmarks/gpu_check.sh [--device auto|cpu|cuda] [--size 3b|tiny] [--out DIR]
# ~5 minutes on one H200 (313 s measured without vLLM); the CPU form (--device cpu) is what CI runs.
# PYTHON picks the interpreter (default: the repository's .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "gpu_check: no Python at $python: run 'make install' first, or set PYTHON" >&2
    exit 2
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
