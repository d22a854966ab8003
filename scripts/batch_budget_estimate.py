"""Would a batch-wide tree budget beat a per-row one? An offline estimate from real decode steps.

    python scripts/batch_budget_estimate.py [--batch-sizes 32,128] [--budgets 1,2,4,8] [--threads 1]

The demo pair decodes the bench's synthetic images (greedy, max 48 new tokens) with a large tree
(24 nodes, depth 6) at each batch size. After every verify, for a budget of n tree nodes per row
on average, it counts the accepted tokens each policy would have got:
- per row (what the decoder does): every row keeps its n best nodes in the decoder's pruning
  order (`DraftTree.rank`);
- batch-wide: the n x B nodes of the whole batch with the highest draft path probability
  (ancestors rank first), so confident rows get deep trees and unsure rows few or none.
A kept node counts when it lies on the path the target accepted in the large tree and all its
ancestors are kept (greedy acceptance walks that path and stops at the first missing node).
Both policies verify n x B tree tokens; a dense [B, 1 + N] verify pads every row to the
longest row's tree, so the batch-wide policy only pays off with a verify that skips padding
(packed tokens). Prints one JSON object; a line per batch size goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def accepted_with(kept: torch.Tensor, acc) -> torch.Tensor:
    """[B] accepted nodes when only `kept` ([B, N] bool) of the tree is verified."""
    A = acc.nodes.shape[1]
    on_path = torch.arange(A, device=kept.device).unsqueeze(0) < acc.length.unsqueeze(1)
    kept_path = kept.gather(1, acc.nodes.clamp(min=0)) & on_path
    return kept_path.long().cumprod(dim=1).sum(1)


def batch_wide(tree, budget: int) -> torch.Tensor:
    """[B, N] bool: the `budget` best valid nodes of the batch by score, shallower first on ties."""
    B, N = tree.tokens.shape
    scores = tree.scores.masked_fill(~tree.valid, float("-inf")).flatten()
    by_depth = torch.sort(tree.depths.flatten(), stable=True).indices
    order = by_depth[torch.sort(scores[by_depth], descending=True, stable=True).indices]
    kept = torch.zeros(B * N, dtype=torch.bool, device=scores.device)
    kept[order[:budget]] = True
    return kept.view(B, N) & tree.valid


def main() -> int:
    from transformers import AutoProcessor

    from decoding import SpeculativeDecoder, TreeConfig
    from jobs.bench import encode, make_inputs
    from jobs.common import DEMO_PAIR
    from measure_common import add_measure_args, load_demo, setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measure_args(ap, batch_sizes="32,128")
    ap.add_argument("--budgets", default="1,2,4,8", help="tree nodes per row on average")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    device, dtype, sizes = setup(args)
    budgets = [int(n) for n in args.budgets.split(",")]
    target, draft = load_demo("target", device, dtype), load_demo("draft", device, dtype)
    processor = AutoProcessor.from_pretrained(str(DEMO_PAIR / "target"))
    text, images = make_inputs(processor, max(sizes))
    decoder = SpeculativeDecoder(target, draft, TreeConfig(max_nodes=24, max_depth=6))
    report = {"device": str(device), "dtype": args.dtype, "tree": {"max_nodes": 24, "max_depth": 6},
              "by_batch_size": {}}
    for bs in sizes:
        totals = {(policy, n): 0 for policy in ("per_row", "batch_wide") for n in budgets}
        row_steps, full_tree = [0], [0]

        def observe(tree, acc):
            B = tree.tokens.shape[0]
            row_steps[0] += B
            full_tree[0] += int(acc.length.sum())
            for n in budgets:
                per_row = (tree.rank < n) & tree.valid
                totals[("per_row", n)] += int(accepted_with(per_row, acc).sum())
                totals[("batch_wide", n)] += int(accepted_with(batch_wide(tree, n * B), acc).sum())

        decoder.step_observer = observe
        ids, mask, pixels = encode(processor, text, images[:bs], device, dtype)
        decoder.generate(ids, mask, pixels, max_new_tokens=args.max_new_tokens)
        decoder.step_observer = None
        row = {str(n): {policy: round(1 + totals[(policy, n)] / row_steps[0], 3)
                        for policy in ("per_row", "batch_wide")} for n in budgets}
        report["by_batch_size"][str(bs)] = {"row_steps": row_steps[0], "tau_by_nodes_per_row": row,
                                            "full_tree_tau": round(1 + full_tree[0] / row_steps[0], 3)}
        print(f"batch {bs}: tau (accepted + bonus) per row-step, per row vs batch-wide: "
              + "; ".join(f"{n} nodes {r['per_row']} vs {r['batch_wide']}" for n, r in row.items()), file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
