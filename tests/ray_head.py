"""A real Ray head for tests: `ray start --head --block` on loopback ports with its own temp dir.

It is stopped by its own pid (SIGTERM to the `ray start --block` process, which stops what it
started, then SIGKILL to its process group and to any process still running from its temp dir),
never with `ray stop`, which would kill every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
              "node-manager-port", "object-manager-port")


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all bound at once, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass(frozen=True)
class RayHead:
    gcs_address: str        # 127.0.0.1:PORT, for `--address` / ray.init
    dashboard_address: str  # http://127.0.0.1:PORT, for Ray Jobs and the state API
    temp_dir: str
    log_path: Path


def _processes_under(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names `temp_dir` (this head's own, by construction)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def ray_head(log_dir: Path, *, num_cpus: int = 4, num_gpus: int = 0, env: dict | None = None,
             timeout_s: float = 180):
    """Yield a RayHead once its dashboard answers; stop exactly this head afterwards."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.run import use_local_auth_token

    temp = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
           "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats",
           "--include-dashboard=true", *[f"--{flag}={port}" for flag, port in ports.items()]]
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = Path(log_dir) / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    use_local_auth_token()  # Ray 2.5x+ heads want the local token, as `ray start` does
    deadline = time.time() + timeout_s
    try:
        while True:
            assert head.poll() is None, f"ray start exited: {log_path.read_text()[-3000:]}"
            try:
                JobSubmissionClient(dashboard)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.time() < deadline, f"dashboard never came up: {log_path.read_text()[-3000:]}"
                time.sleep(1)
        yield RayHead(f"127.0.0.1:{ports['port']}", dashboard, temp, log_path)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        for pid in _processes_under(temp):  # stragglers of this head only
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
