"""What a Ray cluster can host: its nodes, its autoscaler's node types, the GPUs it can reach,
and whether every stage of the caption graph fits on it — checked before the graph starts.

Ray Data never gives up on an actor no node can host: the run just waits. So before anything
is scheduled, each stage's per-worker request is compared with what one node offers (requests
are placed on one node; a cluster's sum means nothing here), first the live nodes, then the
node types the autoscaler may start:

    caption actor      --cpus-per-actor CPU + --gpus-per-actor GPU, --actors MIN of them at once
    preprocess actor   --stage-cpus CPU      (image-check actor in a dry run)
    read task          --stage-cpus CPU      (and the id check's tasks)
    repartition task   1 CPU: Ray Data's streaming repartition takes no resource arguments and
                       its tasks default to 1 CPU (ray.data 2.60); without a free CPU for it,
                       the actors hold theirs and nothing moves

A request no node or node type can host is a user error (PipelineError, exit 2) naming the
resource; so is a graph whose minimal set (the lines above, once each, MIN caption actors)
cannot be packed onto the cluster's nodes together.

Node types come from the cluster config an autoscaler reports to the GCS (what Ray Data's own
autoscaling reads: `ray._private.state.state.get_cluster_config()`, one NodeGroupConfig per
node type with its resources and min/max count; max -1 means unbounded). Without an autoscaler,
or where that private API is missing or changed, there are no node types and only the live nodes
count (noted once at debug level).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.config import CaptionConfig, PipelineError

logger = logging.getLogger(__name__)

REPARTITION_CPUS = 1.0  # Ray Data's default for a map task without num_cpus (ray.data 2.60)
_EPS = 1e-6             # Ray keeps resources to 1e-4; compare with a margin, not exactly


@dataclass(frozen=True)
class NodeType:
    """One autoscaler node type: what each of its nodes has, and how many it may run."""
    name: str
    resources: dict            # per node: {"CPU": 8, "GPU": 1, ...}
    max_count: int             # -1: no limit; 0: never started
    min_count: int = 0


@dataclass(frozen=True)
class Cluster:
    """The cluster as the driver sees it when the run starts."""
    nodes: list[dict]                                          # per live node: its total resources
    node_types: list[NodeType] = field(default_factory=list)   # empty without an autoscaler
    max_resources: dict = field(default_factory=dict)          # cluster-wide caps of the autoscaler


@dataclass(frozen=True)
class Request:
    """What one worker of a stage asks Ray for, and how many must run at the same time."""
    name: str           # "caption actor"
    cpu: float
    gpu: float = 0.0
    count: int = 1
    remedy: dict = field(default_factory=dict)  # {"CPU" | "GPU": what to pass when that one is short}

    @property
    def what(self) -> str:
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name}"

    def text(self) -> str:
        return (f"{self.gpu:g} GPU + " if self.gpu else "") + f"{self.cpu:g} CPU"

    def total_text(self) -> str:
        return f"{self.name} {self.text()}" if self.count == 1 else f"{self.count} {self.name}s x {self.text()}"


def node_types_from_config(config) -> tuple[list[NodeType], dict]:
    """(node types, max_resources) of an autoscaler ClusterConfig (ray.rpc.autoscaler proto,
    or anything with the same fields); ([], {}) for None."""
    if config is None:
        return [], {}
    types = [NodeType(name=g.name, resources={k: float(v) for k, v in g.resources.items()},
                      max_count=int(g.max_count), min_count=int(g.min_count))
             for g in config.node_group_configs]
    return types, {k: float(v) for k, v in config.max_resources.items()}


_noted_missing_node_types = False


def autoscaler_node_types() -> tuple[list[NodeType], dict]:
    """The node types the cluster's autoscaler reported, or ([], {}) when there are none or they
    cannot be read (then only the live nodes count)."""
    global _noted_missing_node_types
    try:
        import ray._private.state

        return node_types_from_config(ray._private.state.state.get_cluster_config())
    except Exception as exc:  # noqa: BLE001 - a private Ray API: without it, live nodes only
        if not _noted_missing_node_types:
            _noted_missing_node_types = True
            logger.debug("autoscaler node types unavailable (%s: %s); counting live nodes only",
                         type(exc).__name__, exc)
        return [], {}


def read_cluster() -> Cluster:
    """The connected Ray cluster's live nodes and autoscaler node types."""
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    node_types, max_resources = autoscaler_node_types()
    return Cluster(nodes, node_types, max_resources)


def gpu_capacity(cluster: Cluster) -> float:
    """GPUs the cluster has or can scale to: max(GPUs of the live nodes, sum over node types of
    max_count x GPUs per node), capped by the autoscaler's cluster-wide GPU limit. A node type
    without a max count adds nothing here (see `unbounded_gpu_types`) unless that limit is set."""
    current = sum(node.get("GPU", 0.0) for node in cluster.nodes)
    scalable = sum(t.max_count * t.resources.get("GPU", 0.0) for t in cluster.node_types if t.max_count > 0)
    cap = cluster.max_resources.get("GPU")
    if cap is not None:
        scalable = cap if unbounded_gpu_types(cluster) else min(scalable, cap)
    return max(current, scalable)


