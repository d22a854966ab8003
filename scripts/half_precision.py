"""Greedy losslessness in half precision, measured against the fair reference.

    python scripts/half_precision.py                          # demo pair, bfloat16, 32 images, batch 8
    python scripts/half_precision.py --quick --json           # tiny random pair built in code (seconds)
    python scripts/half_precision.py --dtype float16 --control-fp32 --device cuda

What "lossless" can mean in bf16/fp16. In float32 our greedy output equals the target's
`generate(do_sample=False)` token for token. In half precision no two computation paths agree
bit for bit: a tree verify scores several tokens in one forward, a batch of 8 runs other kernel
shapes than a batch of 1, and either can move a logit by a rounding error. Where the target's top
two logits are that close, the argmax may flip, and from there the rows part. That is not a
decoder bug: `generate` itself parts from itself the same way when only the batch size changes.
So the fair reference is `generate` against `generate`:

  R1  target.generate(do_sample=False) at batch 1, row by row       (the reference)
  G   target.generate at batch --batch-size, left padded as jobs.bench.encode pads
  S1  SpeculativeDecoder(target, draft, TreeConfig()).generate at batch 1, row by row
  S   the same at batch --batch-size

Each of G, S1 and S is compared with R1: the fraction of rows that differ, the token match rate
(positions equal up to the shorter row, over R1's tokens, as jobs.bench.match_rate) and the mean
first differing position. At each row's first differing position the target runs once more, in
the same dtype and in float32, on the image, the prompt and R1's tokens before that position (the
context both outputs still share) and reports the top-2 logit gap there (top1 - top2) and the
rank of the token the other output chose (0 = top1).

A difference is a near tie when the other output's token is the target's top 1 or top 2 there
and the top-2 gap is at most --near-tie logits (default: 16 * the dtype's machine epsilon, two
ulps of a logit in [8, 16): 0.125 in bfloat16, 0.0156 in float16). Rounding explains a near tie;
a difference at a large gap, or to a token ranked below 2, is not rounding and points at a bug
(`suspects` in the summary). Each difference also carries the largest |half - float32| logit error
at that position, the rounding noise actually measured there.

--control-fp32 runs everything again in float32, where S1 and S must equal R1 exactly (exit 1 if
not). Prints a summary, or with --json exactly one JSON object on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import DEMO_PAIR, POSITIVE_INT, add_dtype_argument, default_device  # noqa: E402

# the compared outputs, each against the batch-1 reference R1
METHODS = ("generate_batched", "speculative_batch1", "speculative_batched")


def first_difference(ref: list[int], got: list[int]) -> int | None:
    """The first position where the rows differ (the shorter length when one is a prefix of the
    other), or None when they are equal."""
    for pos, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return pos
    return None if len(ref) == len(got) else min(len(ref), len(got))


def near_tie_default(dtype: torch.dtype) -> float:
    """Two ulps of a logit in [8, 16) in `dtype`: 16 * eps (bfloat16 0.125, float16 2**-6)."""
    return 16 * torch.finfo(dtype).eps


@torch.no_grad()
def logits_at(model, prompt, context: list[int]) -> torch.Tensor:
    """The model's float32 logits [V] after `prompt` (ids [1, T], pixels) and `context` tokens,
    in one full forward with no padding and no cache."""
    ids, pixels = prompt
    tail = torch.tensor([context], dtype=ids.dtype, device=ids.device)
    full = torch.cat([ids, tail], dim=1)                                          # [1, T + pos]
    out = model(input_ids=full, attention_mask=torch.ones_like(full),
                pixel_values=pixels.to(model.dtype), use_cache=False)
    return out.logits[0, -1].float()


def gap_report(logits: torch.Tensor, token: int) -> dict:
    """Top-2 gap of `logits` [V] and the rank of `token` in them (0 = top 1)."""
    top = torch.topk(logits, 2).values
    return {"top2_gap": round(float(top[0] - top[1]), 6),
            "rank": int((logits > logits[token]).sum())}


def gap_scorer(target, fp32_target, prompts, reference: list[list[int]]):
    """`gaps(row, pos, token)` for `compare`: the gap record at row `row`'s position `pos` in the
    reference context (prompts[row] = (ids [1, T], pixels), then reference[row][:pos]) for the
    token another output chose there; from `target` and, when given, `fp32_target`, whose
    logits also give the largest rounding error there. One forward per (row, pos), memoised."""
    memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def gaps(row: int, pos: int, token: int) -> dict:
        if (row, pos) not in memo:
            context = reference[row][:pos]
            full = logits_at(fp32_target, prompts[row], context) if fp32_target is not None else None
            memo[row, pos] = logits_at(target, prompts[row], context), full
        half, full = memo[row, pos]
        record = gap_report(half, token)
        if full is not None:
            fp32 = gap_report(full, token)
            record.update(top2_gap_fp32=fp32["top2_gap"], rank_fp32=fp32["rank"],
                          max_logit_error=round(float((half - full).abs().max()), 6))
        return record

    return gaps


def decode(target, draft, rows, batches, max_new_tokens: int, eos: set[int]) -> dict[str, list[list[int]]]:
    """{"reference": R1, "generate_batched": G, "speculative_batch1": S1, "speculative_batched": S},
    each a list of new-token rows cut after the first EOS. rows / batches: (ids, mask, pixels) at
    batch 1 / at the batch size, over the same images in the same order."""
    from decoding import SpeculativeDecoder, TreeConfig
    from decoding.stats import cut_after_eos

    eos_ids = sorted(eos)
    decoder = SpeculativeDecoder(target, draft, TreeConfig())

    def hf(inputs):
        ids, mask, pixels = inputs
        with torch.no_grad():
            out = target.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                                  pad_token_id=target.generation_config.pad_token_id)
        return cut_after_eos(out[:, ids.shape[1]:].tolist(), eos)

    def ours(inputs):
        return decoder.generate(*inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_ids).sequences

    return {"reference": [r for x in rows for r in hf(x)],
            "generate_batched": [r for x in batches for r in hf(x)],
            "speculative_batch1": [r for x in rows for r in ours(x)],
            "speculative_batched": [r for x in batches for r in ours(x)]}


def compare(ref: list[list[int]], got: list[list[int]], gaps, near_tie: float) -> dict:
    """Rows of `got` against the reference rows `ref`. `gaps(row, pos, token)` (gap_scorer) scores
    each first differing position; None leaves the differences unscored."""
    from jobs.bench import match_rate

    differences = []
    for row, (r, g) in enumerate(zip(ref, got)):
        pos = first_difference(r, g)
        if pos is None:
            continue
        record = {"row": row, "position": pos, "ref_token": r[pos] if pos < len(r) else None,
                  "got_token": g[pos] if pos < len(g) else None}
        if gaps is not None and record["ref_token"] is not None and record["got_token"] is not None:
            record.update(gaps(row, pos, record["got_token"]))
            record["near_tie"] = record["rank"] <= 1 and record["top2_gap"] <= near_tie
        differences.append(record)
    scored = [d for d in differences if "top2_gap" in d]
    return {"rows": len(ref), "rows_differ": len(differences),
            "rows_differ_fraction": round(len(differences) / len(ref), 4) if ref else 0.0,
            "match_rate": round(match_rate(got, ref), 4),
            "mean_first_diff_position": round(statistics.mean(d["position"] for d in differences), 2)
            if differences else None,
            "gaps": summarise(scored), "differences": differences}


def summarise(scored: list[dict]) -> dict:
    """Median/max top-2 gap (same dtype and float32) over the scored differences, near ties and suspects."""
    def stats(key):
        values = [d[key] for d in scored if d.get(key) is not None]
        return (round(statistics.median(values), 6), round(max(values), 6)) if values else (None, None)

    (median, largest), (median32, largest32) = stats("top2_gap"), stats("top2_gap_fp32")
    near = sum(d["near_tie"] for d in scored)
    return {"scored": len(scored), "median": median, "max": largest, "median_fp32": median32,
            "max_fp32": largest32, "near_ties": near, "suspects": len(scored) - near}


def measure(target, draft, processor, text, images, *, batch_size: int, max_new_tokens: int,
            eos: set[int], device, near_tie: float, fp32_target=None, log=print) -> dict:
    """Decode R1, G, S1 and S in the models' dtype and compare G, S1 and S with R1. The gap at
    each first differing position comes from `target` and, when given, from `fp32_target`."""
    from jobs.bench import encode

    dtype = target.dtype
    # the gaps' prompts keep float32 pixels: the float32 target then sees the image unrounded
    prompts = [(ids, pixels) for ids, _, pixels in (encode(processor, text, [image], device, torch.float32)
                                                    for image in images)]
    rows = [(ids, torch.ones_like(ids), pixels.to(dtype)) for ids, pixels in prompts]
    batches = [encode(processor, text, images[i:i + batch_size], device, dtype)
               for i in range(0, len(images), batch_size)]
    t0 = time.perf_counter()
    outputs = decode(target, draft, rows, batches, max_new_tokens, eos)
    log(f"{str(dtype).removeprefix('torch.')}: decoded {len(images)} images four ways in "
        f"{time.perf_counter() - t0:.1f} s")
    reference = outputs["reference"]
    gaps = gap_scorer(target, fp32_target, prompts, reference)
    return {"dtype": str(dtype).removeprefix("torch."), "near_tie": near_tie,
            "vs_reference": {m: compare(reference, outputs[m], gaps, near_tie) | {
                "batch_size": 1 if m == "speculative_batch1" else batch_size} for m in METHODS},
            "tokens": sum(len(r) for r in reference), "reference": reference}


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['dtype']} vs generate at batch 1 ({result['tokens']} reference tokens; "
             f"near tie: rank <= 1 and top-2 gap <= {result['near_tie']:g})"]
    for method, r in result["vs_reference"].items():
        line = (f"  {method:<20} batch {r['batch_size']:>3}  rows differ {r['rows_differ']}/{r['rows']}  "
                f"match {r['match_rate']:.4f}")
        g = r["gaps"]
        if r["rows_differ"]:
            line += f"  first diff at {r['mean_first_diff_position']}"
        if g["scored"]:
            line += (f"  top-2 gap median {g['median']} max {g['max']} (fp32 {g['median_fp32']} / "
                     f"{g['max_fp32']})  near ties {g['near_ties']}  suspects {g['suspects']}")
        lines.append(line)
    return lines


def load(args, dtype: torch.dtype):
    """(target, draft, processor) in `dtype` on args.device: the quick pair or the two directories."""
    if args.quick:
        from jobs.bench import quick_pair
        target, draft, processor = quick_pair()
        return target.to(args.device, dtype), draft.to(args.device, dtype), processor
    from decoding.loading import load_model
    from transformers import AutoProcessor
    for role in ("target", "draft"):
        if not Path(getattr(args, role), "config.json").is_file():
            raise SystemExit(f"--{role} {getattr(args, role)} is not a model directory; "
                             "pass --target DIR --draft DIR or use --quick")
    return (load_model(args.target, dtype, args.device), load_model(args.draft, dtype, args.device),
            AutoProcessor.from_pretrained(args.target))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(DEMO_PAIR / "target"), help="target model dir (default: demo pair)")
    ap.add_argument("--draft", default=str(DEMO_PAIR / "draft"), help="draft model dir (default: demo pair)")
    ap.add_argument("--quick", action="store_true", help="tiny random pair built in code (jobs.bench.quick_pair)")
    add_dtype_argument(ap, default="bfloat16")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--images", type=POSITIVE_INT, default=32, help="synthetic images (default 32)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="batch of G and S (default 8)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32)
    ap.add_argument("--prompt", default=None, help="user prompt next to the image (default: the bench's)")
    ap.add_argument("--ignore-eos", action="store_true", help="every row decodes exactly --max-new-tokens tokens")
    ap.add_argument("--near-tie", type=float, default=None,
                    help="top-2 gap (logits) at or below which a difference is a near tie (default 16 * eps)")
    ap.add_argument("--control-fp32", action="store_true",
                    help="also run everything in float32, where S must equal generate exactly")
    ap.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from decoding.loading import parse_dtype
    from jobs.bench import make_inputs

    args = parse_args(argv)
    args.device = args.device or default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    dtype = parse_dtype(args.dtype)
    near_tie = args.near_tie if args.near_tie is not None else near_tie_default(dtype)

    # float32 first: the control pair, and the target that scores the gaps in float32
    fp32_target, fp32_draft, processor = load(args, torch.float32)
    if args.quick:   # the same random weights, cast (loading would draw new ones)
        target, draft = copy.deepcopy(fp32_target).to(dtype), copy.deepcopy(fp32_draft).to(dtype)
    else:
        target, draft, processor = load(args, dtype)
    if not args.control_fp32:
        fp32_draft = None
    eos = target.generation_config.eos_token_id
    eos = set() if eos is None or args.ignore_eos else ({eos} if isinstance(eos, int) else set(eos))
    text, images = make_inputs(processor, args.images, args.prompt)
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, eos=eos,
                  device=args.device, log=log)

    report = {"device": str(args.device), "dtype": args.dtype,
              "settings": {"target": "quick" if args.quick else args.target,
                           "draft": "quick" if args.quick else args.draft, "images": args.images,
                           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                           "prompt": args.prompt, "ignore_eos": bool(args.ignore_eos),
                           "threads": torch.get_num_threads()},
              "half": measure(target, draft, processor, text, images, near_tie=near_tie,
                              fp32_target=fp32_target, **common),
              "control_fp32": None}
    status = 0
    if args.control_fp32:
        control = measure(fp32_target, fp32_draft, processor, text, images,
                          near_tie=near_tie_default(torch.float32), **common)
        control["exact"] = all(control["vs_reference"][m]["rows_differ"] == 0
                               for m in ("speculative_batch1", "speculative_batched"))
        # how far half precision moves generate's own output from float32's (unscored: a
        # different model numerically, not a different decoding of one)
        control["half_reference_vs_fp32_reference"] = compare(control["reference"], report["half"]["reference"],
                                                              None, 0.0)
        report["control_fp32"] = control
        if not control["exact"]:
            log("FAIL: in float32 the speculative output differs from generate at batch 1")
            status = 1
    for part in ("half", "control_fp32"):
        if report[part]:
            for line in summary_lines(report[part]):
                log(line)
    if report["control_fp32"]:
        r = report["control_fp32"]["half_reference_vs_fp32_reference"]
        log(f"{args.dtype} generate vs float32 generate, both at batch 1: rows differ {r['rows_differ']}/{r['rows']}"
            f"  match {r['match_rate']:.4f}  first diff at {r['mean_first_diff_position']}")
    if args.json:
        print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
