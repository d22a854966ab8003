"""pipeline/console.py: the filter of Ray's native noise on descriptor 2, in a real child process."""
from __future__ import annotations

import subprocess
import sys

from tests import REPO_ROOT

NOISE = (b"[2026-12-03 16:19:59,770 E 3416 3416] core_worker.cc:2465: Actor with class name: 'MapWorker(x)' "
         b"has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")


def _child(body: str) -> subprocess.CompletedProcess:
    code = "import os, sys\nfrom pipeline.console import filter_native_stderr\nassert filter_native_stderr()\n" + body
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, timeout=60)


def test_only_the_known_native_lines_are_dropped():
    proc = _child(f"""
os.write(2, {NOISE!r})
os.write(2, b"[native] a real error stays\\n")
print("python's stderr stays", file=sys.stderr, flush=True)
os.write(2, b"half a line, ")
os.write(2, b"then the rest\\n")
os.write(2, {NOISE[:40]!r})          # a native line split over two writes: still one line
os.write(2, {NOISE[40:]!r})
os.write(2, b"[no newline at the end]")
print("stdout too")
""")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "max_restarts > 0" not in err and "core_worker.cc" not in err
    for kept in ("[native] a real error stays\n", "python's stderr stays\n", "half a line, then the rest\n",
                 "[no newline at the end]"):
        assert kept in err, err
    assert proc.stdout == b"stdout too\n"


def test_a_crash_loses_nothing_written_before_it():
    """The filter is its own process: what the driver wrote before dying still reaches the console."""
    proc = _child("""
os.write(2, b"the last words before the crash\\n")
print("and a traceback's worth from python", file=sys.stderr, flush=True)
os._exit(3)
""")
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert "the last words before the crash\n" in err and "and a traceback's worth from python" in err


def test_sigterm_after_ray_init_is_a_clean_system_exit():
    """ensure_ray replaces the native failure handler Ray installs for SIGTERM: SystemExit(15), no
    '*** SIGTERM received ... PC: @' stack dump (what `specllava stop` used to leave in a job's log)."""
    proc = subprocess.run([sys.executable, "-c", """
import os, signal, sys, threading, time
import ray
from pipeline.run import ensure_ray
ensure_ray(None, verbose=False)
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
try:
    time.sleep(30)
except SystemExit as exc:
    print("exit", exc.code, flush=True)
    ray.shutdown()
    raise
"""], cwd=REPO_ROOT, capture_output=True, timeout=120, env={**__import__("os").environ, "RAY_num_cpus": "1"})
    assert proc.stdout.decode().strip().endswith("exit 15"), proc.stdout + proc.stderr
    assert b"SIGTERM received" not in proc.stderr and b"PC: @" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 15
