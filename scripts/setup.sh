#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs requirements.txt (pinned).  Idempotent: a stamp
# holding the requirements' hash skips the install when nothing changed.
#   usage: bash scripts/setup.sh        (prints the venv's python path on its last line)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c v
  for c in python3.12 python3.13 python3.14 python3; do
    if command -v "$c" >/dev/null 2>&1; then
      v=$("$c" -c 'import sys; print(sys.version_info >= (3, 12))' 2>/dev/null || true)
      if [ "$v" = "True" ]; then command -v "$c"; return 0; fi
    fi
  done
  local root="${PYENV_ROOT:-}"
  if [ -z "$root" ] && command -v pyenv >/dev/null 2>&1; then root=$(pyenv root); fi
  [ -n "$root" ] || root="$HOME/.pyenv"
  for c in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

PY=$(find_python) || {
  echo "error: mom_jax needs Python >= 3.12 (jax 0.11.2 has no wheels for older versions)." >&2
  echo "       Install one (e.g. 'pyenv install 3.12') or put python3.12 on PATH." >&2
  exit 1
}
VENV=.venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  echo "[setup] creating $VENV with $PY" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into $VENV (first time takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt >&2
  echo "$WANT" > "$STAMP"
fi
echo "$PWD/$VENV/bin/python"
