"""The caption pool's start-up watch, and what the pools are doing when nothing is committed.

Ray Data waits forever for an actor that fits a node in principle but never gets one (the
cluster busy with other work, an autoscaler that cannot start the node type). `StartWatch`
reads this job's actors from Ray's actor table every few seconds until the first caption actor
has a node; if none has one after `limit_s` while one is waiting, the run fails with
PoolNotStarted (a PipelineError: exit 2) naming what the actor asks for and what Ray has free:

    START_WAIT_S      a live node can host a caption actor (pipeline/cluster.py check_fits)
    AUTOSCALE_WAIT_S  only a node type the autoscaler may start can (GPU nodes from zero)

The watch ends with the first placed caption actor: after that a slow or stuck run is the
progress line's business, which says what the pools are doing (`describe`).

An actor has a node once Ray gave it a worker process (its constructor, e.g. loading the
models, may still be running): a non-zero pid in the actor table, or ALIVE. An actor of the
pool without one is waiting for resources. Ray Data names a pool's actor class
`MapWorker(MapBatches(<callable>))`, which gives the stage.

The actor table is read with `ray._private.state.actors(job_id=...)` (Ray's debugging API: no
dashboard needed, only this job's actors); when it cannot be read the watch sees no evidence and
never fires.

The watch thread cannot raise in the thread that iterates the graph; it calls
`_thread.interrupt_main` with a signal whose handler (installed only while the watch runs, only
when the run is on the main thread) raises there, and the `with` block ends with PoolNotStarted.
Ray Data's iterator waits in short slices so that interrupts land (as Ctrl-C does). Off the main
thread the watch only reports, in the progress line.
"""
from __future__ import annotations

import _thread
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.cluster import Request
from pipeline.config import PipelineError
from pipeline.progress import ray_resources_hint

START_WAIT_S = 60.0
AUTOSCALE_WAIT_S = 900.0
POLL_S = 5.0
CAPTION_STAGE = "CaptionWorker"
_WAKE_SIGNAL = getattr(signal, "SIGUSR2", None)  # unused by Ray's driver; any Python-handled signal works
_STAGE = re.compile(r"^MapWorker\((.*)\)$")
_CALLABLE = re.compile(r"^\w+\((.*)\)$")  # MapBatches(CaptionWorker) -> CaptionWorker


class PoolNotStarted(PipelineError):
    """No caption actor got a node within the start-up limit."""


class _WatchFired(BaseException):
    """Raised in the main thread by the wake-up handler; StartWatch.__exit__ turns it into
    PoolNotStarted. A BaseException, like KeyboardInterrupt, so that Ray Data's iterator passes
    it through instead of logging it as an internal error."""


@dataclass(frozen=True)
class StageActors:
    running: int = 0   # have a worker process (constructor running or done)
    waiting: int = 0   # no node yet: waiting for resources


def stage_actors(actors) -> dict[str, StageActors]:
    """Ray Data pool actors by stage, from actor-table rows (`ray._private.state.actors()` values:
    ActorClassName, State, Pid); dead actors and actors that are not Ray Data's are left out."""
    counts: dict[str, list[int]] = {}
    for actor in actors:
        stage, state = _stage_name(actor.get("ActorClassName") or ""), actor.get("State")
        if stage is None or state == "DEAD":
            continue
        slot = counts.setdefault(stage, [0, 0])
        slot[0 if state == "ALIVE" or actor.get("Pid") else 1] += 1
    return {stage: StageActors(*n) for stage, n in counts.items()}


def _stage_name(class_name: str) -> str | None:
    """'MapWorker(MapBatches(read)->MapBatches(Preprocessor))' -> 'Preprocessor' (the pool's callable
    is the last of a fused chain); None for an actor that is not a Ray Data pool's."""
    match = _STAGE.match(class_name)
    if not match:
        return None
    last = match.group(1).split("->")[-1]
    inner = _CALLABLE.match(last)
    return inner.group(1) if inner else last


