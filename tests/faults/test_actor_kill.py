"""Fault 1: a caption actor's process is SIGKILLed mid-batch. Ray restarts the actor (Ray Data's
actor pools run with max_restarts=-1, max_task_retries=-1), the killed batch is decoded again on
the new process, and the run finishes with every id exactly once and greedy-exact captions.

The drill log (SPECLLAVA_DRILL_LOG) gives the actor's pid and counts batch starts, which is how
the number of re-decoded batches is measured rather than assumed."""
from __future__ import annotations

import os
import signal
import threading
import time

from tests.faults.fault_helpers import (DrillLog, assert_complete_and_exact, caption_argv, read_manifest, wait_for,
                           write_input)
from workers.drill import LOG_ENV
from tests.pipeline_helpers import batch_delay, cli

ROWS = 32
BATCH = 4


def test_caption_actor_killed_mid_batch_is_restarted_and_batch_redone(s3, ray_address, tiny_pair, tmp_path,
                                                                      monkeypatch):
    fs = s3.filesystem()
    bucket = s3.make_bucket("actorkill")
    images = write_input(fs, "actorkill/in", ROWS, shards=2, seed=31_000)
    log = DrillLog(str(tmp_path / "drill.jsonl"))
    monkeypatch.setenv(LOG_ENV, log.path)
    killed: dict = {}

    def killer():
        # Wait until one batch has returned and another is being decoded, then kill its actor.
        def target():
            if not any(e["event"] == "return" for e in log.events()):
                return None
            return next(iter(log.in_flight()), None)
        try:
            victim = wait_for(target, 300, "a caption batch in flight after the first one", every=0.05)
            os.kill(victim["pid"], signal.SIGKILL)
            killed.update(victim, at=time.time())
        except BaseException as exc:  # surfaced by the main thread's assertion below
            killed["error"] = repr(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.time()
    # 0.5 s after each batch, inside the task: the kill lands while the batch is not yet returned.
    with batch_delay(0.5):
        rc = cli(caption_argv(bucket, tiny_pair, s3.endpoint, ray_address, BATCH))
    wall = time.time() - t0
    thread.join(timeout=5)
    assert "error" not in killed, killed.get("error")
    assert killed, "the kill never happened"
    assert rc == 0

    assert_complete_and_exact(fs, "actorkill/out", images, tiny_pair[0])
    events = log.events()
    victim_ids = tuple(killed["ids"])
    # The killed process never returned the batch; a new process started and decoded it again.
    assert not any(e["event"] == "return" and e["pid"] == killed["pid"] and tuple(e["ids"]) == victim_ids
                   for e in events)
    restarted = [e for e in events if e["event"] == "init" and e["t"] > killed["at"]]
    assert restarted, "no caption actor started after the kill"
    redone = [e for e in events if e["event"] == "return" and tuple(e["ids"]) == victim_ids]
    assert len(redone) == 1 and redone[0]["pid"] != killed["pid"]
    redecoded = log.redecoded()
    # Measured, not assumed: only the batch that was mid-decode is decoded twice (batches queued
    # on the dead actor had not started; batches it returned were already in the object store).
    assert redecoded == {victim_ids: 2}, redecoded
    assert log.rows_started() == ROWS + len(victim_ids)
    assert read_manifest(fs, "actorkill/out")["runs"][-1]["rows"] == ROWS  # each id written once
    print(f"actor kill: pid {killed['pid']} killed mid-batch; re-decoded batches: {len(redecoded)} "
          f"({sum(len(ids) for ids in redecoded)} rows); rows started {log.rows_started()} for {ROWS} rows; "
          f"restart-to-redo {redone[0]['t'] - killed['at']:.1f}s; run {wall:.1f}s")
