#!/usr/bin/env bash
# One-command GPU check (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh [--dry-run] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
