"""The bench's plain_engine, as it is against as it was (issue 21, docs/benchmarks.md).

    python scripts/plain_engine_ab.py --batch 128 --images 128 --rounds 3 --threads 2

Three plain decoders on the same batches (demo pair by default), interleaved round after round,
medians: this engine on the target alone with `generate`'s kept pool buffers (what plain_engine
runs now: `SpeculativeDecoder.generate` with a budget that never drafts); the same engine with
the draft still prefilled, its pool allocated and its backlog fed, on fresh pool buffers each
call (what plain_engine ran before); and HF `generate(do_sample=False)` on the target. Every
decoder's output is checked against the target's greedy output first.
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.budget import BudgetEntry, BudgetTable
from decoding.stats import cut_after_eos
from jobs.bench import encode, load_pair, make_inputs
from jobs.common import DEMO_PAIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEMO_PAIR / "target"))
    p.add_argument("--draft", default=str(DEMO_PAIR / "draft"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target, draft, processor = load_pair(types.SimpleNamespace(target=args.target, draft=args.draft,
                                                               dtype="float32", device="cpu"))
    text, images = make_inputs(processor, args.images)
    batches = [encode(processor, text, images[i:i + args.batch], "cpu", torch.float32)
               for i in range(0, args.images, args.batch)]
    eos = target.generation_config.eos_token_id
    eos = sorted({eos} if isinstance(eos, int) else set(eos or []))
    n_new = args.max_new_tokens

    def plain_decoder() -> SpeculativeDecoder:
        decoder = SpeculativeDecoder(target, draft, TreeConfig())
        decoder.budget = BudgetTable(entries=[BudgetEntry(batch_size=1, tree=None)])
        return decoder

    now, before = plain_decoder(), plain_decoder()

    def target_only(batch) -> list:
        return now.generate(*batch, max_new_tokens=n_new, eos_token_id=eos).sequences

    def with_draft(batch) -> list:
        engine = before.engine(n_new, eos_token_id=eos, max_rows=batch[0].shape[0], drafting=True, kept=None)
        done = {row.key: row.tokens for row in engine.add(*batch)}
        while engine.active:
            done.update((row.key, row.tokens) for row in engine.step().finished)
        return [done[b] for b in range(batch[0].shape[0])]

    def hf_greedy(batch) -> list:
        ids, mask, pixels = batch
        with torch.no_grad():
            out = target.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n_new,
                                  do_sample=False, eos_token_id=eos, pad_token_id=target.generation_config.pad_token_id)
        return cut_after_eos(out[:, ids.shape[1]:].tolist(), set(eos))

    methods = {"target-only engine, kept buffers (now)": target_only,
               "engine with the draft, fresh buffers (before)": with_draft,
               "HF generate greedy": hf_greedy}
    reference = [hf_greedy(b) for b in batches]            # also the warm-up
    for name, fn in methods.items():
        assert [fn(b) for b in batches] == reference, f"{name}: output differs from the target's greedy output"
    seconds = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for batch in batches:
                fn(batch)
            seconds[name].append(time.perf_counter() - t0)
    for name, values in seconds.items():
        print(f"batch {args.batch}: {name:<46} median {statistics.median(values):.3f} s  "
              f"rounds {[round(v, 3) for v in values]}")


if __name__ == "__main__":
    main()
