"""`specllava bench`: the decoder's speed, measured side by side in one process.

On the same images and prompt, in one process, methods are interleaved round after round
(so machine noise hits all of them alike) and the median round is reported:
  target_greedy  HF `generate(do_sample=False)` on the target alone (the reference output);
  hf_assisted    HF assisted generation with the same draft (a chain; batch 1 only, HF raises above);
  static_tree    our decoder with a fixed-shape tree (top-k siblings along the draft's greedy chain);
  dynamic_tree   our decoder with the dynamic tree; its shape per active batch size (or no drafting
                 where a tree cannot pay) is measured on this device first, unless --no-budget;
  plain_engine   this engine on the target alone (plain decoding on its KV pool, no draft prefill or draft
                 pool; compiled with --compile on);
  hf_static      (opt-in) HF generate with a static cache and a compiled forward (transformers' route).
  dynamic_stream, plain_stream
                 (opt-in) dynamic_tree's and plain_engine's decoders with continuous batching, as
                 caption actors run: all the rows of a batch size's batches stream through one
                 engine of that many slots, a row joining as soon as another finishes. A batch
                 decoded alone (the other methods) waits for its slowest row at the end; with a tree
                 rows advance at different speeds, so that tail is speculation's (docs/benchmarks.md).
Speculative methods are reported against target greedy and against the best plain decoder at each
batch size (`vs_best_plain`: target_greedy, hf_static, plain_engine; the JSON names which won).
Per method and batch size: tokens/s, mean accepted length tau (decoding.stats.mean_accepted_length),
target forwards per token, and token match rate against target_greedy.

Offline annotation runs each method at the batch size that gives it the most throughput, so the
figure a user decides on is best against best: per method, its best tokens/s over the batch sizes
and where (`best`), and each method's best over target greedy's best (`speedup_best_vs_best`).
Every batch size decodes the same images, so --images is at least the largest batch size (by
default exactly that); a smaller --images is refused, as its "batch 128" would hold fewer rows.

    specllava bench                 # demo pair, batch 1, 8, 32, 128 on 128 images, table + PNG chart
    specllava bench --json          # exactly one JSON object on stdout
    specllava bench --quick         # tiny random pair built in code (seconds; used by tests)
    specllava bench --target "$(specllava make-pair smollm2)" --draft assets/smollm2-pair/draft \
        --prompt "Describe this image in detail." --max-new-tokens 128 --ignore-eos --max-batches 2
                                    # the real-weights pair (docs/benchmarks.md), 128 tokens per row

--ignore-eos makes every row decode exactly --max-new-tokens tokens (EOS is decoded like any
other token, by every method alike), so rows are as long as asked; --max-batches N decodes only
the first N batches at each batch size, which keeps batch 1 affordable at 128 tokens per row.
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

from jobs.common import DEMO_PAIR, POSITIVE_INT, UserError, add_dtype_argument, default_device

# torch and the decoder are imported inside the functions that use them: `specllava --help`
# builds this parser too, and must not pay for a torch import.
METHODS = ("target_greedy", "hf_assisted", "static_tree", "dynamic_tree", "plain_engine", "hf_static",
           "dynamic_stream", "plain_stream")
# Continuous batching (opt-in): the decoder of the named method, every row of the batch size's
# batches streamed through one engine with batch-size slots (SpeculativeDecoder.generate_stream).
STREAM_METHODS = {"dynamic_stream": "dynamic_tree", "plain_stream": "plain_engine"}
DEFAULT_METHODS = ("target_greedy", "hf_assisted", "static_tree", "dynamic_tree", "plain_engine")
# Plain (non-speculative) decoders: what speculation is also compared against, at each batch size
# (target_greedy = HF generate with its dynamic cache; hf_static = HF generate with a static cache
# and a compiled forward, transformers' documented fast route; plain_engine = this engine without drafting).
PLAIN_METHODS = ("target_greedy", "hf_static", "plain_engine", "plain_stream")
HF_METHODS = ("target_greedy", "hf_assisted", "hf_static")
BASELINE = "target_greedy"
DEFAULT_BATCH_SIZES = "1,8,32,128"
QUICK_BATCH_SIZES = "1,2"
QUICK_IMAGES = 4
DEFAULT_PROMPT = "Describe the image."
WARMUP_TOKENS = 16   # the untimed warm-up batch per method decodes at most this many tokens


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark target greedy vs HF assisted vs our static/dynamic tree",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(DEMO_PAIR / "target"), help="target model dir (default: demo pair)")
    p.add_argument("--draft", default=str(DEMO_PAIR / "draft"), help="draft model dir (default: demo pair)")
    p.add_argument("--images", type=POSITIVE_INT, default=None, help="synthetic images, the same ones decoded "
                   "at every batch size; at least the largest batch size (default: the largest batch size; "
                   f"{QUICK_IMAGES} with --quick)")
    p.add_argument("--batch-sizes", default=None, help=f"comma-separated batch sizes (default {DEFAULT_BATCH_SIZES}; "
                   f"{QUICK_BATCH_SIZES} with --quick)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=48)
    p.add_argument("--ignore-eos", action="store_true", help="every row decodes exactly --max-new-tokens tokens "
                   "(EOS is a token like any other, as throughput benchmarks do); all methods alike")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"user prompt next to the image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-batches", type=POSITIVE_INT, default=None, help="decode at most this many batches per "
                   "batch size (default: all of --images); e.g. 4 keeps batch 1 short at 128 tokens per row")
    p.add_argument("--rounds", type=POSITIVE_INT, default=3,
                   help="interleaved rounds; the median is reported (default 3)")
    add_dtype_argument(p, default="float32")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)}; hf_static compiles "
                        "the target's forward per batch size, minutes on a CPU)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="our engine's step graphs (decoding/graphs.py): on = static shapes, torch.compile "
                        "(CUDA graphs on CUDA); off = op by op; auto (default) = on for CUDA, off on a CPU. The "
                        "untimed warm-up batch compiles; its seconds are reported as warmup_s")
    p.add_argument("--no-budget", action="store_true", help="use the default TreeConfig for dynamic_tree "
                   "instead of measuring a budget on this device")
    p.add_argument("--chart", default="bench.png", help="PNG chart path ('' to skip; default bench.png)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object and nothing else")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny random pair built in code, {QUICK_IMAGES} images, 12 tokens, 1 round")
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
    from decoding.loading import load_model

    from transformers import AutoProcessor
    for role in ("target", "draft"):
        if not Path(getattr(args, role), "config.json").is_file():
            raise UserError(f"--{role} {getattr(args, role)} is not a model directory; pass --{role} DIR "
                            "or use --quick for a tiny random pair")
    target = load_model(args.target, args.dtype, args.device)
    if target.config.model_type != "llava":
        raise UserError(f"--target {args.target} is a {type(target).__name__}: bench decodes llava-1.5-kind targets "
                        "(LlavaForConditionalGeneration) so far; caption and the library take NeXT and OneVision")
    draft = load_model(args.draft, args.dtype, args.device)
    return target, draft, AutoProcessor.from_pretrained(args.target)


def make_inputs(processor, n: int, prompt: str | None = None):
    """(chat text, n synthetic PIL images): the prompt through the processor's chat template."""
    from PIL import Image
    from training.synthetic import make_example
    prompt = prompt or DEFAULT_PROMPT
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


