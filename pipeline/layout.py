"""Where things are in an OUTPUT (a local dir or an s3:// prefix): one home for each name.

    OUTPUT/data/*.parquet      the captions table (one row per input id)
    OUTPUT/_checkpoint/        Ray Data's committed ids (kept after success: reruns skip done work)
    OUTPUT/_run.json           the run manifest (pipeline/manifest.py)

Readers that skip names starting with '_' (pyarrow.dataset, DuckDB via pyarrow) can read OUTPUT
directly.
"""
from __future__ import annotations

DATA_DIR = "data"
CHECKPOINT_DIR = "_checkpoint"
MANIFEST_NAME = "_run.json"
