#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the test suite on the CPU.
#   usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
# libtpu (requirements-test.txt) in a side folder on PYTHONPATH for the tests only.
EXTRA=.venv/tpu-compile
if ! cmp -s requirements-test.txt "$EXTRA/.requirements" 2>/dev/null; then
  echo "[test] installing requirements-test.txt into $EXTRA" >&2
  rm -rf "$EXTRA"
  "$PY" -m pip install --quiet --target "$EXTRA" -r requirements-test.txt >&2
  cp requirements-test.txt "$EXTRA/.requirements"
fi
export PYTHONPATH="$PWD/$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# The CPU tests are dominated by XLA compiling many small programs (interpret-mode kernels,
# token-by-token references): LLVM's -O0 codegen took 23-38% off the heaviest tests (session 10,
# 2-core machine) and does not change floating-point results (no fast-math either way).
export XLA_FLAGS="--xla_backend_optimization_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
# One pytest worker per core (pytest-xdist), at most 4: each worker is a process with its own jax.
WORKERS=${MOM_JAX_TEST_WORKERS:-$(nproc)}
[ "$WORKERS" -le 4 ] || WORKERS=4
exec "$PY" -m pytest -q -m "not slow" -p no:cacheprovider -n "$WORKERS" --dist worksteal "$@"
