#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the test suite on the CPU.
#   usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec "$PY" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
