"""Fault 3: the object store goes away for several seconds mid-run (its port refuses connections,
open connections are cut) and comes back with its state. The pipeline retries with backoff and
finishes, or fails cleanly (exit non-zero, _run.json status failed) and `specllava resume`
completes it. Either way: every id exactly once, greedy-exact captions.

Runs on its own moto server behind a proxy (fault_helpers.faulty_store), so the session's `s3`
server is never disturbed."""
from __future__ import annotations

import threading
import time


from tests.faults.fault_helpers import (assert_complete_and_exact, caption_argv, committed_ids, read_manifest,
                           request_line, wait_for, write_input)
from tests.faults.fault_helpers import faulty_store  # noqa: F401 - fixture: the module's own S3 server + proxy
from tests.pipeline_helpers import batch_delay, cli

ROWS = 40
BATCH = 4
OUTAGE_S = 8.0


def test_store_outage_mid_run_then_finish_or_resume(faulty_store, ray_address, tiny_pair):
    store = faulty_store
    fs = store.filesystem()
    bucket = store.make_bucket("outage")
    root = "outage/out"
    images = write_input(fs, "outage/in", ROWS, shards=2, seed=51_000)
    seen: dict = {}

    def outage():
        try:
            wait_for(lambda: len(committed_ids(fs, root)) >= 2 * BATCH, 600, "two committed batches")
            seen["committed_at_stop"] = len(committed_ids(fs, root))
            store.proxy.stop()
            seen["stopped"] = time.time()
            time.sleep(OUTAGE_S)
            seen["committed_at_start"] = len(committed_ids(fs, root))
            store.proxy.start()
            seen["started"] = time.time()
        except BaseException as exc:  # reported by the main thread
            seen["error"] = repr(exc)
            if "stopped" in seen and "started" not in seen:
                store.proxy.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    t0 = time.time()
    try:
        with batch_delay(0.3):
            rc = cli(caption_argv(bucket, tiny_pair, store.endpoint, ray_address, BATCH))
        outcome = "finished" if rc == 0 else f"exit {rc}"
    except Exception as exc:  # noqa: BLE001 - a failed execution propagates; _run.json must say why
        rc, outcome = None, f"raised {type(exc).__name__}"
    first_run_s = time.time() - t0
    thread.join(timeout=OUTAGE_S + 30)
    assert "error" not in seen, seen["error"]
    assert "started" in seen, "the outage never happened"
    # The outage landed mid-run and the store really was gone: nothing committed while it was down.
    assert seen["committed_at_stop"] < ROWS
    assert seen["committed_at_start"] == seen["committed_at_stop"]

    manifest = read_manifest(fs, root)
    resumed = False
    if rc != 0:
        assert manifest["status"] == "failed" and manifest["runs"][-1]["error"], manifest["runs"][-1]
        assert "\n" not in manifest["runs"][-1]["error"] and "testing" not in str(manifest)
        assert cli(["resume", f"{bucket}/out", "--s3-endpoint", store.endpoint]) == 0
        resumed = True
    else:
        assert t0 + first_run_s > seen["started"], "the run finished before the store came back"
    assert_complete_and_exact(fs, root, images, tiny_pair[0])
    print(f"store outage {OUTAGE_S:.0f}s after {seen['committed_at_stop']}/{ROWS} rows committed: first run "
          f"{outcome} in {first_run_s:.1f}s; resumed: {resumed}")


def test_store_hanging_at_end_of_run_check_is_recorded_failed_then_resume(faulty_store, ray_address, tiny_pair, capsys):
    """The store stops answering the driver's end-of-run check (the listing of OUTPUT/data after
    the last commit): every attempt times out, the run is recorded `failed` with the reason and
    the command raises; `specllava resume` then finds every row committed and decodes nothing."""
    store = faulty_store
    fs = store.filesystem()
    bucket = store.make_bucket("outage-end")
    root = "outage-end/out"
    rows = 12
    images = write_input(fs, "outage-end/in", rows, shards=1, seed=52_000)
    listing = b"GET /outage-end?"  # a ListObjectsV2 of out/data/, whatever order its parameters come in

    def hold_after_first_commit():
        wait_for(lambda: committed_ids(fs, root), 600, "a committed batch")
        store.proxy.hold(lambda head: request_line(head).startswith(listing) and b"list-type=2" in request_line(head)
                         and b"prefix=out%2Fdata%2F" in request_line(head))

    thread = threading.Thread(target=hold_after_first_commit, daemon=True)
    thread.start()
    held_before = store.proxy.held
    try:
        with batch_delay(0.3):
            # one batch per unit, so the last commits are a batch apart and the hold lands first
            rc = cli(caption_argv(bucket, tiny_pair, store.endpoint, ray_address, BATCH, "--commit-rows", str(BATCH)))
    finally:
        thread.join(timeout=5)
        store.proxy.release()
    err = capsys.readouterr().err
    assert rc == 1 and "specllava caption: run failed: " in err and "out/data" in err, err[-2000:]
    # the hint is pasteable: it carries the endpoint the run used
    assert f"`specllava resume {bucket}/out --s3-endpoint {store.endpoint}`" in err, err[-2000:]
    assert store.proxy.held > held_before
    assert len(committed_ids(fs, root)) == rows  # the decode itself finished and committed
    run = read_manifest(fs, root)["runs"][-1]
    assert run["status"] == "failed" and "out/data" in run["error"] and "\n" not in run["error"]

    assert cli(["resume", f"{bucket}/out", "--s3-endpoint", store.endpoint]) == 0
    assert_complete_and_exact(fs, root, images, tiny_pair[0])
    assert read_manifest(fs, root)["runs"][-1]["rows"] == 0
