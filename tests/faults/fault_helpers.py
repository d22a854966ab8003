"""Shared pieces of the fault drills: a faulty S3 store, the caption actors' drill log, driver
processes, and the one check every drill ends with ("every input id exactly once, ok rows equal
the target's greedy captions").

- `FaultProxy`: a TCP proxy in front of an S3 server. `stop()`/`start()` take the store away
  (new connections refused, open ones cut) and bring it back on the same port; `hold(pred)`
  parks every request whose head matches until `release()`, which drops them, so a test can
  stop the pipeline at an exact step (a read of an input shard, the upload of a unit).
- `faulty_store`: a module fixture: its own moto server (own port) behind a `FaultProxy`, so
  the session's `s3` server is never disturbed. Tests inspect the store directly, not
  through the proxy.
- `DrillLog`: reads the JSON lines caption actors write when SPECLLAVA_DRILL_LOG is set
  (workers/drill.py): "init" per actor start, "start"/"return" per batch with the actor's pid
  and the batch's ids.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests import REPO_ROOT
from workers.drill import BATCH_DELAY_ENV, LOG_ENV
from tests.pipeline_helpers import CLI_SUBPROCESS, png_bytes, processed_inputs, reference_captions, write_shard

MAX_NEW = 8
COMMIT = 8  # rows per committed unit in the drills: two batches of 4, so commits land mid-run
# Small stages for a 2-core box shared with other test runs.
SMALL = ["--max-new-tokens", str(MAX_NEW), "--stage-cpus", "0.25", "--cpus-per-actor", "0.5",
         "--commit-rows", str(COMMIT)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """127.0.0.1:port → upstream, one thread pair per connection. Thread-safe controls."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._hold = None              # predicate(request head: bytes) -> bool, or None
        self._released = threading.Event()
        self.held = 0                  # requests parked by hold() so far
        self.cut = 0                   # connections cut by stop() or release()
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(256)
        with self._lock:
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        """The store goes away: the port refuses connections and open connections are cut."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            _cut(listener)
        for conn in conns:
            _cut(conn)
        self.cut += len(conns) // 2

    def hold(self, predicate) -> None:
        self._released.clear()
        self._hold = predicate

    def release(self) -> None:
        """Stop holding; parked requests are dropped (their connections cut), never forwarded."""
        self._hold = None
        self._released.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                _cut(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _cut(client), _cut(upstream)
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                hold = self._hold
                if requests and hold is not None and hold(data[:4096]):
                    self.held += 1
                    self._released.wait()
                    self.cut += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src), self._conns.discard(dst)
            _cut(src), _cut(dst)


def request_line(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0]


def reads_of(prefix: str):
    """Hold predicate: any request for an object under `prefix` (bucket/key...)."""
    needle = f" /{prefix}".encode()
    return lambda head: needle in request_line(head)


def unit_commits(head: bytes) -> bool:
    """Hold predicate: the upload of a committed unit, OUTPUT/data/unit-N.parquet (a PUT, or the
    POSTs of a multipart upload): the commit itself, since the object exists only once it completes."""
    line = request_line(head)
    return b"/data/unit-" in line and (line.startswith(b"PUT ") or line.startswith(b"POST "))


@dataclass
class FaultyStore:
    direct_endpoint: str
    proxy: FaultProxy

    @property
    def endpoint(self) -> str:
        """What the pipeline is given: through the proxy."""
        return self.proxy.endpoint

    def filesystem(self):
        """What the test inspects with: straight to the server, unaffected by faults."""
        from workers.storage import s3_filesystem
        return s3_filesystem(self.direct_endpoint)

    def make_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def faulty_store(s3):
    """Own moto server + proxy; depends on `s3` for the fake AWS environment (set before Ray)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(port)
    try:
        yield FaultyStore(f"http://127.0.0.1:{port}", proxy)
    finally:
        proxy.release()
        proxy.stop()
        server.stop()


# ---- input, runs, output -------------------------------------------------------------------

