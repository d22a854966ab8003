"""Kill and resume: a driver process is SIGKILLed mid-run, then `specllava resume` completes the
table with every id exactly once, decoding only the rows whose output was not committed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests import REPO_ROOT
from workers.drill import BATCH_DELAY_ENV
from tests.pipeline_helpers import CLI_SUBPROCESS, cli, png_bytes, write_shard

ROWS_PER_SHARD = 16
SHARDS = 4
BATCH = 4


def committed_checkpoint_ids(fs, root: str) -> set:
    """Ids in committed checkpoint files (Ray writes *.pending.parquet first, renames on commit)."""
    files = [e.path for e in fs.get_file_info(pafs.FileSelector(f"{root}/_checkpoint", allow_not_found=True))
             if e.path.endswith(".parquet") and not e.path.endswith(".pending.parquet")]
    return set(pq.ParquetDataset(files, filesystem=fs).read().column("id").to_pylist()) if files else set()


def data_files(fs, root: str) -> set:
    return {e.path for e in fs.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True))
            if e.path.endswith(".parquet")}


def test_sigkill_driver_then_resume_exactly_once(s3, ray_address, tiny_pair):
    fs = s3.filesystem()
    bucket = s3.make_bucket("kill")
    ids = []
    for shard in range(SHARDS):
        shard_ids = [f"k{shard}-{i:02d}" for i in range(ROWS_PER_SHARD)]
        ids += shard_ids
        write_shard(fs, f"kill/in/{shard}.parquet", pa.table({
            "id": shard_ids, "image": [png_bytes(7000 + len(ids) + i) for i in range(ROWS_PER_SHARD)]}))
    output = f"{bucket}/out"
    cmd = [sys.executable, *CLI_SUBPROCESS, "caption", "--input", f"{bucket}/in", "--output", output,
           "--target", tiny_pair[0], "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint,
           "--address", ray_address, "--batch-size", str(BATCH), "--max-new-tokens", "8",
           "--stage-cpus", "0.25", "--cpus-per-actor", "0.5"]
    env = dict(os.environ, **{BATCH_DELAY_ENV: "0.4"})  # actors sleep after each batch (workers/drill.py)
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=REPO_ROOT)
    t0 = time.time()
    deadline = t0 + 180
    try:
        while len(committed_checkpoint_ids(fs, "kill/out")) < 3 * BATCH:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no progress from the driver"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    print(f"killed after {time.time() - t0:.1f}s")
    time.sleep(3)  # Ray kills the dead driver's workers; let in-flight writes stop
    committed = committed_checkpoint_ids(fs, "kill/out")
    assert 0 < len(committed) < len(ids), "the kill must land mid-run"
    files_before = data_files(fs, "kill/out")

    t1 = time.time()
    assert cli(["resume", output, "--s3-endpoint", s3.endpoint]) == 0
    print(f"resume took {time.time() - t1:.1f}s; committed at kill: {len(committed)}")

    table = pads.dataset("kill/out/data", filesystem=fs, format="parquet").to_table()
    out_ids = table.column("id").to_pylist()
    assert len(out_ids) == len(set(out_ids)) == len(ids) and set(out_ids) == set(ids)
    assert set(table.column("status").to_pylist()) == {"ok"}
    new_files = data_files(fs, "kill/out") - files_before
    decoded_by_resume = pq.ParquetDataset(sorted(new_files), filesystem=fs).read().num_rows
    assert decoded_by_resume == len(ids) - len(committed), "resume decodes exactly the missing rows"
    # Orphans of the killed run (data written, checkpoint pending) were deleted, not duplicated.
    kept_from_first_run = files_before & data_files(fs, "kill/out")
    assert pq.ParquetDataset(sorted(kept_from_first_run), filesystem=fs).read().num_rows == len(committed)
