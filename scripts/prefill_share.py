"""How much of plain batched `generate` any decoding method can speed up, per batch size.

    python scripts/prefill_share.py [--batch-sizes 1,8,32,128] [--images 128] [--threads 1]

For each batch size, the demo pair's target runs HF `generate(do_sample=False)` over the bench's
synthetic images (same prompt, max_new_tokens and EOS as `specllava bench`) and a forward
pre-hook splits its time into the prefill (the first forward: vision tower + prompt) and the
decode steps. Speculative decoding only shortens the decode part, so with prefill share p no
method that keeps the prefill can beat 1 / p (Amdahl). It also times one target forward of Q
tokens over a cached prompt for Q = 1, 2, 3, 5, 9 (the verify of a 0/1/2/4/8-node tree) at that
batch size: decode can only gain where Q tokens cost much less than Q single-token steps.
Prints one JSON object; progress lines go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VERIFY_TOKENS = (1, 2, 3, 5, 9)


def main() -> int:
    from transformers import AutoProcessor

    from decoding.budget import forward_latency
    from jobs.bench import encode, make_inputs, sync
    from jobs.common import DEMO_PAIR
    from measure_common import add_measure_args, load_demo, setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measure_args(ap, batch_sizes="1,8,32,128")
    ap.add_argument("--images", type=int, default=None, help="default: the largest batch size")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    device, dtype, sizes = setup(args)
    images_n = args.images or max(sizes)
    target = load_demo("target", device, dtype)
    processor = AutoProcessor.from_pretrained(str(DEMO_PAIR / "target"))
    text, images = make_inputs(processor, images_n)
    eos = target.generation_config.eos_token_id
    starts: list[float] = []
    hook = target.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

    report = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "images": images_n, "max_new_tokens": args.max_new_tokens, "by_batch_size": {}}
    try:
        for bs in sizes:
            batches = [encode(processor, text, images[i:i + bs], device, dtype) for i in range(0, images_n, bs)]
            prefill_s = total_s = 0.0
            steps = 0
            for n, (ids, mask, pixels) in enumerate([batches[0]] + batches):   # the first batch warms up
                starts.clear()
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    target.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                    pad_token_id=target.generation_config.pad_token_id)
                sync(device)
                if n:
                    total_s += time.perf_counter() - t0
                    prefill_s += (starts[1] if len(starts) > 1 else time.perf_counter()) - starts[0]
                    steps += len(starts) - 1
            share = prefill_s / total_s
            verify = forward_latency(target, sizes=[q - 1 for q in VERIFY_TOKENS], prefix_len=ids.shape[1], batch=bs)
            one = verify[0]
            row = {"generate_s": round(total_s, 3), "prefill_share": round(share, 3),
                   "decode_steps": steps, "decode_step_ms": round((total_s - prefill_s) / max(1, steps) * 1e3, 2),
                   "amdahl_bound": round(1 / share, 2),
                   "verify_ms": {q: round(verify[q - 1] * 1e3, 2) for q in VERIFY_TOKENS},
                   "q_tokens_vs_q_steps": {q: round(verify[q - 1] / (q * one), 3) for q in VERIFY_TOKENS}}
            report["by_batch_size"][str(bs)] = row
            print(f"batch {bs:>3}: prefill {share:.0%} of generate ({total_s:.2f} s), decode step "
                  f"{row['decode_step_ms']} ms; bound 1/p = {row['amdahl_bound']}x; forward of Q tokens / Q "
                  f"one-token forwards: {row['q_tokens_vs_q_steps']}", file=sys.stderr)
    finally:
        hook.remove()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