def run_method(method, target, draft, batches, args, eos, decoders, max_new_tokens=None):
    """Returns (sequences, seconds, target_forwards) over all batches. An empty `eos` decodes
    every row to `max_new_tokens` (default args.max_new_tokens)."""
    import torch

    from decoding.stats import cut_after_eos

    max_new_tokens = max_new_tokens or args.max_new_tokens
    if method in STREAM_METHODS:   # every batch's rows through one engine of batch-size slots
        sync(args.device)
        t0 = time.perf_counter()
        res = decoders[STREAM_METHODS[method]].generate_stream(batches, batches[0][0].shape[0], max_new_tokens,
                                                               eos_token_id=sorted(eos))
        sync(args.device)
        return res.sequences, time.perf_counter() - t0, sum(st.target_forwards for st in res.stats)
    seqs, forwards, t_total = [], 0, 0.0
    for ids, mask, pixels in batches:
        sync(args.device)
        t0 = time.perf_counter()
        if method in HF_METHODS:
            counter = ForwardCounter(target)
            kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=sorted(eos), pad_token_id=target.generation_config.pad_token_id)
            if method == "hf_assisted":
                kwargs["assistant_model"] = draft
            if method == "hf_static":   # transformers' route: a static cache, the decode forward compiled
                from transformers import CompileConfig

                config = CompileConfig(mode="reduce-overhead" if torch.device(args.device).type == "cuda" else "default")
                config._compile_all_devices = True      # transformers compiles on CUDA only unless told
                kwargs.update(cache_implementation="static", compile_config=config)
            with torch.no_grad():
                out = target.generate(**kwargs)[:, ids.shape[1]:].tolist()
            counter.close()
            rows = cut_after_eos(out, eos)
            forwards += counter.count * len(rows)
        else:
            res = decoders[method].generate(ids, mask, pixels, max_new_tokens=max_new_tokens,
                                            eos_token_id=sorted(eos))
            rows = res.sequences
            forwards += sum(st.target_forwards for st in res.stats)
        sync(args.device)
        t_total += time.perf_counter() - t0
        seqs += rows
    return seqs, t_total, forwards


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: positive integers, ascending, each once; a UserError otherwise."""
    try:
        sizes = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def resolve_images(images: int | None, batch_sizes: list[int], quick: bool = False) -> int:
    """How many synthetic images to decode at every batch size: by default enough for the largest
    batch size. An explicit number below it is refused rather than raised: the user asked for that
    many, and a batch labelled 128 that holds 16 rows would report batch-16 throughput as batch 128."""
    largest = max(batch_sizes)
    if images is None:
        return max(largest, QUICK_IMAGES) if quick else largest
    if images < largest:
        raise UserError(f"--images {images} is smaller than the largest --batch-sizes {largest}: that batch would "
                        f"hold only {images} rows; pass --images {largest} or more, or leave --images out")
    return images


def best_per_method(runs: list[dict]) -> list[dict]:
    """Per method, in order of first appearance: the run row with the most tokens/s, as
    {"method", "batch_size", "tokens_per_s"}. A method measured at fewer batch sizes (hf_assisted
    runs at batch 1 only) is best over those it has. Ties go to the smaller batch size: the same
    throughput for less memory and less latency per row."""
    best: dict[str, dict] = {}
    for r in runs:
        b = best.get(r["method"])
        key = (r["tokens_per_s"], -r["batch_size"])
        if b is None or key > (b["tokens_per_s"], -b["batch_size"]):
            best[r["method"]] = {k: r[k] for k in ("method", "batch_size", "tokens_per_s")}
    return list(best.values())


def speedup_best_vs_best(best: list[dict], baseline: str = BASELINE) -> dict[str, float]:
    """{method: its best tokens/s / the baseline's best tokens/s} for every method but the baseline,
    each at its own best batch size; empty when the baseline was not run."""
    base = next((b for b in best if b["method"] == baseline), None)
    if base is None or base["tokens_per_s"] <= 0:
        return {}
    return {b["method"]: round(b["tokens_per_s"] / base["tokens_per_s"], 3) for b in best if b["method"] != baseline}


def best_lines(best: list[dict], speedups: dict[str, float], baseline: str = BASELINE,
               runs: list[dict] | None = None) -> list[str]:
    """The table's `best` lines: one per method, with its speedup over the baseline's best, or
    "no drafting" where that method's best run was one in which the budget chose not to draft."""
    plain = {(r["method"], r["batch_size"]) for r in runs or [] if r.get("drafting") is False
             and r["method"] != baseline and not r.get("plain")}
    lines = []
    for b in best:
        line = f"best {b['method']:<14} {b['tokens_per_s']:8.1f} tok/s at batch {b['batch_size']}"
        if (b["method"], b["batch_size"]) in plain:
            line += "  no drafting there (the budget chose plain target steps)"
        elif b["method"] in speedups:
            line += f"  {speedups[b['method']]:.2f}x {baseline}'s best"
        lines.append(line)
    return lines


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
    from decoding.budget import BudgetEntry, BudgetTable, calibration_tokens, choose_table
    from decoding.loading import parse_dtype
    from decoding.stats import mean_accepted_length
    from jobs.charts import bench_chart

    # arguments first, so a mistake is reported before any model is loaded
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown --methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    batch_sizes = parse_batch_sizes(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES))
    args.images = resolve_images(args.images, batch_sizes, args.quick)
    args.device = args.device or default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.max_new_tokens, args.rounds = min(args.max_new_tokens, 12), 1
        target, draft, processor = quick_pair()
        target, draft = target.to(args.device, parse_dtype(args.dtype)), draft.to(args.device, parse_dtype(args.dtype))
    else:
        target, draft, processor = load_pair(args)
    if args.self_draft:   # a copy, so forward hooks on the target count the target alone
        draft = copy.deepcopy(target)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    dtype = parse_dtype(args.dtype)
    eos = target.generation_config.eos_token_id
    eos = set() if eos is None or args.ignore_eos else ({eos} if isinstance(eos, int) else set(eos))
    text, images = make_inputs(processor, args.images, args.prompt)

    static = TreeConfig(top_k=4, frontier=1, max_depth=5, max_nodes=20, threshold=0.0)
    dynamic = SpeculativeDecoder(target, draft, TreeConfig(), compile=args.compile)
    budget, budget_s = None, 0.0
    if {"dynamic_tree", "dynamic_stream"} & set(methods) and not args.no_budget:
        ids, mask, pixels = encode(processor, text, images[: min(8, len(images))], args.device, dtype)
        t0 = time.perf_counter()
        budget = choose_table(dynamic, ids, mask, pixels, batch_sizes=batch_sizes,
                              max_new_tokens=calibration_tokens(args.max_new_tokens), eos_token_id=eos)
        budget_s = time.perf_counter() - t0
        log(f"budget measured in {budget_s:.1f} s" + (" (compiling the step graphs of every candidate shape)"
                                                       if dynamic.graphs is not None and dynamic.graphs.mode else ""))
        dynamic.budget = budget
        for entry in budget.entries:
            shape = "no drafting" if entry.tree is None else (f"max_nodes={entry.tree.max_nodes} "
                                                              f"max_depth={entry.tree.max_depth}")
            log(f"budget at batch >= {entry.batch_size}: {shape} (step ms: "
                f"{ {k: round(v * 1e3, 1) for k, v in entry.step_s.items()} })")
    plain = SpeculativeDecoder(target, draft, TreeConfig(), compile=args.compile)
    plain.budget = BudgetTable(entries=[BudgetEntry(batch_size=1, tree=None)])    # never drafts
    decoders = {"static_tree": SpeculativeDecoder(target, draft, static, compile=args.compile),
                "dynamic_tree": dynamic, "plain_engine": plain}

    runs = []
    for bs in batch_sizes:
        batches = [encode(processor, text, images[i:i + bs], args.device, dtype)
                   for i in range(0, len(images), bs)][:args.max_batches]
        active = [m for m in methods if not (m == "hf_assisted" and bs > 1)]
        # warm-up: one short batch per method, not timed (with --compile on it compiles the step graphs;
        # hf_static compiles its forward): its seconds are reported as warmup_s
        warmup = {}
        for m in active:
            t0 = time.perf_counter()
            run_method(m, target, draft, batches[:1], args, eos, decoders, min(args.max_new_tokens, WARMUP_TOKENS))
            warmup[m] = time.perf_counter() - t0
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
            drafting = m not in PLAIN_METHODS and not (m in ("dynamic_tree", "dynamic_stream") and budget
                                                        and budget.lookup(bs) is None)
            runs.append({"method": m, "batch_size": bs, "rows": rows, "tokens": tokens, "drafting": drafting,
                         "plain": m in PLAIN_METHODS, "warmup_s": round(warmup[m], 2),
                         "wall_s": round(warmup[m] + sum(r[1] for r in results[m]), 2),
                         "tokens_per_s": round(tps, 2), "mean_accepted": round(tau, 3),
                         "target_forwards_per_token": round(forwards / max(1, tokens), 4),
                         "match_rate": round(match_rate(seqs, reference), 4) if reference is not None else None})
            log(f"batch {bs:>3}  {m:<14} {tps:8.1f} tok/s  tau {tau:5.2f}  fwd/tok "
                f"{forwards / max(1, tokens):.3f}  match {runs[-1]['match_rate']}  ({rows} rows, {tokens} tokens)")
    best = best_per_method(runs)
    speedups = speedup_best_vs_best(best)
    report = {"device": str(args.device), "dtype": args.dtype, "runs": runs,
              "best": best, "speedup_best_vs_best": speedups,
              "vs_best_plain": vs_best_plain(runs), "compile": args.compile, "budget_s": round(budget_s, 1),
              "tree": {"static": vars_of(static), "dynamic": vars_of(dynamic.tree)},
              "budget": budget.to_dict() if budget else None,
              "settings": {"images": args.images, "batch_sizes": batch_sizes, "max_new_tokens": args.max_new_tokens,
                           "ignore_eos": bool(args.ignore_eos), "prompt": args.prompt, "max_batches": args.max_batches,
                           "rounds": args.rounds, "threads": torch.get_num_threads(), "quick": bool(args.quick),
                           "compile": args.compile}}
    if args.chart:
        bench_chart(runs, best, speedups, args.chart)
        log(f"chart: {args.chart}")
    if not args.json:
        log_speedups(runs, log)
        for row in report["vs_best_plain"]:
            log(f"batch {row['batch_size']:>3}  {row['method']:<14} {row['speedup']:.2f}x the best plain decoder "
                f"here ({row['plain_method']}, {row['plain_tokens_per_s']:.1f} tok/s)")
    for line in best_lines(best, speedups, runs=runs):
        log(line)
    if args.json:
        print(json.dumps(report))
    return 0


def vs_best_plain(runs: list[dict]) -> list[dict]:
    """Per batch size and speculative method: its tokens/s over the fastest plain decoder measured
    at that batch size (PLAIN_METHODS), named in `plain_method`; speculation must beat the best
    non-speculative decoder a user could run, not only HF's default generate."""
    out = []
    for bs in sorted({r["batch_size"] for r in runs}):
        here = [r for r in runs if r["batch_size"] == bs]
        plain = [r for r in here if r["method"] in PLAIN_METHODS]
        if not plain:
            continue
        best = max(plain, key=lambda r: r["tokens_per_s"])
        for r in here:
            if r["method"] not in PLAIN_METHODS:
                out.append({"batch_size": bs, "method": r["method"], "drafting": r.get("drafting"),
                            "speedup": round(r["tokens_per_s"] / best["tokens_per_s"], 3),
                            "plain_method": best["method"], "plain_tokens_per_s": best["tokens_per_s"]})
    return out


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
                if r.get("drafting") is False:
                    log(f"batch {bs:>3}  {r['method']:<14} no drafting (the budget chose plain target steps here)")
                else:
                    log(f"batch {bs:>3}  {r['method']:<14} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                        "target greedy")
