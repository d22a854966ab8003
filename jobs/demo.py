"""`specllava demo`: the whole system on this machine, no downloads, a few minutes on 2 cores.

1. writes a small synthetic dataset (Parquet shards of PNG images) to a local folder;
2. captions it with the Ray Data pipeline on a local Ray, using the demo pair
   (assets/demo-pair: a small trained target + its distilled draft) and the speculative decoder;
3. prints the run summary, a few captions next to their reference, and the next commands to try.
Running it again resumes: only rows missing from the output are decoded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import COUNT, DEMO_PAIR, DEMO_PAIR_DIR, POSITIVE_INT, UserError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="make a synthetic dataset and caption it with the demo pair (local Ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="specllava-demo", help="folder for the dataset and captions "
                   "(default ./specllava-demo)")
    p.add_argument("--num-images", type=POSITIVE_INT, default=96, help="images to caption (default 96)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=24, help="rows per input shard (default 24)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="rows per decoder batch (default 8)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32)
    p.add_argument("--target", default=str(DEMO_PAIR / "target"))
    p.add_argument("--draft", default=str(DEMO_PAIR / "draft"))
    p.add_argument("--show", type=COUNT, default=5, help="captions to print (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from training.synthetic import write_shards
    from pipeline.config import CaptionConfig, PipelineError
    from pipeline.run import run_caption

    if args.num_images < 1 or args.shard_size < 1:
        raise UserError("--num-images and --shard-size must be >= 1")
    for role in ("target", "draft"):
        if not (Path(getattr(args, role)) / "config.json").is_file():
            raise UserError(f"--{role} {getattr(args, role)} is not a model directory (the demo pair ships in "
                            f"{DEMO_PAIR_DIR}; pass --target/--draft to use another pair)")
    work = Path(args.workdir).resolve()
    data, output = work / "images", work / "captions"
    print(f"[1/3] writing {args.num_images} synthetic images to {data}")
    write_shards(args.num_images, args.shard_size, str(data), seed=0)
    print(f"[2/3] captioning with the demo pair on a local Ray -> {output}")
    config = CaptionConfig(input=str(data), output=str(output), target=args.target, draft=args.draft,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    try:
        summary = run_caption(config, progress_every=0.0 if sys.stdout.isatty() else 10.0,
                              progress_tty=sys.stdout.isatty(), verbose=False)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    print("[3/3] a few captions (reference | speculative caption):")
    show_captions(data, output, args.show)
    print("summary:", json.dumps({"status": summary["status"], "this_run": summary["run"],
                                  "table": summary["counts"]}))
    print(f"""
next:
  specllava stats {output} --plot accepted.png
  specllava query {output} "SELECT id, caption, mean_accepted FROM captions ORDER BY id LIMIT 5"
  specllava resume {output}      # continue an interrupted run from its _run.json
  specllava caption --input {data} --output /tmp/more   # the pipeline on your shards (s3:// too)
  specllava bench                # speed vs target greedy and HF assisted generation
  ray start --head --num-cpus 4 && specllava submit --input {data} --output /tmp/job-out   # as a Ray job
""")
    return 0 if summary["status"] == "finished" else 1


def show_captions(data: Path, output: Path, n: int) -> None:
    import pyarrow.dataset as ds
    refs = {r["id"]: r["caption"] for r in ds.dataset(str(data), format="parquet")
            .to_table(columns=["id", "caption"]).to_pylist()}
    from pipeline.layout import DATA_DIR

    rows = ds.dataset(str(output / DATA_DIR), format="parquet").to_table(
        columns=["id", "caption", "status", "mean_accepted"]).to_pylist()
    for row in sorted(rows, key=lambda r: r["id"])[:n]:
        got = row["caption"] if row["status"] == "ok" else f"[{row['status']}]"
        tau = f"  (tau {row['mean_accepted']:.2f})" if row["mean_accepted"] is not None else ""
        print(f"  {row['id']}: {refs.get(row['id'], '?')} | {got}{tau}")
