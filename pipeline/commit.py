"""Commits: the rows of one unit (pipeline/plan.py) become one Parquet file, written atomically.

    OUTPUT/data/unit-00000042.parquet    rows [42 * commit_rows, 43 * commit_rows) of the input

The file *is* the commit: on S3 an object appears only when its upload completes; on a local
disk it is written under a hidden temporary name and renamed. There is no separate marker, so
there is never an orphan (a data file whose commit is missing) for a reader to skip: every
`data/unit-*.parquet` holds committed rows and nothing else. A unit's rows come back from the
caption actors in any order, in several batches; `UnitWriter` buffers them on the driver (deduped
by global row index) and writes the unit once all its rows are there. A killed driver loses the
units that were incomplete; a resume redoes exactly those.

Each file's footer carries its ok count (`specllava.ok`), so totals are O(units) footer reads.
"""
from __future__ import annotations

import posixpath
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.plan import unit_rows
from workers import storage
from workers.schema import ROW_COLUMN, STATUS_OK

UNIT_FILE = re.compile(r"^unit-(\d{8,})\.parquet$")
OK_KEY = b"specllava.ok"


def unit_name(unit: int) -> str:
    return f"unit-{unit:08d}.parquet"


def committed_units(fs, data_path: str) -> set[int]:
    """Indices of the committed units: one listing of OUTPUT/data."""
    selector = pafs.FileSelector(data_path, allow_not_found=True)
    units = set()
    for entry in fs.get_file_info(selector):
        match = UNIT_FILE.match(posixpath.basename(entry.path))
        if match and entry.type == pafs.FileType.File:
            units.add(int(match.group(1)))
    return units


def foreign_files(fs, data_path: str) -> list[str]:
    """Files in OUTPUT/data that are not committed units (another layout, or foreign objects)."""
    selector = pafs.FileSelector(data_path, allow_not_found=True)
    return sorted(e.path for e in fs.get_file_info(selector)
                  if e.type == pafs.FileType.File and not posixpath.basename(e.path).startswith(".")
                  and not UNIT_FILE.match(posixpath.basename(e.path)))


def remove_temporaries(fs, data_path: str) -> int:
    """Delete hidden `.unit-*.tmp*` files a killed local driver left behind (never read by anyone)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return 0
    selector = pafs.FileSelector(data_path, allow_not_found=True)
    stale = [e.path for e in fs.get_file_info(selector) if posixpath.basename(e.path).startswith(".unit-")]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def unit_footers(fs, data_path: str, units: set[int]) -> tuple[int, int]:
    """(rows, ok rows) over the given committed units, from their footers only (threads)."""
    def read(unit: int) -> tuple[int, int]:
        meta = pq.read_metadata(posixpath.join(data_path, unit_name(unit)), filesystem=fs)
        ok = (meta.metadata or {}).get(OK_KEY)
        return meta.num_rows, int(ok) if ok is not None else -1
    with ThreadPoolExecutor(max_workers=16) as pool:
        pairs = list(pool.map(read, sorted(units)))
    return sum(r for r, _ in pairs), sum(max(0, ok) for _, ok in pairs)


@dataclass
class RunCounters:
    """What this run committed (summed as units are written)."""
    rows: int = 0
    ok: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    units: int = 0
    duplicates_dropped: int = 0
    received: int = 0       # rows decoded and handed to the writer, committed or not yet (progress lines)


@dataclass
class _Pending:
    seen: np.ndarray                     # [unit rows] bool: rows of the unit received so far
    parts: list[pa.Table] = field(default_factory=list)
    count: int = 0


class UnitWriter:
    """Collects output rows (with ROW_COLUMN) into units and commits each complete unit.

    `add(table)` may be called with rows of any units in any order; a row seen twice (a batch
    Ray re-ran) is dropped. Writes run on `max_writes` threads; `add` waits when that many are
    pending, so the driver's buffer stays bounded. `close()` waits for the writes and raises the
    first write error, if any.
    """

    def __init__(self, fs, data_path: str, num_rows: int, commit_rows: int, max_writes: int = 4, guard=None):
        self.fs, self.data_path = fs, data_path
        self.guard = guard  # called before each commit; raises to stop writing (pipeline/lease.py)
        self.num_rows, self.commit_rows = num_rows, commit_rows
        self.counters = RunCounters()
        self._pending: dict[int, _Pending] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_writes, thread_name_prefix="specllava-commit")
        self._slots = threading.BoundedSemaphore(2 * max_writes)
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        fs.create_dir(data_path, recursive=True)

    @property
    def open_units(self) -> int:
        return len(self._pending)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        rows = table.column(ROW_COLUMN).to_numpy()  # [n] global row index
        units = rows // self.commit_rows
        order = np.argsort(units, kind="stable")
        bounds = np.flatnonzero(np.diff(units[order])) + 1
        for idx in np.split(order, bounds):
            unit = int(units[idx[0]])
            pending = self._pending.get(unit)
            if pending is None:
                pending = self._pending[unit] = _Pending(np.zeros(unit_rows(unit, self.num_rows, self.commit_rows),
                                                                  dtype=bool))
            local = rows[idx] - unit * self.commit_rows
            local, first = np.unique(local, return_index=True)
            fresh = ~pending.seen[local]
            dropped = len(idx) - int(fresh.sum())
            if dropped:
                self.counters.duplicates_dropped += dropped
            if not fresh.any():
                continue
            pending.seen[local[fresh]] = True
            self.counters.received += int(fresh.sum())
            pending.parts.append(table.take(pa.array(idx[first[fresh]])))
            pending.count += int(fresh.sum())
            if pending.count == len(pending.seen):
                del self._pending[unit]
                self._submit(unit, pending.parts)
        self._raise_failed()

    def _submit(self, unit: int, parts: list[pa.Table]) -> None:
        self._slots.acquire()
        future = self._pool.submit(self._write, unit, parts)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write(self, unit: int, parts: list[pa.Table]) -> None:
        table = pa.concat_tables(parts)
        table = table.sort_by(ROW_COLUMN).drop_columns([ROW_COLUMN])
        ok = int(pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0)
        table = table.replace_schema_metadata({OK_KEY: str(ok).encode()})
        if self.guard is not None:
            self.guard()
        storage.retry_io(self._put, table, unit)  # a complete object, so repeating it is safe
        new_tokens = pc.sum(table.column("new_tokens")).as_py() or 0
        forwards = pc.sum(table.column("target_forwards")).as_py() or 0
        with self._lock:
            c = self.counters
            c.rows += table.num_rows
            c.ok += ok
            c.new_tokens += new_tokens
            c.target_forwards += forwards
            c.units += 1

    def _put(self, table: pa.Table, unit: int) -> None:
        storage.write_atomic(self.fs, posixpath.join(self.data_path, unit_name(unit)),
                             lambda target: pq.write_table(table, target, filesystem=self.fs))

    def _raise_failed(self) -> None:
        done = [f for f in self._futures if f.done()]
        for future in done:
            future.result()  # raises the write's error
        self._futures = [f for f in self._futures if not f.done()]

    def close(self) -> None:
        """Wait for every submitted write; raise the first error."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        self._futures = []

    def abandon(self) -> None:
        """Stop without waiting for writes still queued (a failed run); incomplete units are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
