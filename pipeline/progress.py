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


def progress_line(done: int, total: int | None, rate: float | None, *, ok: int | None = None,
                  error: int | None = None, mean_accepted: float | None = None, stalled: str | None = None,
                  uncommitted: int = 0) -> str:
    """uncommitted: rows decoded this run whose unit is not complete yet (counted in the rate and
    the ETA, shown so that a long first unit does not look like a run doing nothing)."""
    text = f"progress: {done:,}"
    if total:
        text += f"/{total:,} rows committed ({100.0 * done / total:.1f}%)"
    else:
        text += " rows committed"
    if uncommitted:
        text += f", {uncommitted:,} more decoded (in units not yet complete)"
    if rate:
        text += f", {rate:.1f} rows/s this run"
        if total and done + uncommitted < total:
            text += f", ETA {_duration((total - done - uncommitted) / rate)}"
    if ok is not None and error is not None:
        text += f", this run {ok:,} ok / {error:,} error"
    if mean_accepted is not None:
        text += f", mean accepted {mean_accepted:.2f}"
    if stalled:
        text += f"; {stalled}"
    return text


def ray_resources_hint() -> str:
    """What Ray says about free resources (why actors or tasks may be waiting)."""
    try:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception:  # noqa: BLE001 - only a hint; Ray may be shutting down
        return ""
    parts = [f"{key} {free.get(key, 0.0):g}/{total[key]:g} free" for key in ("CPU", "GPU") if key in total]
    if "GPU" not in total:
        parts.append("no GPU in the cluster")
    return "Ray: " + ", ".join(parts)


class RunProgress:
    """Progress of the run in this process, from the unit writer's counters (no store reads).

    On a terminal: one tqdm bar (rows committed / total, rows/s, ETA, ok/error, mean accepted
    length). Otherwise (Ray job logs, redirects): one `progress_line` every `every_s` seconds.
    When nothing has been committed for `stall_s` while rows remain, the line says so and why:
    `why()` (default: what Ray has free; a run passes pipeline.watch's, which adds how many
    actors of each pool run and how many wait for resources — the usual reason).
    """

    def __init__(self, total: int, before: int, every_s: float = 10.0, tty: bool = False,
                 stall_s: float = 180.0, log=None, why=None):
        self.total, self.before, self.every_s, self.tty, self.stall_s = total, before, every_s, tty, stall_s
        self.why = why or ray_resources_hint
        self.log = log or (lambda line: print(line, flush=True))
        self.counters = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, counters) -> None:
        self.counters = counters

    def __enter__(self):
        if self.every_s > 0 or self.tty:
            self._thread = threading.Thread(target=self._loop, name="specllava-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False

    def _state(self, start: float, last_change: float, now: float) -> dict:
        c = self.counters
        rows = c.rows if c is not None else 0
        from decoding.stats import mean_accepted_length

        tau = mean_accepted_length(c.new_tokens, c.target_forwards, c.ok) if c is not None and c.ok else None
        stalled = None
        if now - last_change > self.stall_s and self.before + rows < self.total:
            stalled = f"nothing committed for {_duration(now - last_change)}"
            hint = self.why()
            stalled += f" ({hint})" if hint else ""
        decoded = max(c.received, rows) if c is not None else 0      # committed + in units not complete yet
        return dict(done=self.before + rows, rows=rows, ok=c.ok if c else 0, error=(c.rows - c.ok) if c else 0,
                    tau=tau, rate=decoded / (now - start) if decoded else None, stalled=stalled,
                    uncommitted=decoded - rows)

    def _loop(self) -> None:
        start = last_change = time.monotonic()
        seen = -1
        bar = None
        if self.tty:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=self.before, unit="row", desc="captions", dynamic_ncols=True)
        interval = 0.5 if self.tty else self.every_s
        try:
            while not self._stop.wait(interval):
                now = time.monotonic()
                state = self._state(start, last_change, now)
                if state["rows"] != seen:
                    seen, last_change = state["rows"], now
                if bar is not None:
                    _render(bar, state)
                else:
                    self.log(progress_line(state["done"], self.total, state["rate"], ok=state["ok"],
                                           error=state["error"], mean_accepted=state["tau"], stalled=state["stalled"],
                                           uncommitted=state["uncommitted"]))
        finally:
            if bar is not None:   # the last commit's counts too, so the bar ends where the summary does
                _render(bar, self._state(start, last_change, time.monotonic()))
                bar.close()


def _render(bar, state: dict) -> None:
    """The terminal bar at `state`: rows done, this run's ok/error and mean accepted length."""
    bar.n = state["done"]
    post = {"ok": state["ok"], "error": state["error"]}
    if state["tau"] is not None:
        post["tau"] = f"{state['tau']:.2f}"
    bar.set_postfix(post, refresh=False)
    if state["stalled"]:
        bar.set_description_str(f"captions ({state['stalled']})", refresh=False)
    bar.refresh()
