"""How many rows decode at once: the KV pools' rows x length from a memory budget.

A row of p prompt tokens decoding up to n new tokens needs, in the target's pool, p + n token
slots plus one step's block (the root and a tree's nodes, plus the slack of the step that
finishes it), and in the draft's pool p + n plus its feed and tree blocks. With the pools sized
for the longest prompt the engine will see, a row that is admitted can always finish: the
engine never allocates during decoding, so a run cannot die of OOM mid-batch.

    plan = plan_capacity(target, draft, trees, prompt_tokens=600, max_new_tokens=256,
                         budget_bytes=kv_budget(device, weights_bytes=...))
    engine = decoder.engine(max_new_tokens=256, max_rows=plan.rows, max_length=plan.length)

Budget: on CUDA, `fraction` of the memory free after the weights are loaded (torch.cuda.mem_get_info);
elsewhere the caller says how much (`--kv-memory-gb`). Per row the plan also reserves the step's
largest transient: the verify's fp32 logits over the vocabulary (and the softmax that sampling
takes of them), rows x (1 + nodes) x V x 4 bytes x 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CapacityError
from .kvpool import KVShape
from .tree import TreeConfig

PENDING_CAP = 16   # steps without drafting let the draft's backlog grow up to this, then feed it
LOGIT_COPIES = 3   # logits, their float copy and the warped probabilities (sampling), at most


def tree_room(trees: list[TreeConfig]) -> tuple[int, int]:
    """Token slots a step may need past a row's committed length, for the shapes it may run:
    (target: root + nodes, then up to depth + 1 tokens of the finishing step;
     draft: the pending feed and the tree's temporary slots, then the same slack)."""
    nodes = max(min(t.max_nodes, t.max_candidates) for t in trees)
    depth = max(t.max_depth for t in trees)
    slots = max(t.max_depth * t.frontier for t in trees)
    return 1 + nodes + depth + 1, PENDING_CAP + depth + 1 + slots + depth + 1


@dataclass(frozen=True)
class CapacityPlan:
    rows: int                 # rows decoding at once
    length: int               # target token slots per row (the draft's follow from the same room)
    bytes_per_row: int        # both pools' KV plus the step's transient, per row
    budget_bytes: int

    def describe(self) -> str:
        return (f"{self.rows} rows x {self.length} KV slots ({self.bytes_per_row / 2**20:.1f} MiB a row, "
                f"{self.rows * self.bytes_per_row / 2**30:.2f} of {self.budget_bytes / 2**30:.2f} GiB)")


def plan_capacity(target_kv: KVShape, draft_kv: KVShape, trees: list[TreeConfig], prompt_tokens: int,
                  max_new_tokens: int, budget_bytes: int, vocab: int, max_rows: int | None = None,
                  spare_rows: int = 0) -> CapacityPlan:
    """The most rows (up to max_rows) whose whole decode fits `budget_bytes` (module doc), with
    `spare_rows` more rows of KV that no slot uses (compiled phases keep one: graphs.spare_rows)."""
    t_room, d_room = tree_room(trees)
    length = prompt_tokens + max_new_tokens + t_room
    d_length = prompt_tokens + max_new_tokens + d_room
    nodes = t_room - max(t.max_depth for t in trees) - 1
    kv_row = length * target_kv.bytes_per_token + d_length * draft_kv.bytes_per_token
    per_row = kv_row + nodes * vocab * 4 * LOGIT_COPIES
    rows = max(0, budget_bytes - spare_rows * kv_row) // per_row
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows < 1:
        raise CapacityError(f"one row of {prompt_tokens} prompt + {max_new_tokens} new tokens needs "
                            f"{per_row / 2**20:.1f} MiB of KV cache, the budget is {budget_bytes / 2**20:.1f} MiB: "
                            "give more memory (--kv-memory-gb) or fewer --max-new-tokens")
    return CapacityPlan(rows=int(rows), length=length, bytes_per_row=per_row, budget_bytes=budget_bytes)


def kv_budget(device, fraction: float = 0.9, cpu_bytes: int | None = None) -> int:
    """Bytes the KV pools may take: on CUDA `fraction` of the free memory now (call it after the
    weights are loaded); elsewhere `cpu_bytes` (the caller's flag)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    if cpu_bytes is None:
        raise ValueError("on a CPU the KV budget is a flag: pass cpu_bytes (e.g. --kv-memory-gb)")
    return int(cpu_bytes)


def plan_for(decoder, prompt_tokens: int, max_new_tokens: int, budget_bytes: int,
             max_rows: int | None = None, trees: list[TreeConfig] | None = None) -> CapacityPlan:
    """plan_capacity for a SpeculativeDecoder's pair and the tree shapes it may run (default: its
    tree and budget table)."""
    from .graphs import spare_rows
    from .models import vocab_size

    if not trees:
        trees = [decoder.tree] + [e.tree for e in getattr(decoder.budget, "entries", None) or [] if e.tree is not None]
    return plan_capacity(KVShape.of(decoder.target), KVShape.of(decoder.draft), trees, prompt_tokens,
                         max_new_tokens, budget_bytes, vocab_size(decoder.target), max_rows,
                         spare_rows(getattr(decoder, "graphs", None)))