def write_input(fs, prefix: str, rows: int, shards: int, seed: int) -> dict:
    """`shards` Parquet shards of tiny PNGs under `prefix`; returns {id: image bytes}."""
    images = {}
    per = -(-rows // shards)
    for shard in range(shards):
        ids = [f"{prefix.split('/')[0]}-{shard}-{i:05d}" for i in range(per) if shard * per + i < rows]
        for j, key in enumerate(ids):
            images[key] = png_bytes(seed + shard * per + j)
        write_shard(fs, f"{prefix}/{shard}.parquet",
                    pa.table({"id": ids, "image": pa.array([images[k] for k in ids], pa.binary())}))
    return images


def caption_argv(bucket: str, pair, endpoint: str, address: str, batch: int, *extra: str) -> list[str]:
    return ["caption", "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--target", pair[0],
            "--draft", pair[1], "--s3-endpoint", endpoint, "--address", address,
            "--batch-size", str(batch), *SMALL, *extra]


def start_driver(argv: list[str], drill_log: str | None = None, log_path: str | None = None,
                 batch_delay_s: float = 0.0) -> subprocess.Popen:
    """`specllava ARGV` in its own process (so it can be SIGKILLed), attached to the session Ray;
    `drill_log` and `batch_delay_s` switch on the caption actors' drill hooks (workers/drill.py)."""
    env = os.environ.copy()
    if drill_log:
        env[LOG_ENV] = drill_log
    if batch_delay_s:
        env[BATCH_DELAY_ENV] = str(batch_delay_s)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, *CLI_SUBPROCESS, *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO_ROOT)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.1):
    """Poll `condition()` until truthy (returned); fail after `timeout` s or if `proc` exits."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited (rc {proc.returncode}) while waiting for {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _files(fs, path: str) -> list[str]:
    return [e.path for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if e.type == pafs.FileType.File]


def data_files(fs, root: str) -> set[str]:
    """Every file under OUTPUT/data, hidden temporaries included."""
    return set(_files(fs, f"{root}/data"))


def unit_files(fs, root: str) -> tuple[set[str], set[str]]:
    """(committed units, anything else) under OUTPUT/data: a unit file is its own commit."""
    files = data_files(fs, root)
    committed = {p for p in files if p.rsplit("/", 1)[-1].startswith("unit-") and p.endswith(".parquet")}
    return committed, files - committed


def committed_ids(fs, root: str) -> set:
    committed, _ = unit_files(fs, root)
    if not committed:
        return set()
    return set(pq.ParquetDataset(sorted(committed), filesystem=fs).read().column("id").to_pylist())


def read_manifest(fs, root: str) -> dict:
    with fs.open_input_stream(f"{root}/_run.json") as stream:
        return json.loads(stream.read())


def read_table(fs, root: str) -> pa.Table:
    return pads.dataset(f"{root}/data", filesystem=fs, format="parquet").to_table()


def assert_exactly_once(table: pa.Table, images: dict) -> None:
    ids = table.column("id").to_pylist()
    dupes = [k for k, n in Counter(ids).items() if n > 1]
    missing = set(images) - set(ids)
    assert not dupes and not missing and len(ids) == len(images), \
        f"{len(dupes)} duplicated (e.g. {dupes[:3]}), {len(missing)} missing (e.g. {sorted(missing)[:3]})"


_REFERENCE_CACHE: dict = {}


def reference(target_dir: str, images: dict) -> dict:
    """The target's own greedy captions of `images` (default prompt), cached per image bytes."""
    from workers.preprocess import Preprocessor

    todo = {k: v for k, v in images.items() if (target_dir, v) not in _REFERENCE_CACHE}
    if todo:
        rows = processed_inputs(Preprocessor(target_dir, image_column="image"), todo)
        for key, caption in reference_captions(target_dir, rows, MAX_NEW).items():
            _REFERENCE_CACHE[(target_dir, todo[key])] = caption
    return {k: _REFERENCE_CACHE[(target_dir, v)] for k, v in images.items()}


def assert_complete_and_exact(fs, root: str, images: dict, target_dir: str) -> pa.Table:
    """Every input id exactly once, every row ok, every caption the target's greedy caption."""
    table = read_table(fs, root)
    assert_exactly_once(table, images)
    rows = {r["id"]: r for r in table.select(["id", "status", "error", "caption"]).to_pylist()}
    errors = {k: r["error"] for k, r in rows.items() if r["status"] != "ok"}
    assert not errors, f"{len(errors)} error rows, e.g. {list(errors.items())[:3]}"
    ref = reference(target_dir, images)
    wrong = [k for k in images if rows[k]["caption"] != ref[k]]
    assert not wrong, f"{len(wrong)} captions differ from the target's greedy ones, e.g. {wrong[:3]}"
    manifest = read_manifest(fs, root)
    assert manifest["status"] == "finished", manifest["status"]
    assert manifest["counts"]["unique_ids"] == manifest["counts"]["output_rows"] == len(images)
    return table


class DrillLog:
    """The caption actors' event log (one JSON object per line)."""

    def __init__(self, path: str):
        self.path = path

    def events(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def in_flight(self) -> list[dict]:
        """"start" events not yet followed by their "return" (batches being decoded now)."""
        open_batches = {}
        for e in self.events():
            key = (e["pid"], tuple(e["ids"] or ()))
            if e["event"] == "start":
                open_batches[key] = e
            elif e["event"] == "return":
                open_batches.pop(key, None)
        return list(open_batches.values())

    def starts(self) -> Counter:
        """How many times each batch (its tuple of ids) was started, over all actors."""
        return Counter(tuple(e["ids"]) for e in self.events() if e["event"] == "start")

    def redecoded(self) -> dict:
        """{batch ids: times started} for batches decoded more than once. Only meaningful within
        one run: a resumed run re-forms its batches from the ids not yet committed."""
        return {ids: n for ids, n in self.starts().items() if n > 1}

    def id_starts(self, since: float = 0.0) -> Counter:
        """How many times each id was in a started batch (events at or after `since`)."""
        return Counter(i for e in self.events() if e["event"] == "start" and e["t"] >= since for i in e["ids"])

    def rows_started(self) -> int:
        return sum(len(ids) * n for ids, n in self.starts().items())
