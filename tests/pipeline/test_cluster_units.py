"""What a cluster can host, without Ray: GPU capacity with autoscaler node types, the fit check
before the graph starts, the start-up watch's decision and its interrupt, the stall hint."""
from __future__ import annotations

import queue
import time

import pytest

from pipeline.cluster import Cluster, NodeType, check_fits, gpu_capacity, node_types_from_config
from pipeline.config import CaptionConfig, PipelineError
from pipeline.watch import PoolNotStarted, StageActors, StartWatch, describe, stage_actors

CPU_NODE = {"CPU": 8.0, "memory": 1e10}


def cfg(**kw) -> CaptionConfig:
    return CaptionConfig(input="i", output="o", target="t", draft="d", **kw)


def gpu_type(max_count: int, gpus: float = 2.0, name: str = "gpu-worker") -> NodeType:
    return NodeType(name, {"CPU": 8.0, "GPU": gpus}, max_count=max_count)


def test_gpu_capacity_counts_live_nodes_and_what_node_types_can_reach():
    assert gpu_capacity(Cluster([CPU_NODE])) == 0.0
    assert gpu_capacity(Cluster([CPU_NODE, {"CPU": 8.0, "GPU": 4.0}])) == 4.0          # no autoscaler
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(4)])) == 8.0                      # GPU nodes at zero
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(4), gpu_type(2, 1.0, "small")])) == 10.0
    # Live GPUs above what the types list (a node started by hand): the larger number.
    assert gpu_capacity(Cluster([{"CPU": 8.0, "GPU": 16.0}], [gpu_type(4)])) == 16.0
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(4)], {"GPU": 6.0})) == 6.0        # cluster-wide cap
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(0)])) == 0.0                      # never started
    # No max count: only the cluster-wide cap can say how many; without one it adds nothing.
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(-1)], {"GPU": 32.0})) == 32.0
    assert gpu_capacity(Cluster([CPU_NODE], [gpu_type(-1)])) == 0.0


def test_node_types_are_read_from_the_autoscaler_cluster_config_proto():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", max_count=1)
    head.resources["CPU"] = 4
    worker = config.node_group_configs.add(name="gpu-worker", min_count=0, max_count=4)
    worker.resources["CPU"] = 8
    worker.resources["GPU"] = 2
    config.max_resources["GPU"] = 100
    types, limits = node_types_from_config(config)
    assert types == [NodeType("head", {"CPU": 4.0}, 1), gpu_type(4)] and limits == {"GPU": 100.0}
    assert node_types_from_config(None) == ([], {})


def test_resources_on_gpu_nodes_at_zero_but_autoscalable_to_8():
    from pipeline.run import resolve_resources

    at_zero = Cluster([CPU_NODE], [NodeType("head", {"CPU": 8.0}, 1), gpu_type(4)])
    decided = resolve_resources(cfg(actors_max=None), at_zero)
    assert decided.gpus_per_actor == 1.0 and decided.actors_max == 8     # not CPU decoding, not 1 actor
    with pytest.raises(PipelineError, match="can scale to\\) 8 GPUs"):
        resolve_resources(cfg(gpus_per_actor=0.0), at_zero)
    assert check_fits(decided, at_zero) == "node type"                   # the watch waits for the autoscaler
    local = resolve_resources(cfg(actors_max=None), Cluster([CPU_NODE]))  # no autoscaler: live nodes only
    assert local.gpus_per_actor == 0.0 and local.actors_max == 1


def test_a_cluster_too_small_for_the_graph_is_refused_naming_the_resource():
    cpus = Cluster([{"CPU": 2.0}])
    with pytest.raises(PipelineError, match=r"a caption actor needs 1 GPU \+ 1 CPU but no node has that "
                                            r"\(largest per node: 0 GPU, 2 CPU\); .*--device cpu"):
        check_fits(cfg(gpus_per_actor=1.0), cpus)
    with pytest.raises(PipelineError, match=r"a caption actor needs 4 CPU .*largest per node: 0 GPU, 2 CPU.*"
                                            r"smaller --cpus-per-actor"):
        check_fits(cfg(gpus_per_actor=0.0, cpus_per_actor=4.0), cpus)
    # Per node, not the sum: two 2-CPU nodes do not host a 3-CPU actor.
    with pytest.raises(PipelineError, match="needs 3 CPU"):
        check_fits(cfg(gpus_per_actor=0.0, cpus_per_actor=3.0), Cluster([{"CPU": 2.0}, {"CPU": 2.0}]))
    # Each stage fits, the graph does not: caption 1 + preprocess 0.5 + read 0.5 + repartition 1 > 2.
    with pytest.raises(PipelineError, match=r"the graph needs 3 CPU at once .* not enough CPU"):
        check_fits(cfg(gpus_per_actor=0.0), cpus)
    # ... and runs with fractions (what a 2-CPU box needs), or on two nodes.
    assert check_fits(cfg(gpus_per_actor=0.0, cpus_per_actor=0.5, stage_cpus=0.25), cpus) == "node"
    assert check_fits(cfg(gpus_per_actor=0.0), Cluster([{"CPU": 2.0}, {"CPU": 2.0}])) == "node"
    with pytest.raises(PipelineError, match=r"2 caption actors x 1 GPU \+ 1 CPU.*not enough GPU"):
        check_fits(cfg(gpus_per_actor=1.0, actors_min=2, actors_max=2), Cluster([{"CPU": 8.0, "GPU": 1.0}]))
    with pytest.raises(PipelineError, match="an image-check actor needs 4 CPU"):
        check_fits(CaptionConfig(input="i", output="o", dry_run=True, stage_cpus=4.0), cpus)
    # A node type that may start hosts what no live node can; one that may not (max 0) does not.
    assert check_fits(cfg(gpus_per_actor=1.0), Cluster([{"CPU": 2.0}], [gpu_type(2)])) == "node type"
    with pytest.raises(PipelineError, match="no node or node type has that"):
        check_fits(cfg(gpus_per_actor=1.0), Cluster([{"CPU": 2.0}], [gpu_type(0)]))


