"""Where a decode step's time goes, per batch size: model forwards vs everything else.

    python scripts/decode_breakdown.py [--batch-sizes 1,8,32] [--steps 8] [--device cpu] [--dtype float32]
                                       [--compare-lean-target [--rounds 3]]

For each batch size and tree shape (and no drafting), the demo pair decodes that many rows with
the engine (decoding/engine.py) and times whole steps and, inside them, every model forward
(target verify and draft forwards, device-synchronised). Prints one JSON object: per batch size
and shape the median step ms, the model-forward ms of the step, and the share of the step that
is not model compute (tree building, masks, acceptance, cache roll-forward, host syncs, Python).
--compare-lean-target adds, per shape, the same steps with the target verified through the
transformers forward ("<shape>/transformers_verify"), alternating with the default over --rounds
(the default verifies with the lean forward when `decoder.lean_target` holds on this device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import decoding.models  # noqa: E402
from decoding import SpeculativeDecoder, TreeConfig  # noqa: E402

SHAPES = {"none": None, "chain": TreeConfig(max_nodes=4, max_depth=4, frontier=1, top_k=1),
          "default": TreeConfig()}


def main() -> int:
    from transformers import AutoProcessor

    from jobs.bench import encode, make_inputs, sync
    from jobs.common import DEMO_PAIR
    from measure_common import add_measure_args, load_demo, setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measure_args(ap, batch_sizes="1,8,32")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compare-lean-target", action="store_true",
                    help="also time every shape with the transformers verify (decoder.lean_target off), "
                         "alternating with the default over --rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --compare-lean-target (default 3)")
    args = ap.parse_args()
    device, dtype, sizes = setup(args)
    target, draft = load_demo("target", device, dtype), load_demo("draft", device, dtype)
    processor = AutoProcessor.from_pretrained(str(DEMO_PAIR / "target"))
    text, images = make_inputs(processor, max(sizes))

    forward_s = [0.0]
    original = decoding.models.model_forward

    def timed_forward(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = original(*a, **kw)
        sync(device)
        forward_s[0] += time.perf_counter() - t0
        return out

    decoding.models.model_forward = timed_forward   # every model forward of a step goes through it
    decoder = SpeculativeDecoder(target, draft)
    # --compare-lean-target: every shape also runs with the transformers verify, alternating rounds
    variants = [("", decoder.lean_target)] + ([("/transformers_verify", False)] if args.compare_lean_target else [])
    report = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "lean_target": decoder.lean_target, "by_batch_size": {}}

    def measure(ids, mask, pixels, shape) -> tuple[list[float], list[float], int]:
        engine = decoder.engine(max_new_tokens=10 ** 6, eos_token_id=[])
        engine.tree_for = lambda active: shape
        engine.add(ids, mask, pixels)
        steps, forwards, tokens = [], [], 0
        for i in range(args.steps + 1):
            forward_s[0] = 0.0
            sync(device)
            t0 = time.perf_counter()
            result = engine.step()
            sync(device)
            if i:   # the first step is a warm-up
                steps.append(time.perf_counter() - t0)
                forwards.append(forward_s[0])
                tokens += sum(result.accepted)
        return steps, forwards, tokens

    lean_default = decoder.lean_target
    for B in sizes:
        ids, mask, pixels = encode(processor, text, images[:B], device, dtype)
        rows = {}
        for name, shape in SHAPES.items():
            runs = {suffix: ([], [], 0) for suffix, _ in variants}
            for _ in range(args.rounds if args.compare_lean_target else 1):
                for suffix, lean in variants:
                    decoder.lean_target = lean
                    steps, forwards, tokens = measure(ids, mask, pixels, shape)
                    s, f, t = runs[suffix]
                    runs[suffix] = (s + steps, f + forwards, t + tokens)
            decoder.lean_target = lean_default
            for suffix, (steps, forwards, tokens) in runs.items():
                step, fwd = statistics.median(steps), statistics.median(forwards)
                key = name + suffix
                rows[key] = {"step_ms": round(step * 1e3, 2), "model_forward_ms": round(fwd * 1e3, 2),
                             "not_model_share": round(1 - fwd / step, 3),
                             "tokens_per_s": round(tokens / sum(steps), 1)}
                print(f"batch {B:>3} {key:<28} step {step * 1e3:8.2f} ms  forwards {fwd * 1e3:8.2f} ms  "
                      f"not model {1 - fwd / step:6.1%}  {rows[key]['tokens_per_s']} tok/s", file=sys.stderr)
        report["by_batch_size"][str(B)] = rows
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
