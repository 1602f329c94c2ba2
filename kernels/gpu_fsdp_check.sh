#!/usr/bin/env bash
# One prepared script for a GPU machine: sharded sparse fine-tuning (FSDP2 through accelerate, nccl, fp32 and
# bf16) of a SparseGPT-pruned tiny MPT against a single-process run (kernels/gpu_fsdp_check.py), at most
# 13 minutes in all; writes kernels/results/gpu-fsdp-<gpu name>.json. Needs torch (CUDA), transformers,
# accelerate and safetensors: the repository's .venv or PYTHON. Exits 3 without a CUDA device.
#   bash kernels/gpu_fsdp_check.sh [--processes N]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch, transformers, accelerate, safetensors' 2>/dev/null || {
    echo "gpu_fsdp_check: $PYTHON cannot import torch, transformers, accelerate and safetensors" >&2
    exit 3
}
exec timeout 780 "$PYTHON" kernels/gpu_fsdp_check.py "$@"
