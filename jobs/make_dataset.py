"""`specllava make-dataset`: write deterministic synthetic captioning shards (see training/synthetic.py).

    specllava make-dataset --num-images 1000 --shard-size 250 --output data/synth [--seed 0]
    specllava make-dataset ... --output s3://bucket/synth --s3-endpoint http://127.0.0.1:5000

Output: `shard-00000.parquet`, ... with columns id, image (PNG bytes), width, height, count,
shape, color, size, position, background, caption, boxes. Existing shards are kept (reruns resume).
"""
from __future__ import annotations

import argparse
import sys
import time

from jobs.common import POSITIVE_INT, UserError, number


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("make-dataset", help="write synthetic shapes-and-captions Parquet shards",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=POSITIVE_INT, required=True)
    p.add_argument("--shard-size", type=POSITIVE_INT, default=1000)
    p.add_argument("--output", required=True, help="local directory or s3://bucket/prefix")
    p.add_argument("--seed", type=int, default=0, help="different seeds give disjoint ids and images")
    p.add_argument("--image-size", type=number(int, 32, 1024), default=64, help="side of the square images in pixels")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint, e.g. http://127.0.0.1:5000")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from training.synthetic import write_shards
    from workers.storage import resolve

    if args.num_images < 1 or args.shard_size < 1:
        raise UserError("--num-images and --shard-size must be >= 1")
    if not 32 <= args.image_size <= 1024:
        raise UserError("--image-size must be between 32 and 1024")
    start = time.time()
    try:
        fs, root = resolve(args.output, args.s3_endpoint)
        paths = write_shards(args.num_images, args.shard_size, root, seed=args.seed,
                             side=args.image_size, filesystem=fs, progress=not args.quiet)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot write {args.output}: {exc}") from exc
    print(f"wrote {args.num_images} images in {len(paths)} shards to {args.output} "
          f"({time.time() - start:.1f}s)", file=sys.stderr)
    return 0