def actor(stage: str, state: str, pid: int) -> dict:
    return {"ActorClassName": f"MapWorker(MapBatches({stage}))", "State": state, "Pid": pid}


def test_pool_actors_by_stage_from_the_actor_table():
    rows = [actor("CaptionWorker", "PENDING_CREATION", 0), actor("CaptionWorker", "PENDING_CREATION", 41),
            actor("CaptionWorker", "DEAD", 40), actor("Preprocessor", "ALIVE", 42),
            {"ActorClassName": "MapWorker(MapBatches(read)->MapBatches(Preprocessor))", "State": "ALIVE", "Pid": 7},
            {"ActorClassName": "_StatsActor", "State": "ALIVE", "Pid": 43}]
    stages = stage_actors(rows)
    assert stages == {"CaptionWorker": StageActors(running=1, waiting=1), "Preprocessor": StageActors(running=2)}
    assert describe(stages) == "actors: CaptionWorker 1 running / 1 waiting for resources, Preprocessor 2 running"


def test_start_watch_fires_only_on_a_caption_actor_waiting_past_the_limit():
    from pipeline.cluster import caption_request

    watch = StartWatch(caption_request(cfg(gpus_per_actor=1.0)), limit_s=60, read_actors=list)
    waiting = stage_actors([actor("CaptionWorker", "PENDING_CREATION", 0), actor("Preprocessor", "ALIVE", 9)])
    assert watch.check(waiting, 30) is None
    reason = watch.check(waiting, 61)
    assert reason.startswith("no caption actor could start in 61s: each needs 1 GPU + 1 CPU and none got a node "
                             "(actors: CaptionWorker 0 running / 1 waiting for resources, Preprocessor 1 running")
    assert "--gpus-per-actor/--cpus-per-actor" in reason
    assert watch.check({}, 600) is None                                    # no evidence: never fires
    # Once one caption actor has a node (loading its models may take minutes), the watch is over.
    assert watch.check(stage_actors([actor("CaptionWorker", "PENDING_CREATION", 77)]), 61) is None
    assert watch.check(waiting, 600) is None


@pytest.mark.parametrize("wait", ["sleep", "queue"])
def test_start_watch_ends_the_block_in_the_main_thread(wait):
    """The watch thread interrupts the main thread however it waits (Ray Data's iterator polls
    a queue with a timeout); the block ends with PoolNotStarted, a PipelineError (exit 2)."""
    from pipeline.cluster import caption_request

    rows = [actor("CaptionWorker", "PENDING_CREATION", 0)]
    watch = StartWatch(caption_request(cfg(gpus_per_actor=0.0, cpus_per_actor=2.0)), limit_s=0.2,
                       read_actors=lambda: rows, poll_s=0.05)
    start = time.monotonic()
    with pytest.raises(PoolNotStarted, match="each needs 2 CPU .*smaller --cpus-per-actor") as err:
        with watch:
            while time.monotonic() - start < 10:
                if wait == "sleep":
                    time.sleep(0.01)
                else:
                    try:
                        queue.Queue().get(timeout=0.5)
                    except queue.Empty:
                        pass
    assert isinstance(err.value, PipelineError) and time.monotonic() - start < 3
    # A placed actor: the block runs to its end.
    rows[:] = [actor("CaptionWorker", "PENDING_CREATION", 5)]
    with StartWatch(caption_request(cfg()), limit_s=0.1, read_actors=lambda: rows, poll_s=0.02):
        time.sleep(0.3)


def test_stalled_progress_line_says_what_the_pools_are_doing():
    from pipeline.commit import RunCounters
    from pipeline.progress import RunProgress

    lines = []
    why = "actors: CaptionWorker 0 running / 1 waiting for resources; Ray: CPU 0.5/4 free, no GPU in the cluster"
    with RunProgress(total=10, before=0, every_s=0.05, stall_s=0.2, log=lines.append, why=lambda: why) as progress:
        progress.watch(RunCounters())
        time.sleep(0.5)
    assert lines[-1].endswith(f"nothing committed for 0m00s ({why})")
