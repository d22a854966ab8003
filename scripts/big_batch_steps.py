"""Where a large batch's decode spends its time, shape by shape (each shape alone, no budget).

    python scripts/big_batch_steps.py --batch 128 --shapes none,2x2,4x3 --threads 2

Decodes `--batch` synthetic demo images once per shape (after one untimed round) with the demo
pair and prints the prefill (`add`) seconds, the steps, their seconds, and the median step at
full batch with its draft/verify split: the figures docs/benchmarks.md quotes for why a tree
loses at batch 128 on a CPU. Greedy, fp32, `--max-new-tokens` like the bench's default.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from decoding import SpeculativeDecoder, TreeConfig  # noqa: E402
from decoding.budget import BudgetEntry, BudgetTable  # noqa: E402
from jobs.bench import encode, load_pair, make_inputs  # noqa: E402
from jobs.common import DEMO_PAIR  # noqa: E402


def parse_shape(text: str):
    if text == "none":
        return None
    nodes, depth = text.split("x")
    return int(nodes), int(depth)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--shapes", default="none,2x2,4x3", help="comma list of NODESxDEPTH or none")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pair = SimpleNamespace(target=str(DEMO_PAIR / "target"), draft=str(DEMO_PAIR / "draft"), dtype=torch.float32,
                           device="cpu")
    target, draft, processor = load_pair(pair)
    text, images = make_inputs(processor, args.batch)
    ids, mask, pixels = encode(processor, text, images, "cpu", torch.float32)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    for timed in (False, True):
        for shape in shapes:
            decoder = SpeculativeDecoder(target, draft, TreeConfig())
            tree = None if shape is None else TreeConfig(max_nodes=shape[0], max_depth=shape[1])
            decoder.budget = BudgetTable(entries=[BudgetEntry(batch_size=1, tree=tree)])
            engine = decoder.engine(max_new_tokens=args.max_new_tokens)
            t0 = time.perf_counter()
            engine.add(ids, mask, pixels)
            add_s = time.perf_counter() - t0
            log = []
            while engine.active:
                rows, t0 = engine.active, time.perf_counter()
                result = engine.step()
                log.append((rows, time.perf_counter() - t0, result.draft_s, result.verify_s))
            if not timed:
                continue
            full = [entry for entry in log if entry[0] == args.batch]
            median = (lambda i: statistics.median(e[i] for e in full) * 1e3) if full else (lambda i: float("nan"))
            name = "none" if shape is None else f"{shape[0]}x{shape[1]}"
            print(f"{name:>5}: add {add_s:.2f} s, {len(log)} steps {sum(e[1] for e in log):.2f} s; at {args.batch} rows "
                  f"({len(full)} steps) median {median(1):.1f} ms (draft {median(2):.1f}, verify {median(3):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
