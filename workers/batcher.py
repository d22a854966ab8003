"""Continuous batching for a caption actor: one decode thread keeps up to `max_rows` rows decoding.

Ray Data hands the actor several input batches at once (`max_concurrent_batches`); each one is
`submit`ted here and gets a future. The decode thread owns a `decoding.SpeculativeEngine`:

    loop:
        admit queued rows if the engine is empty, or at least `admit_min_free` slots are free
        (all queued rows that fit, oldest first, in one prefill);
        one engine step for every active row;
        finished rows go back to their batch; a batch's future resolves when its last row is done.

A caller may ask for the engine to be drained (`request_drain`): admission stops, the running
rows finish, and the given function runs on the decode thread with the engine empty (the
actor re-measures its tree budget there, see workers/caption.py); then admission resumes.
Nothing queued is lost; rows only wait.

So the batch stays full as captions of different lengths finish, and an input batch is
returned only when complete (exactly one output row per input row, as before). Joining costs
one prefill of the joining rows while the others wait; `admit_min_free` bounds how often that
happens (see docs/pipeline.md, "Continuous batching").

A model error (OOM, a bad pair) fails every batch the engine held, and the engine starts again
empty: Ray Data then retries those batches as it would any failed task.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RowRequest:
    """One ok row to caption: prompt ids (no padding), its image, and its sampling seed."""

    input_ids: np.ndarray                 # [T] int
    pixel_values: torch.Tensor | None     # [1, C, H, W] ([1, tiles, C, H, W] for NeXT) or None
    seed: int | None = None
    image_sizes: torch.Tensor | None = None   # [1, 2] (height, width) for any-resolution targets


@dataclass
class RowResult:
    tokens: list[int]
    stats: object                         # decoding.RowStats
    decode_s: float                       # wall time from the row's prefill to its last token


@dataclass
class _Ticket:
    future: concurrent.futures.Future
    results: list
    remaining: int


@dataclass
class _Queued:
    ticket: _Ticket
    index: int
    request: RowRequest
    admitted_at: float = 0.0


@dataclass
class BatcherStats:
    steps: int = 0
    admissions: int = 0
    admitted_rows: int = 0
    prefill_s: float = 0.0                # wall time spent admitting (prefill of joining rows)
    step_s: float = 0.0
    row_steps: int = 0                    # sum over steps of active rows (mean batch = row_steps/steps)
    max_active: int = 0
    history: list = field(default_factory=list)   # active rows per step, when record_history
    step_log: list = field(default_factory=list)  # (active rows, seconds) per step, when record_history
    admit_log: list = field(default_factory=list)  # (rows, seconds) per admission, when record_history


class ContinuousBatcher:
    """Runs `engine` (a decoding.SpeculativeEngine) on its own thread across submitted batches."""

    def __init__(self, engine, max_rows: int, pad_token_id: int = 0, admit_min_free: int | None = None,
                 record_history: bool = False, torch_threads: int | None = None, step_monitor=None):
        """step_monitor(rows, seconds, result): called on the decode thread after every step."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine = engine
        self.max_rows = max_rows
        self.pad_token_id = pad_token_id
        self.admit_min_free = admit_min_free or max(1, max_rows // 8)
        self.stats = BatcherStats()
        self._record = record_history
        self._queue: deque[_Queued] = deque()
        self._running: dict[int, _Queued] = {}
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._torch_threads = torch_threads
        self.step_monitor = step_monitor
        self._drain_then = None              # run on the decode thread once the engine is empty
        self._recent: deque[RowRequest] = deque(maxlen=8)   # the last admitted requests (for _drain_then)
        self._thread = threading.Thread(target=self._loop, name="caption-decode", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------------
    def submit(self, rows: list[RowRequest]) -> concurrent.futures.Future:
        """Queue a batch's rows; the future's result is a list of RowResult in the same order."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not rows:
            future.set_result([])
            return future
        ticket = _Ticket(future=future, results=[None] * len(rows), remaining=len(rows))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.extend(_Queued(ticket, i, row) for i, row in enumerate(rows))
            self._cond.notify()
        return future

    def request_drain(self, then) -> None:
        """Stop admitting, let the running rows finish, then call `then(samples)` on the decode thread
        with the engine empty (samples: up to 8 queued or recently admitted RowRequests); admission
        resumes after it. `then` should not raise: an exception fails the queued batches, as a model
        error does."""
        with self._cond:
            self._drain_then = then
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- decode thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)   # OpenMP settings are per thread
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self.engine.active:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the batcher was closed with rows in flight"))
                    return
            try:
                if self._drain_then is not None and not self.engine.active:
                    self._run_drained()
                    continue
                while True:  # again when rows finished at their first token and slots are still free
                    with self._cond:
                        admit = self._take_admissible()
                    if not admit:
                        break
                    self._admit(admit)
                if self.engine.active:
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting batch
                with self._cond:
                    self._fail_all(exc)
                self.engine = self.engine.fresh()

    def _run_drained(self) -> None:
        """The drained engine's turn for `_drain_then`; the engine starts again empty afterwards, so
        whatever ran there had the device's memory without this engine's pools."""
        with self._cond:
            then, self._drain_then = self._drain_then, None
            samples = [q.request for q in itertools.islice(self._queue, 8)] or list(self._recent)
        self.engine = self.engine.fresh()
        then(samples)

    def _take_admissible(self) -> list[_Queued]:
        """The oldest queued rows the engine can hold now: within `max_rows` and, for an engine with
        a KV plan, rows whose whole decode its pools guarantee (engine.can_admit). None while a
        drain is requested."""
        free = self.max_rows - self.engine.active
        if not self._queue or free <= 0 or self._drain_then is not None:
            return []
        if self.engine.active and free < min(self.admit_min_free, len(self._queue)):
            return []
        rows = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        while rows and not self.engine.can_admit(len(rows), max(len(r.request.input_ids) for r in rows)):
            self._queue.appendleft(rows.pop())
        if not rows and not self.engine.active:   # the oldest row does not fit even an empty engine
            self._refuse(self._queue.popleft())
        return rows

    def _refuse(self, queued: _Queued) -> None:
        """Fail the batch of a row no KV plan of this engine can hold (caller holds the lock)."""
        from decoding.errors import CapacityError

        n = len(queued.request.input_ids)
        exc = CapacityError(f"a prompt of {n} tokens needs {self.engine.row_length(n)} KV slots a row, the actor's "
                            f"plan gives {self.engine.max_length}: shorten the prompt or give more memory "
                            "(--kv-memory-gb)")
        ticket = queued.ticket
        self._queue = deque(q for q in self._queue if q.ticket is not ticket)
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    def _admit(self, rows: list[_Queued]) -> None:
        t0 = time.perf_counter()
        keys = [next(self._keys) for _ in rows]
        for key, row in zip(keys, rows):
            row.admitted_at = t0
            self._running[key] = row
            self._recent.append(row.request)
        input_ids, attention_mask = left_pad([r.request.input_ids for r in rows], self.pad_token_id)
        pixels = [r.request.pixel_values for r in rows if r.request.pixel_values is not None]
        pixel_values = torch.cat(pixels) if pixels else None
        sizes = [r.request.image_sizes for r in rows if r.request.image_sizes is not None]
        seeds = [r.request.seed for r in rows] if self.engine.options.sampling else None
        finished = self.engine.add(input_ids, attention_mask, pixel_values, keys=keys, seeds=seeds,
                                   image_sizes=torch.cat(sizes) if sizes else None)
        elapsed = time.perf_counter() - t0
        self.stats.admissions += 1
        self.stats.admitted_rows += len(rows)
        self.stats.prefill_s += elapsed
        if self._record:
            self.stats.admit_log.append((len(rows), elapsed))
        self._deliver(finished)

    def _step(self) -> None:
        t0 = time.perf_counter()
        active = self.engine.active
        result = self.engine.step()
        self.stats.steps += 1
        self.stats.row_steps += active
        self.stats.max_active = max(self.stats.max_active, active)
        elapsed = time.perf_counter() - t0
        self.stats.step_s += elapsed
        if self._record:
            self.stats.history.append(active)
            self.stats.step_log.append((active, elapsed))
        self._deliver(result.finished)
        if self.step_monitor is not None:
            self.step_monitor(active, elapsed, result)

    def _deliver(self, finished) -> None:
        now = time.perf_counter()
        for row in finished:
            queued = self._running.pop(row.key)
            ticket = queued.ticket
            ticket.results[queued.index] = RowResult(row.tokens, row.stats, now - queued.admitted_at)
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.future.done():
                ticket.future.set_result(ticket.results)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every batch with a row queued or running (caller holds the lock)."""
        tickets = {id(q.ticket): q.ticket for q in list(self._queue) + list(self._running.values())}
        self._queue.clear()
        self._running.clear()
        for ticket in tickets.values():
            if not ticket.future.done():
                ticket.future.set_exception(exc)


def left_pad(rows: list[np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one length: (input_ids [B, T], attention_mask [B, T])."""
    T = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, T - len(row):] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[b, T - len(row):] = 1
    return input_ids, mask
