"""`specllava bench`: the decoder's speed, measured side by side in one process.

On the same images and prompt, in one process, methods are interleaved round after round
(so machine noise hits all of them alike) and the median round is reported:
  target_greedy  HF `generate(do_sample=False)` on the target alone (the reference output);
  hf_assisted    HF assisted generation with the same draft (a chain; batch 1 only, HF raises above);
  static_tree    our decoder with a fixed-shape tree (top-k siblings along the draft's greedy chain);
  dynamic_tree   our decoder with the dynamic tree (budget chosen on this device unless --no-budget).
Per method: tokens/s, mean accepted length tau (decoding.stats.mean_accepted_length),
target forwards per token, and token match rate against target_greedy.

    specllava bench                 # demo pair, batch 1 and 8, table + PNG chart
    specllava bench --json          # exactly one JSON object on stdout
    specllava bench --quick         # tiny random pair built in code (seconds; used by tests)
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
from pathlib import Path

from jobs.common import DEMO_PAIR, UserError, add_dtype_argument, default_device

# torch and the decoder are imported inside the functions that use them: `specllava --help`
# builds this parser too, and must not pay for a torch import.
METHODS = ("target_greedy", "hf_assisted", "static_tree", "dynamic_tree")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark target greedy vs HF assisted vs our static/dynamic tree",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(DEMO_PAIR / "target"), help="target model dir (default: demo pair)")
    p.add_argument("--draft", default=str(DEMO_PAIR / "draft"), help="draft model dir (default: demo pair)")
    p.add_argument("--images", type=int, default=16, help="synthetic images per batch size (default 16)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    add_dtype_argument(p, default="float32")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--no-budget", action="store_true", help="use the default TreeConfig for dynamic_tree "
                   "instead of measuring a budget on this device")
    p.add_argument("--chart", default="bench.png", help="PNG chart path ('' to skip; default bench.png)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object and nothing else")
    p.add_argument("--quick", action="store_true", help="tiny random pair built in code, 4 images, 12 tokens")
    p.add_argument("--self-draft", action="store_true", help="use the target as its own draft (tau upper "
                   "bound: measures the machinery's overhead)")
    p.set_defaults(func=run)


def quick_pair():
    """A tiny random target and a perturbed copy as draft (shares the vision tower), with a processor."""
    import torch

    from decoding.testing import make_tiny_llava, make_tiny_processor
    target = make_tiny_llava(seed=0, image_token_id=95, hidden_size=64, num_layers=2)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.model.language_model.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    return target, draft, make_tiny_processor()


def load_pair(args):
    from decoding.loading import load_llava

    from transformers import AutoProcessor
    for role in ("target", "draft"):
        if not Path(getattr(args, role), "config.json").is_file():
            raise UserError(f"--{role} {getattr(args, role)} is not a model directory; pass --{role} DIR "
                            "or use --quick for a tiny random pair")
    target = load_llava(args.target, args.dtype, args.device)
    draft = load_llava(args.draft, args.dtype, args.device)
    return target, draft, AutoProcessor.from_pretrained(args.target)


def make_inputs(processor, n: int, prompt: str | None = None):
    """n synthetic images (deterministic) through the processor, as one list of single-row encodings."""
    from PIL import Image
    from training.synthetic import make_example
    prompt = prompt or "Describe the image."
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    images = [Image.open(io.BytesIO(make_example(seed=2024, index=i)["image"])).convert("RGB") for i in range(n)]
    return text, images


def encode(processor, text, images, device, dtype):
    processor.tokenizer.padding_side = "left"
    enc = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), enc["pixel_values"].to(device, dtype)


class ForwardCounter:
    """Counts calls of a model's forward (target forwards per token for HF methods)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def close(self):
        self.handle.remove()


def run_method(method, target, draft, batches, args, eos, decoders):
    """Returns (sequences, new_tokens, target_forwards, seconds) over all batches."""
    import torch

    from decoding.stats import cut_after_eos

    seqs, forwards, t_total = [], 0, 0.0
    for ids, mask, pixels in batches:
        sync(args.device)
        t0 = time.perf_counter()
        if method in ("target_greedy", "hf_assisted"):
            counter = ForwardCounter(target)
            kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=args.max_new_tokens,
                          do_sample=False, eos_token_id=sorted(eos), pad_token_id=target.generation_config.pad_token_id)
            if method == "hf_assisted":
                kwargs["assistant_model"] = draft
            with torch.no_grad():
                out = target.generate(**kwargs)[:, ids.shape[1]:].tolist()
            counter.close()
            rows = cut_after_eos(out, eos)
            forwards += counter.count * len(rows)
        else:
            res = decoders[method].generate(ids, mask, pixels, max_new_tokens=args.max_new_tokens,
                                            eos_token_id=sorted(eos))
            rows = res.sequences
            forwards += sum(st.target_forwards for st in res.stats)
        sync(args.device)
        t_total += time.perf_counter() - t0
        seqs += rows
    return seqs, t_total, forwards


