"""Session fixtures shared by the pipeline and worker tests.

- `s3`: a real S3 API (moto's ThreadedMotoServer on 127.0.0.1, a free port) with fake
  credentials in the environment; tests talk to it through pyarrow's native S3FileSystem.
- `ray_address`: one local Ray for the whole session (started at most once, on first use;
  shut down at the end). Its address lets a test start a separate driver process on it.
- `tiny_pair`: a saved tiny random target/draft pair with processors (real save_pretrained).

Nothing starts unless a test asks for it, so decoder-only test runs pay nothing.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def filesystem(self):
        from workers.storage import s3_filesystem
        return s3_filesystem(self.endpoint)

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        fs.create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for the session. Set env before Ray starts so Ray workers inherit it."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_address(s3):
    """A local Ray shared by every test of the session; yields its GCS address.

    4 logical CPUs on this 2-core box: Ray Data's streaming repartition task takes 1 CPU beside
    the actors' (docs/pipeline.md, Cluster size), and some tests run two stages' worth at once.
    """
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(target_dir, draft_dir) of a tiny random LLaVA pair saved with save_pretrained."""
    from decoding.testing import save_tiny_pair

    target, draft = save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))
    return str(target), str(draft)
