"""The driver's console: our lines, not the native noise of the libraries under us.

Two pieces: `filter_native_stderr` (below) and `exit_on_sigterm` (a stop without Ray's native
stack dump; `pipeline.run.ensure_ray` installs it after `ray.init`).

Ray's C++ core writes a few ERROR-level lines straight to file descriptor 2 that say nothing a
user can act on, e.g. on every run (Ray Data always passes its actors' constructor arguments
through the object store, ray-project/ray#53727):

    [... E 3416 3416] core_worker.cc:2465: Actor with class name: 'MapWorker(...)' ... has
    constructor arguments in the object store and max_restarts > 0. ...

Python's logging cannot reach them, and `RAY_BACKEND_LOG_LEVEL=fatal` would also silence every
real error of each Ray process it reaches. So `filter_native_stderr` puts a small filter
process between descriptor 2 and the terminal that drops only lines matching `NATIVE_NOISE`;
Python's own `sys.stderr` (our messages, tracebacks, the progress bar) keeps writing to the
terminal directly, so it stays a terminal for tqdm and its order with stdout is unchanged.
The filter is a separate process so that a crash of the driver loses nothing written before
it: the filter reads to the end of the pipe and exits when the last writer is gone.
"""
from __future__ import annotations

import os
import subprocess
import sys

# Native lines dropped from the console (each a substring of one line). Nothing else is touched.
NATIVE_NOISE = (
    "has constructor arguments in the object store and max_restarts > 0",
)

# The filter process: forwards everything from stdin to stdout except whole lines matching a
# pattern. A partial line is forwarded at once unless it may be the start of a native log line
# (those start with "["), so a progress bar drawn on descriptor 2 still updates live.
_FILTER = r"""
import os, signal, sys
# Ctrl-C and SIGTERM reach the whole process group: the filter outlives them and forwards what the
# driver writes while it stops; it ends at the end of the pipe (or with the group's SIGKILL).
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
patterns = [p.encode() for p in sys.argv[1:]]
out, pending = sys.stdout.fileno(), b""
def write(data):
    while data:
        data = data[os.write(out, data):]
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        write(pending)
        break
    *lines, pending = (pending + chunk).split(b"\n")
    write(b"".join(line + b"\n" for line in lines if not any(p in line for p in patterns)))
    if pending and not pending.startswith(b"["):
        write(pending)
        pending = b""
"""


def filter_native_stderr(patterns=NATIVE_NOISE) -> bool:
    """Route descriptor 2 through the filter process (once per process; POSIX only). Returns
    whether the filter is in place. Call it after the processes this one starts for good (a
    private Ray's raylet and GCS) are running, so they keep the real descriptor 2."""
    global _installed
    if _installed or os.name != "posix":
        return _installed
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        proc = subprocess.Popen([sys.executable, "-c", _FILTER, *patterns], stdin=subprocess.PIPE, stdout=terminal,
                                stderr=subprocess.DEVNULL, close_fds=True)
    except OSError:
        return False
    # Python's stderr keeps the terminal; only native writes to descriptor 2 go through the filter.
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=sys.stderr.encoding,
                           errors=sys.stderr.errors)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    os.close(terminal)
    _installed = True
    return True


_installed = False


def exit_on_sigterm() -> None:
    """SIGTERM (`specllava stop`, `ray job stop`) raises SystemExit(15) in the main thread, as Ray's
    own handler does, but without the native stack dump ("*** SIGTERM received ... PC: @ ...")
    that the failure handler Ray's core installs in `ray.init` prints first: a stop is not a crash."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