def match_rate(got, ref) -> float:
    total = sum(len(r) for r in ref)
    same = sum(1 for g, r in zip(got, ref) for a, b in zip(g, r) if a == b)
    return same / total if total else 1.0


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> int:
    import torch

    from decoding import SpeculativeDecoder, TreeConfig
    from decoding.budget import choose_tree
    from decoding.loading import parse_dtype
    from decoding.stats import mean_accepted_length

    args.device = args.device or default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.max_new_tokens, args.rounds = min(args.images, 4), min(args.max_new_tokens, 12), 1
        args.batch_sizes = args.batch_sizes if args.batch_sizes != "1,8" else "1,2"
        target, draft, processor = quick_pair()
        target, draft = target.to(args.device, parse_dtype(args.dtype)), draft.to(args.device, parse_dtype(args.dtype))
    else:
        target, draft, processor = load_pair(args)
    if args.self_draft:   # a copy, so forward hooks on the target count the target alone
        draft = copy.deepcopy(target)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown --methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    dtype = parse_dtype(args.dtype)
    eos = target.generation_config.eos_token_id
    eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    text, images = make_inputs(processor, args.images)

    static = TreeConfig(top_k=4, frontier=1, max_depth=5, max_nodes=20, threshold=0.0)
    dynamic = SpeculativeDecoder(target, draft, TreeConfig())
    budget = None
    if "dynamic_tree" in methods and not args.no_budget:
        ids, mask, pixels = encode(processor, text, images[: min(4, len(images))], args.device, dtype)
        budget = choose_tree(dynamic, ids, mask, pixels, max_new_tokens=min(args.max_new_tokens, 32))
        dynamic.set_tree(budget.tree)
        log(f"budget: max_nodes={budget.tree.max_nodes} max_depth={budget.tree.max_depth} "
            f"(verify ms by tree size: {budget.to_dict()['verify_ms']})")
    decoders = {"static_tree": SpeculativeDecoder(target, draft, static), "dynamic_tree": dynamic}

    runs = []
    for bs in batch_sizes:
        batches = [encode(processor, text, images[i:i + bs], args.device, dtype) for i in range(0, len(images), bs)]
        active = [m for m in methods if not (m == "hf_assisted" and bs > 1)]
        # warm-up: one batch per method, not timed
        for m in active:
            run_method(m, target, draft, batches[:1], args, eos, decoders)
        results = {m: [] for m in active}
        for _ in range(args.rounds):
            for m in active:
                results[m].append(run_method(m, target, draft, batches, args, eos, decoders))
        reference = results["target_greedy"][0][0] if "target_greedy" in results else None
        for m in active:
            seqs, _, forwards = results[m][0]
            tokens = sum(len(s) for s in seqs)
            tps = statistics.median(tokens / r[1] for r in results[m])
            rows = len(seqs)
            tau = mean_accepted_length(tokens, forwards, rows) or 0.0
            runs.append({"method": m, "batch_size": bs, "tokens_per_s": round(tps, 2), "mean_accepted": round(tau, 3),
                         "target_forwards_per_token": round(forwards / max(1, tokens), 4),
                         "match_rate": round(match_rate(seqs, reference), 4) if reference is not None else None})
            log(f"batch {bs:>2}  {m:<14} {tps:8.1f} tok/s  tau {tau:5.2f}  fwd/tok "
                f"{forwards / max(1, tokens):.3f}  match {runs[-1]['match_rate']}")
    report = {"device": str(args.device), "dtype": args.dtype, "runs": runs,
              "tree": {"static": vars_of(static), "dynamic": vars_of(dynamic.tree)},
              "budget": budget.to_dict() if budget else None,
              "settings": {"images": args.images, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                           "threads": torch.get_num_threads(), "quick": bool(args.quick)}}
    if args.chart:
        bench_chart(runs, args.chart)
        log(f"chart: {args.chart}")
    if args.json:
        print(json.dumps(report))
    else:
        log_speedups(runs, log)
    return 0


def vars_of(cfg) -> dict:
    """The fields of a decoding.TreeConfig."""
    return {k: getattr(cfg, k) for k in ("top_k", "frontier", "max_depth", "max_nodes", "threshold")}


def log_speedups(runs, log):
    for bs in sorted({r["batch_size"] for r in runs}):
        base = next((r for r in runs if r["batch_size"] == bs and r["method"] == "target_greedy"), None)
        if not base:
            continue
        for r in runs:
            if r["batch_size"] == bs and r["method"] != "target_greedy":
                log(f"batch {bs:>2}  {r['method']:<14} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x target greedy")


def bench_chart(runs, path, width=640, height=360):
    """Grouped bar chart of tokens/s (Pillow only)."""
    from PIL import Image, ImageDraw
    colors = {"target_greedy": (127, 127, 127), "hf_assisted": (214, 39, 40), "static_tree": (31, 119, 180),
              "dynamic_tree": (44, 160, 44)}
    sizes = sorted({r["batch_size"] for r in runs})
    top = max(r["tokens_per_s"] for r in runs) or 1
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, bottom, plot_h = 60, height - 50, height - 90
    group_w = (width - left - 20) / max(1, len(sizes))
    d.text((left, 8), "tokens/s by method and batch size (higher is better)", fill="black")
    d.line([(left, bottom), (width - 10, bottom)], fill="black")
    for gi, bs in enumerate(sizes):
        group = [r for r in runs if r["batch_size"] == bs]
        bar_w = group_w * 0.8 / max(1, len(group))
        for bi, r in enumerate(group):
            x0 = left + gi * group_w + group_w * 0.1 + bi * bar_w
            h = plot_h * r["tokens_per_s"] / top
            d.rectangle([x0, bottom - h, x0 + bar_w - 3, bottom], fill=colors[r["method"]])
            d.text((x0, bottom - h - 12), f"{r['tokens_per_s']:.0f}", fill="black")
        d.text((left + gi * group_w + group_w * 0.4, bottom + 8), f"batch {bs}", fill="black")
    for i, (m, c) in enumerate(colors.items()):
        d.rectangle([left + i * 140, height - 20, left + i * 140 + 10, height - 10], fill=c)
        d.text((left + i * 140 + 14, height - 22), m, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
