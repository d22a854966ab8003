"""Fault 7: a soak run. 5,000 tiny images in batches of 64 through a driver process, with the
other faults injected at seeded random points of its progress (committed rows): a caption actor
SIGKILLed mid-batch, the object store away for a few seconds, and finally the driver SIGKILLed.
`specllava resume` (repeated if it does not finish) completes the table. Asserts every id
exactly once, every caption the target's greedy caption, and that the resumed runs decoded
exactly the rows that were not committed; prints rows/s and the re-decoded batches.

Slow (minutes): marked `soak`; see docs/reliability.md for the command."""
from __future__ import annotations

import os
import random
import signal
import time

import pyarrow.parquet as pq
import pytest

from tests.faults.fault_helpers import (DrillLog, assert_complete_and_exact, caption_argv, committed_ids, unit_files,
                           read_manifest, reference, start_driver, wait_for, write_input)
from tests.faults.fault_helpers import faulty_store  # noqa: F401 - fixture: the module's own S3 server + proxy

ROWS = 5000
SHARDS = 10
BATCH = 64
SEED = 7


class Committed:
    """Rows in committed units (each file's footer read once)."""

    def __init__(self, fs, root: str):
        self.fs, self.root, self.rows = fs, root, {}

    def __call__(self) -> int:
        committed, _ = unit_files(self.fs, self.root)
        for path in committed - set(self.rows):
            try:
                self.rows[path] = pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows
            except OSError:
                continue
        return sum(n for path, n in self.rows.items() if path in committed)


@pytest.mark.soak
def test_soak_5000_rows_with_faults_exactly_once(faulty_store, ray_address, tiny_pair, tmp_path):
    store = faulty_store
    fs = store.filesystem()
    bucket = store.make_bucket("soak")
    root = "soak/out"
    images = write_input(fs, "soak/in", ROWS, shards=SHARDS, seed=900_000)
    rng = random.Random(SEED)
    plan = {"actor_kill_at": int(rng.uniform(0.05, 0.25) * ROWS),
            "outage_at": int(rng.uniform(0.3, 0.5) * ROWS), "outage_s": round(rng.uniform(4, 8), 1),
            "driver_kill_at": int(rng.uniform(0.55, 0.8) * ROWS)}
    log = DrillLog(str(tmp_path / "drill.jsonl"))
    driver_log = str(tmp_path / "driver.log")
    committed = Committed(fs, root)
    seen: dict = {}

    def progressed(n):
        return lambda: committed() >= n

    t0 = time.time()
    driver = start_driver(caption_argv(bucket, tiny_pair, store.endpoint, ray_address, BATCH, "--commit-rows", "256"),
                          drill_log=log.path, log_path=driver_log)
    try:
        wait_for(progressed(plan["actor_kill_at"]), 1800, "rows for the actor kill", driver, every=0.5)
        victim = wait_for(lambda: next(iter(log.in_flight()), None), 600, "a batch in flight", driver, every=0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        seen["actor_killed"] = (victim["pid"], tuple(victim["ids"]), committed())

        wait_for(progressed(plan["outage_at"]), 1800, "rows for the outage", driver, every=0.5)
        seen["outage_from"] = committed()
        store.proxy.stop()
        time.sleep(plan["outage_s"])
        seen["outage_to"] = committed()
        store.proxy.start()

        wait_for(progressed(plan["driver_kill_at"]), 1800, "rows for the driver kill", driver, every=0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        seen["in_flight_at_kill"] = sum(e["pid"] != victim["pid"] for e in log.in_flight())
    finally:
        if "outage_from" in seen and "outage_to" not in seen:
            store.proxy.start()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    first_s = time.time() - t0
    time.sleep(3)  # Ray ends the dead driver's actors and tasks
    at_kill = committed()
    done = committed_ids(fs, root)
    returned = {tuple(e["ids"]) for e in log.events() if e["event"] == "return"}
    seen["returned_uncommitted"] = sum(1 for ids in returned if not set(ids) <= done)
    assert seen["outage_from"] < ROWS and seen["outage_to"] == seen["outage_from"], seen
    assert at_kill < ROWS, "the driver kill must land before the run ends"

    resume_from = time.time()
    resumes = []
    while len(resumes) < 3:
        t1 = time.time()
        proc = start_driver(["resume", f"{bucket}/out", "--s3-endpoint", store.endpoint, "--address", ray_address],
                            drill_log=log.path, log_path=driver_log)
        rc = proc.wait(timeout=1800)
        resumes.append((rc, round(time.time() - t1, 1)))
        if rc == 0:
            break
    total_s = time.time() - t0
    assert resumes[-1][0] == 0, f"resume did not finish: {resumes}; log {driver_log}"

    manifest = read_manifest(fs, root)
    runs = manifest["runs"]
    assert len(runs) == 1 + len(resumes)
    assert sum(r.get("rows", 0) for r in runs[1:]) == ROWS - at_kill  # resumes decoded exactly the rest
    starts = log.id_starts()
    assert set(starts) == set(images)
    victim_ids = seen["actor_killed"][1]
    assert all(starts[i] >= 2 for i in victim_ids)  # the killed actor's batch was decoded again
    if len(resumes) == 1:  # the resume decoded each id not committed at the kill exactly once
        by_resume = log.id_starts(since=resume_from)
        assert set(by_resume) == set(images) - done and set(by_resume.values()) <= {1}
    extra = {i: n - 1 for i, n in starts.items() if n > 1}
    t_ref = time.time()
    reference(tiny_pair[0], images)
    ref_s = time.time() - t_ref
    assert_complete_and_exact(fs, root, images, tiny_pair[0])
    print(f"soak: {ROWS} rows, batch {BATCH}, plan {plan}; actor {seen['actor_killed'][0]} killed at "
          f"{seen['actor_killed'][2]} committed; outage {plan['outage_s']}s at {seen['outage_from']}; driver "
          f"killed at {at_kill} committed after {first_s:.0f}s (batches being decoded then "
          f"{seen['in_flight_at_kill']}, decoded but not committed {seen['returned_uncommitted']}); "
          f"resumes (rc, s) {resumes}; "
          f"{ROWS / total_s:.1f} rows/s over {total_s:.0f}s incl. faults and resume "
          f"(first run {runs[0].get('images_per_s')}, resume {runs[-1].get('images_per_s')} images/s as recorded); "
          f"rows decoded more than once {len(extra)} ({sum(extra.values())} extra decodes, killed actor's batch "
          f"{len(victim_ids)} rows); reference captions {ref_s:.0f}s")
