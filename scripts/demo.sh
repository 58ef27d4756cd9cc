#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the main job on the CPU: tiny MoM vs Gated DeltaNet
# models trained on MQAR, then their accuracy table.
#   usage: bash scripts/demo.sh [flags of experiments/mqar_compare.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec "$PY" -m experiments.mqar_compare "$@"
