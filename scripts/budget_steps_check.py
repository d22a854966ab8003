"""Does the tree budget's step timing match a real decode? (the open question of issue 21's notes)

    python scripts/budget_steps_check.py --pair smollm2 --batch 8 --threads 2

For `--batch` rows of the bench's images it prints, in milliseconds:
  decode     the no-drafting steps of a real decode (`--max-new-tokens`, EOS ignored) in a drafting
             engine and in a target-only engine (what `plain_engine` runs): median and first 10;
  budget     `decoding.budget.step_samples` as `choose_table` runs it (every candidate shape and no
             drafting, interleaved, `--steps` samples each): every shape's median and the
             no-drafting samples;
  alone      `step_samples` with no drafting only.
docs/benchmarks.md (issue 21, 2026-12-07) quotes it: the budget's no-drafting steps came out far
slower than a decode's, which makes every tree look better than it is.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from decoding import SpeculativeDecoder, TreeConfig  # noqa: E402
from decoding.budget import DEFAULT_SHAPES, step_samples  # noqa: E402
from scripts.big_batch_steps import pair_dirs  # noqa: E402


def ms(values) -> list[float]:
    return [round(v * 1e3, 1) for v in values]


def main() -> int:
    from types import SimpleNamespace

    from jobs.bench import encode, load_pair, make_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=("demo", "smollm2"), default="demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="samples per shape, as choose_table takes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target_dir, draft_dir, prompt = pair_dirs(args.pair)
    target, draft, processor = load_pair(SimpleNamespace(target=str(target_dir), draft=str(draft_dir),
                                                         dtype=torch.float32, device="cpu"))
    text, images = make_inputs(processor, args.batch, prompt)
    inputs = encode(processor, text, images, "cpu", torch.float32)
    decoder = SpeculativeDecoder(target, draft, TreeConfig())
    for drafting in (True, False):
        engine = decoder.engine(max_new_tokens=args.max_new_tokens, eos_token_id=[], max_rows=args.batch,
                                drafting=drafting)
        engine.tree_for = lambda active: None
        engine.add(*inputs)
        times = []
        while engine.active:
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        name = "drafting engine" if drafting else "target-only engine"
        print(f"decode, {name}: no-drafting steps median {statistics.median(times) * 1e3:.1f} ms, "
              f"first 10 {ms(times[:10])}", flush=True)
    shapes = tuple(DEFAULT_SHAPES) + (None,)
    samples = step_samples(decoder, *inputs, args.batch, shapes, steps=args.steps)
    medians = {("none" if k is None else f"{k[0]},{k[1]}"): round(statistics.median(v) * 1e3, 1)
               for k, v in samples.items()}
    print(f"budget, interleaved: medians {medians}; no-drafting samples {ms(samples[None])}", flush=True)
    alone = step_samples(decoder, *inputs, args.batch, (None,), steps=args.steps)
    print(f"budget, no drafting alone: samples {ms(alone[None])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
