#!/usr/bin/env bash
# Install the newest versions pyproject allows (no constraints.txt) into a fresh venv and run the tests:
# tells whether constraints.txt can move forward, or which new release breaks us.
#   scripts/check-latest.sh [pytest args...]      e.g. scripts/check-latest.sh -x -q tests/test_training_loop.py
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
venv=$(mktemp -d /tmp/rewardbooth-latest.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0
# Every library at its newest allowed release; torch stays the CPU build (a newer one is a multi-GB CUDA download).
pip install -q --upgrade --upgrade-strategy eager -c <(echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')") -e ".[test]"
echo "newest allowed set:"
pip list --format=freeze | grep -viE "^(rewardbooth|pip|setuptools)=" | sed 's/^/  /'
python -m pytest "${@:--q}"
