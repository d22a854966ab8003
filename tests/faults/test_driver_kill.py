"""Fault 2: the driver is SIGKILLed at a chosen step, then `specllava resume` completes the table
exactly once. tests/pipeline/test_pipeline_resume.py kills it after some batches committed; these cases
stop it at the edges:

- read:   while Ray reads an input shard (the proxy parks the read), before any caption starts;
- decode: while the first caption batch is being decoded, nothing committed yet;
- write:  while the first unit is being committed (the proxy parks the upload of
          OUTPUT/data/unit-N.parquet): the object never appears, so there is no orphan to clean up
          and the resumed run decodes that unit's rows again.
"""
from __future__ import annotations

import time

import pytest

from tests.faults.fault_helpers import (DrillLog, assert_complete_and_exact, caption_argv, committed_ids,
                                       data_files, read_manifest, reads_of, start_driver, unit_commits,
                                       unit_files, wait_for, write_input)
from tests.faults.fault_helpers import faulty_store  # noqa: F401 - fixture: the module's own S3 server + proxy
from tests.pipeline_helpers import cli, sigkilled_on_exit

ROWS = 16
BATCH = 4


@pytest.mark.parametrize("step", ["read", "decode", "write"])
def test_driver_killed_then_resume_exactly_once(faulty_store, ray_address, tiny_pair, tmp_path, step):
    store = faulty_store
    fs = store.filesystem()
    bucket = store.make_bucket(f"driverkill-{step}")
    root = f"driverkill-{step}/out"
    images = write_input(fs, f"driverkill-{step}/in", ROWS, shards=2, seed=41_000)
    log = DrillLog(str(tmp_path / "drill.jsonl"))
    argv = caption_argv(bucket, tiny_pair, store.endpoint, ray_address, BATCH)
    if step == "write":
        store.proxy.hold(unit_commits)
    held_before = store.proxy.held
    driver = start_driver(argv, drill_log=log.path, log_path=str(tmp_path / "driver.log"), batch_delay_s=0.3)
    t0 = time.time()
    with sigkilled_on_exit(driver):
        if step == "read":
            # _run.json is written after the driver's own input scan: from then on, reads of the
            # input come from the Ray Data read.
            wait_for(lambda: fs.get_file_info(f"{root}/_run.json").type.name == "File", 300, "_run.json", driver)
            store.proxy.hold(reads_of(f"driverkill-{step}/in/"))
            wait_for(lambda: store.proxy.held > held_before, 300, "a parked read of an input shard", driver)
            assert not any(e["event"] == "start" for e in log.events()), "a caption started before the read"
        elif step == "decode":
            in_flight = wait_for(log.in_flight, 300, "a caption batch being decoded", driver, every=0.05)
        else:
            wait_for(lambda: store.proxy.held > held_before, 300, "the upload of a unit parked", driver)
    killed_after = time.time() - t0
    time.sleep(3)  # Ray ends the dead driver's actors and tasks; let anything in flight stop
    store.proxy.release()  # parked requests are dropped, never forwarded
    time.sleep(1)

    committed = committed_ids(fs, root)
    orphans = data_files(fs, root) - unit_files(fs, root)[0]
    pending = store.proxy.held - held_before
    assert read_manifest(fs, root)["status"] == "running"  # the killed run never recorded an end
    if step == "read":
        assert not committed and not orphans, (len(committed), orphans)
    elif step == "decode":  # usually nothing is committed yet; on a slow box an earlier batch may be
        assert len(committed) < ROWS and not committed & {i for e in in_flight for i in e["ids"]}
    else:  # the commit was in flight: nothing committed, nothing half-written left behind
        assert not committed and not orphans and pending, "the kill must land while a unit is uploaded"

    t1 = time.time()
    assert cli(["resume", f"{bucket}/out", "--s3-endpoint", store.endpoint]) == 0
    resume_s = time.time() - t1
    assert_complete_and_exact(fs, root, images, tiny_pair[0])
    manifest = read_manifest(fs, root)
    assert manifest["runs"][-1]["rows"] == ROWS - len(committed)  # resume decoded exactly the rest
    assert not unit_files(fs, root)[1], "files other than committed units left after the resumed run"
    print(f"driver kill at {step}: killed after {killed_after:.1f}s (non-unit files {len(orphans)}, "
          f"parked requests {pending}); resume {resume_s:.1f}s decoded {manifest['runs'][-1]['rows']} rows")
