"""One writer per output: a lease object, OUTPUT/_lease.json, renewed by a heartbeat.

    {"run": "20261129T052301-4f2a", "host": "node-3", "pid": 12345, "acquired": 1764393781.2,
     "heartbeat": 1764393841.9}

`acquire` refuses (LeaseHeld, exit 2, one line naming the holder's run, host, pid and heartbeat
age) while another writer holds a live lease. A lease is taken over, with a line saying so, when
its holder is gone: same host and its pid no longer runs, or a heartbeat older than `stale_s`
(another host, or a hung driver). So `resume` right after a crash just works.

Object stores offer no atomic create-if-absent through pyarrow, so acquiring is: read the lease,
refuse a live one, write ours, wait `settle_s`, read it back. Of two drivers that both saw no
lease, the one whose write came last wins and the other sees it and refuses; both would have had
to read before either wrote and write more than `settle_s` apart to both win (one request each).
A holder that finds someone else's lease at a heartbeat (it was taken over: its heartbeats had
stopped for `stale_s`) marks itself `lost`; the unit writer then stops committing.
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

from pipeline.config import PipelineError
from pipeline.layout import LEASE_NAME
from workers import storage

HEARTBEAT_S = 15.0
STALE_S = 120.0
SETTLE_S = 2.0        # object stores: last writer wins after this long
LOCAL_SETTLE_S = 0.5  # a local disk: a rename is atomic, the read-to-write gap is microseconds


class LeaseHeld(PipelineError):
    """Another live writer holds the output."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over; it must stop writing."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(lease: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(lease.get("heartbeat", 0))
    return (f"run {lease.get('run', '?')} on {lease.get('host', '?')} (pid {lease.get('pid', '?')}), "
            f"last heartbeat {age:.0f}s ago")


def holder_state(lease: dict | None, stale_s: float = STALE_S, now: float | None = None) -> str:
    """"free", "live", "gone" (same host, process ended) or "stale" (no heartbeat for stale_s)."""
    if not lease:
        return "free"
    now = now or time.time()
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1))):
        return "gone"
    if now - float(lease.get("heartbeat", 0)) > stale_s:
        return "stale"
    return "live"


class Lease:
    def __init__(self, fs, root: str, output: str, run_id: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, settle_s: float | None = None, log=print):
        self.fs, self.path, self.output = fs, posixpath.join(root, LEASE_NAME), output
        if settle_s is None:
            settle_s = LOCAL_SETTLE_S if isinstance(fs, pafs.LocalFileSystem) else SETTLE_S
        self.run_id, self.heartbeat_s, self.stale_s, self.settle_s, self.log = \
            run_id, heartbeat_s, stale_s, settle_s, log
        self.record = {"run": run_id, "host": socket.gethostname(), "pid": os.getpid(), "acquired": time.time()}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- store ---------------------------------------------------------------------------------
    def read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return json.loads(stream.read().decode())
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as no valid holder
            return {}

    def _write(self) -> None:
        data = json.dumps({**self.record, "heartbeat": time.time()}).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        storage.write_bytes_atomic(self.fs, self.path, data)

    # --- life cycle ----------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Hold the lease (LeaseHeld if a live writer has it), then renew it in the background."""
        current = self.read()
        state = holder_state(current, self.stale_s)
        if state == "live" and current.get("run") != self.run_id:
            raise LeaseHeld(f"{self.output} is being written by {describe(current)}; wait for it to end, "
                            f"or `specllava stop` that job (a dead holder is taken over after {self.stale_s:.0f}s "
                            "without heartbeat)")
        if state in ("gone", "stale"):
            why = "its process is gone" if state == "gone" else "no heartbeat for over " f"{self.stale_s:.0f}s"
            self.log(f"specllava: taking over {self.output} from {describe(current)}: {why}")
        self._write()
        time.sleep(self.settle_s)
        mine = self.read()
        if not mine or mine.get("run") != self.run_id:
            raise LeaseHeld(f"{self.output} was just taken by {describe(mine or {})}; "
                            "only one caption/resume may write an output at a time")
        self._thread = threading.Thread(target=self._beat, name="specllava-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.read()
                if current is not None and current.get("run") not in (None, self.run_id):
                    self.lost = describe(current)
                    self.log(f"specllava: lost {self.output} to {self.lost}; this run stops committing")
                    return
                self._write()
            except OSError:
                continue  # the store is away for a moment; the next beat tries again

    def check(self) -> None:
        """LeaseLost if another writer took the output over."""
        if self.lost:
            raise LeaseLost(f"{self.output} was taken over by {self.lost}")

    def stop_heartbeat(self) -> None:
        """No more renewals (the lease file stays until release, or until the output is removed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        self.stop_heartbeat()
        if self.lost:
            return
        try:
            current = self.read()
            if current and current.get("run") == self.run_id:
                self.fs.delete_file(self.path)
        except OSError:
            pass  # a stale lease is taken over by the next writer

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def check_free(fs, root: str, output: str, stale_s: float = STALE_S) -> None:
    """LeaseHeld if a live writer holds `output` (for `submit`, before a job is sent)."""
    lease = Lease(fs, root, output, run_id="check")
    current = lease.read()
    if holder_state(current, stale_s) == "live":
        raise LeaseHeld(f"{output} is being written by {describe(current)}; not submitting a second writer")
