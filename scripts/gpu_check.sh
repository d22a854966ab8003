#!/usr/bin/env bash
# One prepared GPU check: demo-pair bench in bf16 and fp32 at batch 1/8/32/64, the non-model share of a step,
# the prefill share of plain generate,
# then target verify latency for tree sizes 1..128 on a LLaVA-1.5-7B-shaped random target. Writes ${OUT:-.}/gpu_check.json.
# Budget: under 8 minutes on one H200. Usage: scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import transformers, ray" 2>/dev/null; then
    "$PY" -m pip install -q -e . >/dev/null
fi
timeout 460 "$PY" scripts/gpu_check.py --out "${OUT:-.}/gpu_check.json"
