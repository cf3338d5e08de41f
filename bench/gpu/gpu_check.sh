#!/usr/bin/env bash
# One-GPU efficiency check (issue: GPU-grade training efficiency). Under 8 minutes on one H100.
# Uses the machine's own torch + transformers; needs no network and no pip install.
#   bash bench/gpu/gpu_check.sh            # ~0.5B Llama, bf16 + FSDP2, chunked CE off and on
#   bash bench/gpu/gpu_check.sh --smoke    # tiny config on CPU: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/../.."   # the repository root (this script is in bench/gpu/)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PY=${PYTHON:-python3}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu/gpu_check.py "$@"