def unbounded_gpu_types(cluster: Cluster) -> list[str]:
    """Node types with GPUs and no max count: `--actors auto` cannot count them."""
    return [t.name for t in cluster.node_types if t.max_count < 0 and t.resources.get("GPU", 0.0) > 0]


def caption_request(config: CaptionConfig) -> Request:
    """One caption actor's request; --actors MIN of them must run at once."""
    return Request("caption actor", config.cpus_per_actor, config.gpus_per_actor or 0.0, count=config.actors_min,
                   remedy={"CPU": "pass a smaller --cpus-per-actor (fractions are fine)",
                           "GPU": "pass a smaller --gpus-per-actor, or --device cpu (and no --gpus-per-actor) "
                                  "to decode on CPU"})


def stage_requests(config: CaptionConfig) -> list[Request]:
    """What each stage of the graph asks per worker (after resolve: gpus_per_actor is a number)."""
    stage = {"CPU": "pass a smaller --stage-cpus (fractions are fine)"}
    requests = []
    if config.dry_run:
        requests.append(Request("image-check actor", config.stage_cpus, remedy=stage))
    else:
        requests += [caption_request(config), Request("preprocess actor", config.stage_cpus, remedy=stage)]
    requests += [Request("read task", config.stage_cpus, remedy=stage),
                 Request("repartition task (Ray Data)", REPARTITION_CPUS,
                         remedy={"CPU": "Ray Data runs it on 1 CPU: the cluster needs a node with 1 CPU"})]
    return requests


def _hosts(resources: dict, cpu: float, gpu: float) -> bool:
    return resources.get("CPU", 0.0) + _EPS >= cpu and resources.get("GPU", 0.0) + _EPS >= gpu


def _usable_types(cluster: Cluster) -> list[NodeType]:
    return [t for t in cluster.node_types if t.max_count != 0]


def where_fits(request: Request, cluster: Cluster) -> str | None:
    """"node" when a live node can host one `request`, "node type" when only a node type the
    autoscaler may start can, None when nothing can."""
    if any(_hosts(node, request.cpu, request.gpu) for node in cluster.nodes):
        return "node"
    if any(_hosts(t.resources, request.cpu, request.gpu) for t in _usable_types(cluster)):
        return "node type"
    return None


def _largest(cluster: Cluster) -> tuple[float, float]:
    """(CPU, GPU): the most one node (or node type) offers of each."""
    offers = cluster.nodes + [t.resources for t in _usable_types(cluster)]
    return (max((r.get("CPU", 0.0) for r in offers), default=0.0),
            max((r.get("GPU", 0.0) for r in offers), default=0.0))


def _packs(items: list[tuple[float, float]], bins: list[dict]) -> bool:
    """First-fit decreasing of (cpu, gpu) items into bins of node resources."""
    free = [[b.get("CPU", 0.0), b.get("GPU", 0.0)] for b in bins]
    for cpu, gpu in sorted(items, key=lambda item: (item[1], item[0]), reverse=True):
        slot = next((f for f in free if f[0] + _EPS >= cpu and f[1] + _EPS >= gpu), None)
        if slot is None:
            return False
        slot[0] -= cpu
        slot[1] -= gpu
    return True


def check_fits(config: CaptionConfig, cluster: Cluster) -> str:
    """Raise PipelineError when the graph can never run on `cluster`; else return where its
    first caption actor can go ("node": a live node, "node type": only after the autoscaler
    starts one), which decides how long the start-up watch waits (pipeline/watch.py)."""
    requests = stage_requests(config)
    placement = "node"
    for request in requests:
        where = where_fits(request, cluster)
        if where is None:
            cpu, gpu = _largest(cluster)
            short = "GPU" if request.gpu > gpu + _EPS else "CPU"
            types = " or node type" if cluster.node_types else ""
            raise PipelineError(f"{request.what} needs {request.text()} but no node{types} has that "
                                f"(largest per node: {gpu:g} GPU, {cpu:g} CPU); {request.remedy[short]}")
        if request.name == "caption actor":
            placement = where
    items = [(r.cpu, r.gpu) for r in requests for _ in range(r.count)]
    if _packs(items, cluster.nodes):
        return placement
    # Before giving up, let each node type add as many nodes as it may (no more than items).
    extra = [t.resources for t in _usable_types(cluster)
             for _ in range(len(items) if t.max_count < 0 else min(t.max_count, len(items)))]
    if extra and _packs(items, cluster.nodes + extra):
        return "node type"
    need = (sum(cpu for cpu, _ in items), sum(gpu for _, gpu in items))
    have = (sum(node.get("CPU", 0.0) for node in cluster.nodes), sum(node.get("GPU", 0.0) for node in cluster.nodes))
    short = [name for name, n, h in zip(("CPU", "GPU"), need, have) if n > h + _EPS]
    why = f"not enough {' and '.join(short)}" if short else "they do not fit on its nodes together"
    raise PipelineError(f"the graph needs {need[0]:g} CPU" + (f" + {need[1]:g} GPU" if need[1] else "") +
                        f" at once ({', '.join(r.total_text() for r in requests)}) but the cluster has "
                        f"{have[0]:g} CPU + {have[1]:g} GPU on {len(cluster.nodes)} node(s): {why}; pass a smaller "
                        "--cpus-per-actor/--stage-cpus (fractions are fine) or a smaller --actors MIN")
