"""Where things are in an OUTPUT (a local dir or an s3:// prefix): one home for each name.

    OUTPUT/data/unit-*.parquet   the captions table: one file per committed unit (pipeline/commit.py)
    OUTPUT/_plan.parquet         the input plan: shards, row groups, global row numbers (pipeline/plan.py)
    OUTPUT/_run.json             the run manifest (pipeline/manifest.py)
    OUTPUT/_lease.json           who writes the output now, with a heartbeat (pipeline/lease.py)
    OUTPUT/_budget/RUN/*.json    each caption actor's measured tree budget in run RUN (workers/caption.py)

Readers that skip names starting with '_' or '.' (pyarrow.dataset, DuckDB via pyarrow) can read
OUTPUT directly; every file under data/ holds committed rows only.
"""
from __future__ import annotations

DATA_DIR = "data"
PLAN_NAME = "_plan.parquet"
MANIFEST_NAME = "_run.json"
LEASE_NAME = "_lease.json"
BUDGET_DIR = "_budget"
# Outputs of specllava 0.1 (Ray Data's per-batch checkpoint files): refused, not continued.
LEGACY_CHECKPOINT_DIR = "_checkpoint"
