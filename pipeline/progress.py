"""Progress of a caption run, read from its committed checkpoint: one line every N seconds.

Ray Data's progress bars need a terminal; in a Ray job's log or a redirected file, the caption
command prints instead

    progress: 1,234/10,000 rows committed (12.3%), 41.2 rows/s this run, ETA 3m33s

counting rows in OUTPUT/_checkpoint/*.parquet (committed files only: Ray renames
*.pending.parquet on commit), so the number is exactly what a resume would skip.
"""
from __future__ import annotations

import posixpath
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers import storage
from pipeline.manifest import read_manifest
from pipeline.layout import CHECKPOINT_DIR


class CommittedRows:
    """Counts rows in committed checkpoint files; each file's footer is read once."""

    def __init__(self, output: str, s3_endpoint: str | None = None):
        self.output, self.s3_endpoint = output, s3_endpoint
        self.fs, root = storage.resolve(output, s3_endpoint)
        self.path = posixpath.join(root, CHECKPOINT_DIR)
        self._rows: dict[str, int] = {}

    def count(self) -> int:
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        files = [e.path for e in self.fs.get_file_info(selector)
                 if e.type == pafs.FileType.File and e.path.endswith(".parquet")
                 and not e.path.endswith(".pending.parquet")]
        for path in files:
            if path not in self._rows:
                try:
                    self._rows[path] = pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows
                except OSError:
                    continue  # renamed or deleted under us; counted next time
        live = set(files)
        return sum(n for path, n in self._rows.items() if path in live)

    def total(self) -> int | None:
        """Input rows, from _run.json (written once the input is scanned)."""
        try:
            return (read_manifest(self.output, self.s3_endpoint) or {}).get("input", {}).get("rows")
        except (OSError, ValueError):
            return None


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
