"""Hardware-aware tree budget (Sequoia-style): pick max_nodes and max_depth for this device.

Two measurements, then a choice:
1. Cost: the target's verify latency for tree sizes n (one forward of n+1 tokens over a
   prefix of typical length) and the draft's latency per forward, on the current device.
2. Acceptance: one calibration decode with a large tree records, for every step, the kept
   path and each path node's rank in the pruning order. Pruning keeps a rank prefix and
   ancestors rank before descendants, so with budget n and depth d a step would have accepted
   exactly the path nodes of rank < n and depth <= d: tau(n, d) is read off the same steps.
3. Choice: argmax over (n, d) of tau(n, d) / (d * draft_s + verify_s(n)).
Greedy decoding produces the same tokens whatever the tree, so the estimate is not biased
by the calibration tree's own choices.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .decoder import SpeculativeDecoder
from .models import forward_block, model_device, prefill
from .tree import TreeConfig

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class BudgetReport:
    tree: TreeConfig                                  # the chosen configuration
    verify_s: dict[int, float]                        # tree nodes -> median target verify latency
    draft_s: float                                    # median draft forward latency
    tau: dict[tuple[int, int], float] = field(default_factory=dict)        # (nodes, depth) -> tau
    predicted_tps: dict[tuple[int, int], float] = field(default_factory=dict)  # per row and second

    def to_dict(self) -> dict:
        return {
            "chosen": {"max_nodes": self.tree.max_nodes, "max_depth": self.tree.max_depth},
            "verify_ms": {str(n): round(s * 1e3, 3) for n, s in self.verify_s.items()},
            "draft_forward_ms": round(self.draft_s * 1e3, 3),
            "candidates": [{"max_nodes": n, "max_depth": d, "tau": round(t, 3),
                            "predicted_tokens_per_s": round(self.predicted_tps[(n, d)], 2)}
                           for (n, d), t in sorted(self.tau.items())],
        }


@torch.no_grad()
def forward_latency(model, sizes=DEFAULT_SIZES, prefix_len: int = 64, batch: int = 1, repeats: int = 5,
                    lean: bool = False) -> dict[int, float]:
    """Median latency of one forward of n+1 tree tokens (a chain mask) over a cached prefix.

    lean=True times the lean draft forward (decoding/lean.py), as the drafter runs it."""
    device = model_device(model)
    vocab = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (batch, prefix_len), generator=g).to(device)
    state, _ = prefill(model, ids, torch.ones_like(ids), None)
    result = {}
    for n in sizes:
        q = n + 1
        tokens = torch.randint(3, max(4, vocab), (batch, q), generator=g).to(device)
        positions = state.lengths.unsqueeze(1) + torch.arange(q, device=device)
        vis = torch.tril(torch.ones(q, q, dtype=torch.bool, device=device)).expand(batch, q, q)
        valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            forward_block(model, state, tokens, positions, vis, valid, lean=lean)
            _sync(device)
            times.append(time.perf_counter() - t0)
            state.crop()
        result[n] = statistics.median(times[1:])
    return result


def calibrate_tau(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values, max_new_tokens: int,
                  max_nodes_grid, depth_grid) -> dict[tuple[int, int], float]:
    """tau(n, d) for every grid point, from one greedy decode with the largest tree."""
    base = decoder.tree
    big = replace(base, max_depth=max(depth_grid), max_nodes=10 ** 6, threshold=base.threshold)
    steps: list[tuple[list[int], list[int]]] = []   # per step: ranks and depths of accepted path nodes

    def observe(tree, acc):
        for b, path in enumerate(acc.paths):
            steps.append(([int(tree.rank[b, i]) for i in path], [int(tree.depths[b, i]) for i in path]))

    decoder.set_tree(big)
    decoder.step_observer = observe
    try:
        decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens, eos_token_id=[])
    finally:
        decoder.step_observer = None
        decoder.set_tree(base)
    tau = {}
    for n in max_nodes_grid:
        for d in depth_grid:
            kept = []
            for ranks, depths in steps:
                k = 0
                for r, dep in zip(ranks, depths):
                    if r >= n or dep > d:
                        break
                    k += 1
                kept.append(k + 1)
            tau[(n, d)] = statistics.mean(kept) if kept else 1.0
    return tau


def choose_tree(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values, max_new_tokens: int = 32,
                max_nodes_grid=(4, 8, 16, 24, 32, 48, 64), depth_grid=(2, 3, 4, 5, 6, 8)) -> BudgetReport:
    """Measure costs and acceptance on this device and return the best tree for it (not applied)."""
    batch = input_ids.shape[0]
    verify = forward_latency(decoder.target, sizes=sorted(set(max_nodes_grid)), batch=batch,
                             prefix_len=input_ids.shape[1])
    draft = forward_latency(decoder.draft, sizes=(decoder.tree.frontier - 1 or 1,), batch=batch,
                            prefix_len=input_ids.shape[1], lean=decoder.drafter.lean)
    draft_s = next(iter(draft.values()))
    tau = calibrate_tau(decoder, input_ids, attention_mask, pixel_values, max_new_tokens, max_nodes_grid, depth_grid)
    predicted = {(n, d): t / (d * draft_s + verify[n]) for (n, d), t in tau.items()}
    n, d = max(predicted, key=predicted.get)
    chosen = replace(decoder.tree, max_nodes=n, max_depth=d)
    return BudgetReport(tree=chosen, verify_s=verify, draft_s=draft_s, tau=tau, predicted_tps=predicted)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
