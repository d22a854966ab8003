#!/usr/bin/env bash
# Create .venv with the project installed, without pulling a multi-GB CUDA build of torch:
# torch==2.13.0 is installed first (its CPU wheel where one is available); the project's torch
# range is then already satisfied. On a GPU machine, install the torch build you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,smollm2]"
echo "ready: .venv (activate with 'source .venv/bin/activate')"
