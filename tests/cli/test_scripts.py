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



def test_big_batch_steps_reports_each_shape():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "big_batch_steps.py"), "--batch", "2",
                          "--shapes", "none,2x2", "--max-new-tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["none", "2x2"]
    assert all("add " in line and "at 2 rows" in line and "verify" in line and "first 5" in line
               and "steps with fewer rows" in line for line in lines)


def test_batch_budget_estimate_agrees_with_the_full_tree():
    """With the whole 24-node tree as the budget, both policies keep every node, so both must
    give the tau the decoder measured with that tree; smaller budgets give no more."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "batch_budget_estimate.py"), "--batch-sizes", "3",
                          "--budgets", "1,2,24", "--max-new-tokens", "12", "--threads", "1", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])["by_batch_size"]["3"]
    taus = report["tau_by_nodes_per_row"]
    assert taus["24"]["per_row"] == taus["24"]["batch_wide"] == report["full_tree_tau"]
    for policy in ("per_row", "batch_wide"):
        assert 1.0 <= taus["1"][policy] <= taus["2"][policy] <= taus["24"][policy]


def test_step_profile_counts_one_sync_per_step_and_splits_the_forwards():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "step_profile.py"), "--pairs", "tiny",
                          "--batch-sizes", "1,3", "--shapes", "none,4x3", "--steps", "2", "--threads", "1",
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["by_pair"]["tiny"]
    assert set(rows) == {"1/none", "1/4x3", "3/none", "3/4x3"}
    for key, row in rows.items():
        assert row["syncs_per_step"] == 1, (key, row)
        assert row["verify_forward"]["forwards"] == 1 and row["other"]["ops"] > 0 and row["step_ms"] > 0
    assert rows["3/4x3"]["draft_forward"]["forwards"] == 3 and rows["3/none"]["draft_forward"]["forwards"] == 0
    # the counts do not depend on the batch size (the same ops run for 1 row as for 3)
    assert rows["1/4x3"]["other"]["ops"] == rows["3/4x3"]["other"]["ops"]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh with tiny shapes on a CPU, so the prepared GPU run cannot rot: every
    section reports, engine steps carry ms, ops and syncs per step, the projection is labelled."""
    import os

    env = dict(os.environ, SHAPE="tiny", DEVICE="cpu", OUT=str(tmp_path), TIMEOUT="500",
               GPU_CHECK_ARGS="--batch-sizes 1,2 --compile off,static --steps 2 --max-new-tokens 16 "
                              "--skip half_precision,bench_demo")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["prerequisites"]["required_missing"] == []
    rows = report["engine_steps"]["rows"]
    assert set(rows) == {f"{m}/{b}/{s}" for m in ("off", "static") for b in (1, 2)
                         for s in ("none", "1x1", "4x3", "8x4", "24x6")}
    for key, row in rows.items():
        assert row["syncs"] == 1 and row["step_ms"] > 0, (key, row)
    assert rows["off/1/4x3"]["ops_outside"] > 50 and rows["off/1/4x3"]["draft_forward_ops"] > 0
    assert report["memory"]["planned_bytes"] > 0 and report["memory"]["weights_bytes"] > 0
    assert report["projection"]["label"].startswith("PROJECTION")
    assert set(report["projection"]["by"]) == {k for k in rows if not k.endswith("/none")}
    assert report["half_precision"] == {"skipped": "--skip"} and report["bench_smollm2"]["skipped"]


def test_plain_engine_ab_checks_every_decoder_against_greedy_and_times_them():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plain_engine_ab.py"), "--batch", "2",
                          "--images", "2", "--rounds", "1", "--max-new-tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("batch 2: ") and "median" in line for line in lines)


def test_budget_steps_check_prints_decode_and_budget_step_times():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "budget_steps_check.py"), "--batch", "2",
                          "--max-new-tokens", "4", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["decode, drafting engine", "decode, target-only engine",
                                                      "budget, interleaved", "budget, no drafting alone"]
    assert "'none':" in lines[2] and "'48,8':" in lines[2]
