"""Fault-drill hooks for the caption actor, for tests only; a production run never sets them.

The fault suite kills actors and drivers mid-batch and counts re-decodes. It needs two things
from the caption actor, given as environment variables so that they never pass through a
user-facing option or `CaptionConfig` (and never land in `_run.json`):

    SPECLLAVA_DRILL_LOG=/path/file.jsonl   append one JSON line per event: "init" once the models
                                           are loaded, "start" and "return" per batch, each with
                                           the actor's pid, a timestamp and the batch's ids
    SPECLLAVA_DRILL_BATCH_DELAY=SECONDS    sleep after each batch (so a kill lands mid-run)
    SPECLLAVA_DRILL_PAUSE_FILE=/path/file  after each batch, wait while this file exists (so a
                                           test can hold a job mid-run for as long as its `stop`
                                           takes, whatever the machine's speed, then let go)
    SPECLLAVA_DRILL_DEVICE=cpu             load the models on this device whatever the pipeline
                                           asks: a test head that declares GPUs it does not have
                                           (`ray start --num-gpus 2`) gets real GPU requests and
                                           pool sizes, and the models run on CPU

Ray actors do not see variables set in the driver after Ray started, so the pipeline passes
`drill_env()` to the caption stage's runtime_env, and `specllava submit` to the job's. The
device drill is read in the driver instead (`with_device_drill` wraps the caption class there).
"""
from __future__ import annotations

import json
import os
import time

LOG_ENV = "SPECLLAVA_DRILL_LOG"
BATCH_DELAY_ENV = "SPECLLAVA_DRILL_BATCH_DELAY"
DEVICE_ENV = "SPECLLAVA_DRILL_DEVICE"
PAUSE_FILE_ENV = "SPECLLAVA_DRILL_PAUSE_FILE"
PAUSE_POLL_S = 0.2


def drill_env() -> dict[str, str]:
    """The drill variables set in this process (empty in production)."""
    return {name: os.environ[name] for name in (LOG_ENV, BATCH_DELAY_ENV, PAUSE_FILE_ENV) if os.environ.get(name)}


def with_device_drill(worker_cls: type) -> type:
    """`worker_cls`, or with SPECLLAVA_DRILL_DEVICE set in this process, a subclass of the same
    name whose constructor gets `device=<that value>` whatever it is passed. Tests only."""
    device = os.environ.get(DEVICE_ENV)
    if not device:
        return worker_cls

    def __init__(self, *args, **kwargs):
        worker_cls.__init__(self, *args, **dict(kwargs, device=device))

    return type(worker_cls.__name__, (worker_cls,), {"__init__": __init__, "__module__": __name__})


class Drill:
    """The hooks as the actor sees them: `event(...)` and `after_batch()` do nothing unless set."""

    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        self.log_path = env.get(LOG_ENV) or None
        self.batch_delay_s = float(env.get(BATCH_DELAY_ENV) or 0.0)
        self.pause_file = env.get(PAUSE_FILE_ENV) or None

    @property
    def wants_ids(self) -> bool:
        return self.log_path is not None

    def event(self, event: str, ids: list | None = None) -> None:
        if not self.log_path:
            return
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), "ids": ids}) + "\n"
        # One O_APPEND write per line: lines from concurrent actors do not interleave.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @property
    def paused(self) -> bool:
        """True while the pause file is set and exists: the actor holds its next batch."""
        return self.pause_file is not None and os.path.exists(self.pause_file)

    def after_batch(self) -> None:
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        while self.paused:
            time.sleep(PAUSE_POLL_S)
