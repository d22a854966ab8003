"""Clusters too small for the graph, on a real Ray: refused before any work, or failed by the
start-up watch; and a head that declares 2 GPUs (`ray start --num-gpus 2`) with the models
forced onto CPU (SPECLLAVA_DRILL_DEVICE): the pool auto-sized to 2 actors of 1 GPU each, and
node types reported to its GCS as an autoscaler does counted in the GPU capacity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import REPO_ROOT
from tests.pipeline_helpers import CLI_SUBPROCESS, cli, png_bytes

SMALL = ["--batch-size", "2", "--max-new-tokens", "4", "--commit-rows", "8", "--progress-every", "0"]


def write_input(folder: Path, rows: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"r{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "image": [png_bytes(i) for i in range(rows)]}), folder / "shard-0.parquet")
    return str(folder)


def caption_args(tmp_path: Path, tiny_pair, rows: int = 8, output: str = "out") -> list[str]:
    return ["caption", "--input", write_input(tmp_path / "in", rows), "--output", str(tmp_path / output),
            "--target", tiny_pair[0], "--draft", tiny_pair[1], *SMALL]


def test_an_actor_no_node_can_host_fails_at_once_naming_the_resource(ray_address, tiny_pair, tmp_path, capsys):
    start = time.monotonic()
    rc = cli(caption_args(tmp_path, tiny_pair) + ["--gpus-per-actor", "1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "a caption actor needs 1 GPU + 1 CPU but no node has that (largest per node: 0 GPU, 4 CPU)" in err
    assert elapsed < 60 and not (tmp_path / "out" / "_run.json").exists()   # before anything is written


def test_an_actor_that_never_gets_a_node_fails_the_run_naming_the_resource(ray_address, tiny_pair, tmp_path,
                                                                          capsys, monkeypatch):
    """4 CPUs, 2.5 held by another actor: the caption actor (2 CPU) fits the node but never gets
    it; the watch (limit shortened to 10 s) fails the run, exit 2, recorded in _run.json."""
    import ray

    import pipeline.watch

    monkeypatch.setattr(pipeline.watch, "START_WAIT_S", 10.0)
    monkeypatch.setattr(pipeline.watch, "POLL_S", 1.0)
    (tmp_path / "out").mkdir()  # an output that existed keeps its _run.json (a new one would be removed)

    @ray.remote(num_cpus=2.5)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    try:
        ray.get(hog.ping.remote(), timeout=120)
        start = time.monotonic()
        rc = cli(caption_args(tmp_path, tiny_pair) + ["--cpus-per-actor", "2", "--stage-cpus", "0.25"])
        elapsed = time.monotonic() - start
    finally:
        ray.kill(hog)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert ("no caption actor could start in 1" in err and "each needs 2 CPU and none got a node "
            "(actors: CaptionWorker 0 running / 1 waiting for resources" in err), err
    assert elapsed < 90
    run = json.loads((tmp_path / "out" / "_run.json").read_text())["runs"][-1]
    assert run["status"] == "failed" and run["error"].startswith("PoolNotStarted: no caption actor could start")
    deadline = time.time() + 60  # the pools' actors go with the failed graph: later tests get the CPUs back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)


def _driver(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


READ_CAPACITY = """
import json, sys
import ray
from pipeline.cluster import check_fits, gpu_capacity, read_cluster
from pipeline.config import CaptionConfig
from pipeline.run import resolve_resources, use_local_auth_token
use_local_auth_token()
ray.init(address=sys.argv[1], log_to_driver=False)
cluster = read_cluster()
config = resolve_resources(CaptionConfig(input="i", output="o", target="t", draft="d", actors_max=None), cluster)
big = resolve_resources(CaptionConfig(input="i", output="o", target="t", draft="d", gpus_per_actor=4.0), cluster)
print(json.dumps({"capacity": gpu_capacity(cluster), "actors": config.actors_max, "gpus": config.gpus_per_actor,
                  "types": [t.name for t in cluster.node_types], "big_fits": check_fits(big, cluster)}))
"""


@pytest.mark.slow
def test_head_declaring_two_gpus_sizes_the_pool_to_two_one_gpu_actors(tiny_pair, tmp_path, tmp_path_factory):
    from ray.util.state import list_actors

    from tests.ray_head import ray_head
    from workers.drill import DEVICE_ENV

    env = dict(os.environ, **{DEVICE_ENV: "cpu"})  # the head's 2 GPUs do not exist: decode on CPU
    env.pop("RAY_ADDRESS", None)
    with ray_head(tmp_path_factory.mktemp("gpu-head"), num_cpus=4, num_gpus=2) as head:
        on_head = ["--address", head.gcs_address, "--cpus-per-actor", "0.5", "--stage-cpus", "0.25"]
        done = _driver(CLI_SUBPROCESS + caption_args(tmp_path, tiny_pair, rows=8) + on_head, env)
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = json.loads((tmp_path / "out" / "_run.json").read_text())
        assert manifest["config"]["actors_max"] is None and manifest["config"]["gpus_per_actor"] is None  # as asked
        assert manifest["counts"]["ok"] == 8
        resources = manifest["runs"][-1]["resources"]
        assert resources["actors"] == [1, 2] and resources["gpus_per_actor"] == 1.0       # one per GPU
        assert resources["gpu_capacity"] == 2.0 and resources["caption_actor_fits"] == "node"
        actors = list_actors(address=head.dashboard_address, detail=True, limit=1000, raise_on_missing_output=False,
                             filters=[("class_name", "=", "MapWorker(MapBatches(CaptionWorker))")])
        assert 1 <= len(actors) <= 2, actors
        assert all(a.required_resources == {"GPU": 1.0, "CPU": 0.5} for a in actors), \
            [(a.required_resources, a.state, a.death_cause) for a in actors]

        # Too small on the same head: 3 GPUs per actor, the largest node has 2.
        start = time.monotonic()
        small = _driver(CLI_SUBPROCESS + caption_args(tmp_path, tiny_pair, output="out3") + on_head
                        + ["--gpus-per-actor", "3"], env)
        elapsed = time.monotonic() - start
        assert small.returncode == 2, small.stderr[-3000:]
        assert "a caption actor needs 3 GPU + 0.5 CPU but no node has that (largest per node: 2 GPU, 4 CPU)" \
            in small.stderr
        assert elapsed < 60

        # An autoscaler's node types, as it reports them to the GCS: GPU nodes at zero count.
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2

        config = autoscaler_pb2.ClusterConfig()
        head_type = config.node_group_configs.add(name="head", max_count=1)
        head_type.resources["CPU"], head_type.resources["GPU"] = 4, 2
        workers = config.node_group_configs.add(name="gpu-worker", max_count=3)
        workers.resources["CPU"], workers.resources["GPU"] = 8, 4
        GcsClient(address=head.gcs_address).report_cluster_config(config.SerializeToString())
        read = _driver(["-c", READ_CAPACITY, head.gcs_address], env)
        assert read.returncode == 0, read.stderr[-3000:]
        got = json.loads(read.stdout.strip().splitlines()[-1])
        assert got == {"capacity": 14.0, "actors": 14, "gpus": 1.0, "types": ["head", "gpu-worker"],
                       "big_fits": "node type"}
