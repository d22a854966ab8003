"""Where a batch's decode spends its time, shape by shape (each shape alone, no budget).

    python scripts/big_batch_steps.py --batch 128 --shapes none,2x2,4x3 --threads 2
    python scripts/big_batch_steps.py --pair smollm2 --batch 8 --shapes none,4x3 --max-new-tokens 128 --ignore-eos

Decodes `--batch` synthetic images once per shape (after one untimed round) with the demo pair
(or the real-weights pair: `--pair smollm2`, the bench's detailed prompt) and prints the prefill
(`add`) seconds, the steps, their seconds, the median step at full batch with its draft/verify
split, and the median of the first and last 5 full-batch steps (how a step's cost moves as the
rows grow), and the steps run with fewer rows (rows that reached their end while others had not):
the figures docs/benchmarks.md quotes for why a tree loses at large batch on a CPU. Greedy, fp32,
`--max-new-tokens` like the bench's default.
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


def pair_dirs(name: str):
    """(target dir, draft dir, prompt or None) of the demo or the real-weights pair."""
    if name == "demo":
        return DEMO_PAIR / "target", DEMO_PAIR / "draft", None
    from training import smollm2_pair as sp
    return sp.ensure_target(), sp.PAIR_ASSETS / "draft", sp.DETAIL_PROMPT


def parse_shape(text: str):
    if text == "none":
        return None
    nodes, depth = text.split("x")
    return int(nodes), int(depth)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=("demo", "smollm2"), default="demo")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--shapes", default="none,2x2,4x3", help="comma list of NODESxDEPTH or none")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--ignore-eos", action="store_true", help="every row decodes --max-new-tokens tokens")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target_dir, draft_dir, prompt = pair_dirs(args.pair)
    pair = SimpleNamespace(target=str(target_dir), draft=str(draft_dir), dtype=torch.float32, device="cpu")
    target, draft, processor = load_pair(pair)
    text, images = make_inputs(processor, args.batch, prompt)
    ids, mask, pixels = encode(processor, text, images, "cpu", torch.float32)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    for timed in (False, True):
        for shape in shapes:
            decoder = SpeculativeDecoder(target, draft, TreeConfig())
            tree = None if shape is None else TreeConfig(max_nodes=shape[0], max_depth=shape[1])
            decoder.budget = BudgetTable(entries=[BudgetEntry(batch_size=1, tree=tree)])
            engine = decoder.engine(max_new_tokens=args.max_new_tokens, **({"eos_token_id": []} if args.ignore_eos else {}))
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
            fewer = [entry for entry in log if entry[0] < args.batch]
            median = (lambda i: statistics.median(e[i] for e in full) * 1e3) if full else (lambda i: float("nan"))
            ms = lambda entries: statistics.median(e[1] for e in entries) * 1e3 if entries else float("nan")  # noqa: E731
            name = "none" if shape is None else f"{shape[0]}x{shape[1]}"
            print(f"{name:>5}: add {add_s:.2f} s, {len(log)} steps {sum(e[1] for e in log):.2f} s; at {args.batch} rows "
                  f"({len(full)} steps) median {median(1):.1f} ms (draft {median(2):.1f}, verify {median(3):.1f}), "
                  f"first 5 {ms(full[:5]):.1f} ms, last 5 {ms(full[-5:]):.1f} ms; {len(fewer)} steps with fewer rows "
                  f"{sum(e[1] for e in fewer):.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
