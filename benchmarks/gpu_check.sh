#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): installs the project offline from wheels/, then prints
# one table, imgllm beside PyTorch on the same GPU, within 8 minutes. Options pass through (e.g. --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
