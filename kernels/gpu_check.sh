#!/usr/bin/env bash
# One prepared script for a GPU machine: correctness and timings of the Triton kernels (kernels/gpu_check.py),
# at most 8 minutes in all; writes kernels/results/gpu-<gpu name>.json.
#   bash kernels/gpu_check.sh             on a CUDA machine (its own torch and Triton; nothing is installed)
#   bash kernels/gpu_check.sh --dry-run   on CPU: every kernel and configuration under Triton's interpreter
#   bash kernels/gpu_check.sh --aot       on CPU: compile every configuration for sm_80 and sm_90 (slow on 2 cores)
# PYTHON selects the interpreter (default: the repository's .venv if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then export TRITON_INTERPRET=1; fi
done
"$PYTHON" -c 'import torch, triton' 2>/dev/null || {
    echo "gpu_check: $PYTHON cannot import torch and triton; set PYTHON to an interpreter that has both" >&2
    exit 3
}
limit=480  # the GPU check's 8 minutes; compiling every configuration on a small CPU takes longer
for arg in "$@"; do [[ "$arg" == "--aot" ]] && limit=3600; done
exec timeout "$limit" "$PYTHON" kernels/gpu_check.py "$@"
