"""Progress of a caption run, read from its committed units: one line every N seconds.

Ray Data's progress bars need a terminal; in a Ray job's log or a redirected file, the caption
command prints instead

    progress: 1,234/10,000 rows committed (12.3%), 41.2 rows/s this run, ETA 3m33s

counting committed units (one listing of OUTPUT/data; a unit's row count follows from its
index and the plan's unit size in _run.json), so the number is exactly what a resume would skip
and the cost of a line grows with units, never with rows.
"""
from __future__ import annotations

import posixpath
import threading
import time

from pipeline.commit import committed_units
from pipeline.layout import DATA_DIR
from pipeline.manifest import read_manifest
from pipeline.plan import unit_rows
from workers import storage


class CommittedRows:
    """Rows in committed units of an output (0 until the run's _run.json names its units)."""

    def __init__(self, output: str, s3_endpoint: str | None = None):
        self.output, self.s3_endpoint = output, s3_endpoint
        self.fs, root = storage.resolve(output, s3_endpoint)
        self.path = posixpath.join(root, DATA_DIR)
        self._input: dict | None = None

    def _plan(self) -> dict | None:
        if self._input is None:
            try:
                self._input = (read_manifest(self.output, self.s3_endpoint) or {}).get("input") or None
            except (OSError, ValueError):
                return None
        return self._input

    def count(self) -> int:
        plan = self._plan()
        if not plan or not plan.get("commit_rows"):
            return 0
        return sum(unit_rows(u, plan["rows"], plan["commit_rows"]) for u in committed_units(self.fs, self.path))

    def total(self) -> int | None:
        """Input rows, from _run.json (written once the input is planned)."""
        plan = self._plan()
        return plan.get("rows") if plan else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(done: int, total: int | None, rate: float | None) -> str:
    text = f"progress: {done:,}"
    if total:
        text += f"/{total:,} rows committed ({100.0 * done / total:.1f}%)"
    else:
        text += " rows committed"
    if rate:
        text += f", {rate:.1f} rows/s this run"
        if total and done < total:
            text += f", ETA {_duration((total - done) / rate)}"
    return text


class CheckpointProgress:
    """Context manager: a daemon thread printing `progress_line` every `every_s` seconds (0: off)."""

    def __init__(self, output: str, s3_endpoint: str | None = None, every_s: float = 10.0, log=None):
        self.output, self.s3_endpoint, self.every_s, self.log = output, s3_endpoint, every_s, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._loop, name="specllava-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False

    def _loop(self) -> None:
        log = self.log or (lambda line: print(line, flush=True))
        try:
            counter = CommittedRows(self.output, self.s3_endpoint)
            before = counter.count()  # rows of earlier runs (a resume)
        except (OSError, ValueError):
            before = None
        start, total = time.monotonic(), None
        while not self._stop.wait(self.every_s):
            try:
                if before is None:
                    counter = CommittedRows(self.output, self.s3_endpoint)
                    before = 0
                done = counter.count()
                total = total or counter.total()
            except (OSError, ValueError):
                continue  # storage hiccup: the run itself reports real failures
            rate = (done - before) / (time.monotonic() - start) if done > before else None
            log(progress_line(done, total, rate))
