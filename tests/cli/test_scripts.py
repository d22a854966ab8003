"""Smoke runs of the measurement scripts whose figures docs/benchmarks.md quotes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prefill_share_reports_the_bound_and_verify_costs():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefill_share.py"), "--batch-sizes", "1,2",
                          "--images", "2", "--max-new-tokens", "4", "--threads", "1", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for bs in ("1", "2"):
        row = report["by_batch_size"][bs]
        assert 0 < row["prefill_share"] < 1
        assert abs(row["amdahl_bound"] * row["prefill_share"] - 1) < 0.02   # both rounded from one share
        assert row["decode_steps"] >= 1
        assert set(row["verify_ms"]) == {"1", "2", "3", "5", "9"} and row["q_tokens_vs_q_steps"]["1"] == 1.0

