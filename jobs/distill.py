"""`specllava distill`: train a small draft LLaVA on a target's own outputs (Spec-LLaVA style).

    specllava distill --target assets/demo-pair/target --images runs/data/distill \
        --output assets/demo-pair/draft [--layers 1 --hidden 128 --heads 2 --steps 1500 ...]

The training itself is `training.distill` (its docstring is the contract): this command reads
the images (local or s3://), builds a `DistillConfig` from the flags, and prints the held-out
statistics. Rerun the same command to resume from `<work-dir>/checkpoint`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from jobs.common import COUNT, POSITIVE, POSITIVE_INT, UserError, add_dtype_argument, default_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="distill a small draft LLaVA from a target",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target model directory (save_pretrained, safetensors)")
    p.add_argument("--images", required=True, help="Parquet shards with an `image` bytes column (dir or s3://)")
    p.add_argument("--output", required=True, help="where the draft (and its processor) is saved")
    p.add_argument("--work-dir", default=None, help="teacher cache + checkpoints (default: OUTPUT-work)")
    p.add_argument("--layers", type=POSITIVE_INT, default=1)
    p.add_argument("--hidden", type=POSITIVE_INT, default=128)
    p.add_argument("--heads", type=POSITIVE_INT, default=2)
    p.add_argument("--intermediate", type=POSITIVE_INT, default=None, help="MLP width (default 3 * hidden)")
    p.add_argument("--steps", type=POSITIVE_INT, default=1500)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=COUNT, default=50)
    p.add_argument("--max-images", type=POSITIVE_INT, default=None, help="use at most this many rows of --images")
    p.add_argument("--heldout-images", type=COUNT, default=200)
    p.add_argument("--prompt", default=None, help="user prompt (default: the demo's 'describe the image .')")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="teacher captions run to --max-new-tokens past EOS "
                   "(train for what `bench --ignore-eos` decodes)")
    p.add_argument("--tie-embeddings", action="store_true", help="the draft's lm_head is its input embeddings")
    p.add_argument("--embed-init", choices=("random", "pca"), default="random",
                   help="pca: start the draft's embeddings from the target's top principal components")
    p.add_argument("--topk", type=POSITIVE_INT, default=64, help="target log-probs kept per position")
    p.add_argument("--text-only", action="store_true", help="train a text-only draft (a LlamaForCausalLM-style "
                   "model of the target's text kind, no vision tower): it drafts from the prompt's text alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_dtype_argument(p, "--teacher-dtype", default="float32")
    add_dtype_argument(p, "--save-dtype", default="float16")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=100)
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from training import synthetic
    from training.distill import DistillConfig, DistillError, check_target, distill
    from workers.storage import resolve

    try:
        check_target(args.target)  # the cheap checks first, before any image is read
    except DistillError as exc:
        raise UserError(str(exc)) from None
    if args.steps < 1 or args.batch_size < 1 or args.heldout_images < 0:
        raise UserError("--steps and --batch-size must be >= 1, --heldout-images >= 0")
    try:
        fs, path = resolve(args.images, args.s3_endpoint)
        table = synthetic.read_rows(path, fs, limit=args.max_images)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --images {args.images}: {exc}") from exc
    if "image" not in table.column_names:
        raise UserError(f"--images {args.images} has no `image` column")
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["device"] = args.device or default_device()
    config = DistillConfig(**options, images_label=args.images)
    try:
        stats = distill(config, table.column("image").to_pylist())
    except DistillError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps({k: v for k, v in stats.items() if k != "history"}, indent=1))
    return 0
