"""One writer per output (pipeline/lease.py): a second driver on a live output is refused at once
(exit 2, one line naming the holder), and a holder that died is taken over by `resume` at once.

The unit tests drive `Lease` on a local directory; the drill runs two real drivers on moto S3:
A captions, B is started on the same output and refused, A is SIGKILLed mid-run, and a resume
started right after takes the output over and completes it: nothing lost, nothing twice.
"""
from __future__ import annotations

import json
import os
import socket
import time

import pyarrow.fs as pafs
import pytest

from pipeline.lease import Lease, LeaseHeld, LeaseLost, holder_state
from tests.faults.fault_helpers import (DrillLog, assert_complete_and_exact, caption_argv, committed_ids,
                                        start_driver, wait_for, write_input)
from tests.pipeline_helpers import cli, sigkilled_on_exit

ROWS = 24
BATCH = 4


def lease(tmp_path, run: str, **kwargs) -> Lease:
    kwargs.setdefault("settle_s", 0.05)
    return Lease(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path), run, log=kwargs.pop("log", print), **kwargs)


def test_holder_states():
    now = time.time()
    me = {"run": "r", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now}
    assert holder_state(None) == "free"
    assert holder_state(me, now=now) == "live"
    assert holder_state({**me, "pid": 2 ** 22 + 12345}, now=now) == "gone"          # no such process
    assert holder_state({**me, "host": "elsewhere", "pid": 1, "heartbeat": now - 500}, now=now) == "stale"
    assert holder_state({**me, "host": "elsewhere", "pid": 1, "heartbeat": now - 5}, now=now) == "live"


def test_second_writer_refused_then_free_after_release(tmp_path):
    first = lease(tmp_path, "run-a").acquire()
    with pytest.raises(LeaseHeld, match=r"being written by run run-a on .* \(pid \d+\), last heartbeat \d+s ago"):
        lease(tmp_path, "run-b").acquire()
    first.release()
    assert not (tmp_path / "_lease.json").exists()
    lease(tmp_path, "run-b").acquire().release()


def test_dead_or_silent_holder_is_taken_over_with_a_line(tmp_path):
    lines = []
    (tmp_path / "_lease.json").write_text(json.dumps(
        {"run": "old", "host": socket.gethostname(), "pid": 2 ** 22 + 12345, "heartbeat": time.time()}))
    taken = lease(tmp_path, "new", log=lines.append).acquire()
    assert "taking over" in lines[-1] and "run old" in lines[-1] and "process is gone" in lines[-1]
    taken.release()
    (tmp_path / "_lease.json").write_text(json.dumps(
        {"run": "far", "host": "other-host", "pid": 1, "heartbeat": time.time() - 1000}))
    lease(tmp_path, "new2", log=lines.append, stale_s=60).acquire().release()
    assert "no heartbeat for over 60s" in lines[-1]


def test_holder_that_lost_its_lease_stops_committing(tmp_path):
    holder = lease(tmp_path, "slow", heartbeat_s=0.05).acquire()
    (tmp_path / "_lease.json").write_text(json.dumps(
        {"run": "usurper", "host": "other-host", "pid": 1, "heartbeat": time.time()}))
    wait_for(lambda: holder.lost, 10, "the heartbeat to notice")
    with pytest.raises(LeaseLost, match="taken over by run usurper"):
        holder.check()
    holder.release()
    assert json.loads((tmp_path / "_lease.json").read_text())["run"] == "usurper"  # not deleted


def test_two_drivers_on_one_output_then_holder_killed_and_resumed_at_once(s3, ray_address, tiny_pair, tmp_path,
                                                                          capsys):
    fs = s3.filesystem()
    bucket = s3.make_bucket("twowriters")
    images = write_input(fs, "twowriters/in", ROWS, shards=2, seed=61_000)
    log = DrillLog(str(tmp_path / "drill.jsonl"))
    argv = caption_argv(bucket, tiny_pair, s3.endpoint, ray_address, BATCH)
    first = start_driver(argv, drill_log=log.path, log_path=str(tmp_path / "a.log"), batch_delay_s=0.5)
    with sigkilled_on_exit(first):
        wait_for(log.in_flight, 300, "driver A decoding", first, every=0.1)
        capsys.readouterr()
        assert cli(argv) == 2                                   # driver B: refused at once
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is being written by run" in err and f"pid {first.pid}" in err, err
        wait_for(lambda: committed_ids(fs, "twowriters/out"), 300, "a committed unit", first)
    at_kill = committed_ids(fs, "twowriters/out")
    assert 0 < len(at_kill) < ROWS, "the kill must land mid-run"
    lease_left = json.loads(fs.open_input_stream("twowriters/out/_lease.json").read())
    assert lease_left["pid"] == first.pid                       # a SIGKILLed holder cannot release

    capsys.readouterr()
    assert cli(["resume", f"{bucket}/out", "--s3-endpoint", s3.endpoint]) == 0   # at once: pid gone
    out = capsys.readouterr().out
    assert "taking over" in out and "process is gone" in out, out[-2000:]
    assert_complete_and_exact(fs, "twowriters/out", images, tiny_pair[0])
    manifest = json.loads(fs.open_input_stream("twowriters/out/_run.json").read())
    assert manifest["runs"][-1]["rows"] == ROWS - len(at_kill)
    assert fs.get_file_info("twowriters/out/_lease.json").type == pafs.FileType.NotFound   # released
