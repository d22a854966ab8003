"""Kill and resume: a driver process is SIGKILLed mid-run, then `specllava resume` completes the
table with every id exactly once, decoding only the rows whose output was not committed."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests import REPO_ROOT
from workers.drill import BATCH_DELAY_ENV
from tests.pipeline_helpers import CLI_SUBPROCESS, cli, png_bytes, sigkilled_on_exit, write_shard

ROWS_PER_SHARD = 16
SHARDS = 4
BATCH = 4
COMMIT = 8  # rows per committed unit: two decode batches


def committed_unit_ids(fs, root: str) -> set:
    """Ids in committed units (every OUTPUT/data/unit-*.parquet is a commit)."""
    files = sorted(data_files(fs, root))
    return set(pq.ParquetDataset(files, filesystem=fs).read().column("id").to_pylist()) if files else set()


def data_files(fs, root: str) -> set:
    return {e.path for e in fs.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True))
            if e.path.endswith(".parquet")}


def fully_committed_shards(fs, root: str, shards: dict[str, list]) -> list[str]:
    done = committed_unit_ids(fs, root)
    return [path for path, shard_ids in shards.items() if set(shard_ids) <= done]


def test_sigkill_driver_then_resume_exactly_once(s3, ray_address, tiny_pair):
    fs = s3.filesystem()
    bucket = s3.make_bucket("kill")
    ids, shards = [], {}
    for shard in range(SHARDS):
        shard_ids = [f"k{shard}-{i:02d}" for i in range(ROWS_PER_SHARD)]
        ids += shard_ids
        shards[f"kill/in/{shard}.parquet"] = shard_ids
        write_shard(fs, f"kill/in/{shard}.parquet", pa.table({
            "id": shard_ids, "image": [png_bytes(7000 + len(ids) + i) for i in range(ROWS_PER_SHARD)]}))
    output = f"{bucket}/out"
    cmd = [sys.executable, *CLI_SUBPROCESS, "caption", "--input", f"{bucket}/in", "--output", output,
           "--target", tiny_pair[0], "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint,
           "--address", ray_address, "--batch-size", str(BATCH), "--max-new-tokens", "8",
           "--stage-cpus", "0.25", "--cpus-per-actor", "0.5", "--commit-rows", str(COMMIT)]
    env = dict(os.environ, **{BATCH_DELAY_ENV: "0.4"})  # actors sleep after each batch (workers/drill.py)
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=REPO_ROOT)
    t0 = time.time()
    deadline = t0 + 180
    with sigkilled_on_exit(driver):
        while not fully_committed_shards(fs, "kill/out", shards):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no progress from the driver"
            time.sleep(0.2)
    print(f"killed after {time.time() - t0:.1f}s")
    time.sleep(3)  # Ray kills the dead driver's workers; let in-flight writes stop
    committed = committed_unit_ids(fs, "kill/out")
    assert 0 < len(committed) < len(ids), "the kill must land mid-run"
    files_before = data_files(fs, "kill/out")
    # A resume never reads input that is fully committed: make such shards unreadable (same
    # size, so the input still looks unchanged to the resume's listing check).
    done_shards = fully_committed_shards(fs, "kill/out", shards)
    assert done_shards and len(done_shards) < SHARDS
    for path in done_shards:
        size = fs.get_file_info(path).size
        with fs.open_output_stream(path) as stream:
            stream.write(b"\0" * size)

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
    # Every file the killed run committed is kept as it was; nothing else of it exists.
    kept_from_first_run = files_before & data_files(fs, "kill/out")
    assert pq.ParquetDataset(sorted(kept_from_first_run), filesystem=fs).read().num_rows == len(committed)
    with fs.open_input_stream("kill/out/_run.json") as stream:
        manifest = __import__("json").loads(stream.read())
    assert 0 < manifest["runs"][-1]["input_bytes_read"] < manifest["input"]["bytes"]