def describe(stages: dict[str, StageActors]) -> str:
    """`CaptionWorker 0 running / 1 waiting for resources, Preprocessor 1 running`."""
    parts = []
    for stage, n in sorted(stages.items()):
        parts.append(f"{stage} {n.running} running" + (f" / {n.waiting} waiting for resources" if n.waiting else ""))
    return "actors: " + ", ".join(parts) if parts else ""


def job_actors() -> list[dict]:
    """This driver's job's actors from Ray's actor table (no dashboard needed)."""
    import ray
    import ray._private.state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return list(ray._private.state.actors(job_id=job).values())


def pools_hint(read_actors: Callable[[], list[dict]] = job_actors) -> str:
    """What the pools are doing and what Ray has free, for a progress line; '' when unknown."""
    try:
        pools = describe(stage_actors(read_actors()))
    except Exception:  # noqa: BLE001 - only a hint; Ray may be shutting down
        pools = ""
    return "; ".join(part for part in (pools, ray_resources_hint()) if part)


class StartWatch:
    """Fails the run when no caption actor has a node `limit_s` after the graph started.

    `check(stages, elapsed)` is the decision (unit-tested without Ray); the context manager
    polls `read_actors` on a thread and, when it fires, interrupts the main thread, where the
    block inside `with` ends with PoolNotStarted.
    """

    def __init__(self, request: Request, limit_s: float | None = None, *, autoscaling: bool = False,
                 read_actors: Callable[[], list[dict]] = job_actors, poll_s: float | None = None,
                 stage: str = CAPTION_STAGE):
        if limit_s is None:  # only a node type the autoscaler may start can host the actor: wait longer
            limit_s = AUTOSCALE_WAIT_S if autoscaling else START_WAIT_S
        self.request, self.limit_s, self.read_actors = request, limit_s, read_actors
        self.poll_s, self.stage = POLL_S if poll_s is None else poll_s, stage
        self.placed = False
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._installed = False
        self._previous_handler = None

    def check(self, stages: dict[str, StageActors], elapsed_s: float) -> str | None:
        """The failure message when the caption stage has waited too long, else None. Fires only
        on evidence: a caption actor seen waiting and none running."""
        mine = stages.get(self.stage, StageActors())
        if mine.running:
            self.placed = True
        if self.placed or not mine.waiting or elapsed_s < self.limit_s:
            return None
        free = ray_resources_hint()
        flags = "--gpus-per-actor/--cpus-per-actor" if self.request.gpu else "--cpus-per-actor"
        return (f"no caption actor could start in {elapsed_s:.0f}s: each needs {self.request.text()} and none "
                f"got a node ({describe(stages)}" + (f"; {free}" if free else "") + f"); free those resources "
                f"or pass a smaller {flags}, then `specllava resume` the output")

    def why(self) -> str:
        """The progress line's hint when nothing has been committed for a while."""
        return pools_hint(self.read_actors)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and _WAKE_SIGNAL is not None:
            self._previous_handler = signal.signal(_WAKE_SIGNAL, self._on_wake)
            self._installed = True
        self._thread = threading.Thread(target=self._loop, name="specllava-start-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._installed:
            previous = self._previous_handler
            signal.signal(_WAKE_SIGNAL, previous if previous is not None else signal.SIG_DFL)
            self._installed = False
        if isinstance(exc, _WatchFired):
            raise PoolNotStarted(self.reason) from None
        return False

    def _on_wake(self, signum, frame):
        if self.reason is not None:
            raise _WatchFired()
        if callable(self._previous_handler):
            self._previous_handler(signum, frame)

    def _loop(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.poll_s) and not self.placed:
            try:
                stages = stage_actors(self.read_actors())
            except Exception:  # noqa: BLE001 - no evidence this round (Ray busy or shutting down)
                continue
            reason = self.check(stages, time.monotonic() - start)
            if reason is not None:
                self.reason = reason
                if self._installed:
                    _thread.interrupt_main(_WAKE_SIGNAL)
                return
