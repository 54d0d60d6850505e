#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent and quick
# when nothing changed: the install is redone only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "vsearch needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q --no-cache-dir -e '.[dev,pretrained]' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c 'import app, torch, timm, faiss, fastapi' # fails loudly if the install did
  rm -f .venv/.installed-*
  touch "$stamp"
fi
