#!/usr/bin/env bash
# The prepared GPU check (issue 22): a LLaVA-1.5-7B-shaped pair's engine steps eager and compiled at
# batch 1/8/64/128 (ms, ops and host syncs per step), peak memory against the planner, the bf16
# agreement figures, the demo and real-weights benches and a labelled speedup projection.
# Writes ${OUT:-.}/gpu_check.json (rewritten after every section). Budget: <= 8 minutes on one GPU.
# Nothing is installed here (the device machine has no network): a missing prerequisite is named.
#   scripts/gpu_check.sh                      # on the GPU machine
#   SHAPE=tiny DEVICE=cpu scripts/gpu_check.sh   # CPU smoke run (tests/cli/test_scripts.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
print(" ".join(m for m in ("torch", "transformers", "pyarrow", "PIL", "ray") if u.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (install the project first: scripts/setup.sh)" >&2
    exit 2
fi
mkdir -p "${OUT:-.}"
timeout "${TIMEOUT:-470}" "$PY" scripts/gpu_check.py --out "${OUT:-.}/gpu_check.json" \
    --shape "${SHAPE:-7b}" --device "${DEVICE:-cuda}" ${GPU_CHECK_ARGS:-}
