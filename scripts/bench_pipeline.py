"""Pipeline benchmarks (not tests): results go to docs/benchmarks.md, "## Pipeline".

    python scripts/bench_pipeline.py loop-vs-pipeline --rows 256 --batch-size 8 [--hidden 64 --layers 2]
    (the 10M-row scale benchmark is scripts/bench_scale.py)

loop-vs-pipeline: the same CaptionWorker on the same images, (a) in a plain in-process loop
(Preprocessor then CaptionWorker, batch by batch; model load excluded) and (b) through the
Ray Data pipeline with one caption actor (local input/output; wall time of the Ray execution,
actor start and model load included). Reports images/s of both and the ratio, and the
pipeline's steady state: rows committed after the first output file / time from the first to
the last output file (startup of Ray workers and model loading excluded).

"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.layout import DATA_DIR  # noqa: E402


def init_ray():
    import ray
    import ray.data
    ray.init(num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def loop_vs_pipeline(args) -> dict:
    from decoding.testing import save_tiny_pair
    from pipeline.config import CaptionConfig
    from pipeline.run import run_caption
    from tests.pipeline_helpers import png_bytes
    from workers.caption import CaptionWorker
    from workers.preprocess import Preprocessor

    work = tempfile.mkdtemp(prefix="bench-pipe-")
    target, draft = (args.target, args.draft) if args.target else save_tiny_pair(
        os.path.join(work, "pair"), hidden_size=args.hidden, num_layers=args.layers)
    target, draft = str(target), str(draft)
    os.makedirs(os.path.join(work, "in"))
    per_shard = args.rows // 4
    ids = [f"{s}-{i}" for s in range(4) for i in range(per_shard)]
    images = {k: png_bytes(n, args.image_size) for n, k in enumerate(ids)}
    for s in range(4):
        keys = ids[s * per_shard:(s + 1) * per_shard]
        pq.write_table(pa.table({"id": keys, "image": [images[k] for k in keys]}),
                       os.path.join(work, "in", f"{s}.parquet"))

    pre = Preprocessor(target)
    worker = CaptionWorker(target, draft, max_new_tokens=args.max_new_tokens, torch_threads=1)
    start = time.perf_counter()
    for i in range(0, len(ids), args.batch_size):
        keys = ids[i:i + args.batch_size]
        worker.caption(pre(pa.table({"id": keys, "image": [images[k] for k in keys]})))
    loop_s = time.perf_counter() - start
    del worker

    init_ray()
    config = CaptionConfig(input=os.path.join(work, "in"), output=os.path.join(work, "out"), target=target,
                           draft=draft, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           cpus_per_actor=1.0, stage_cpus=0.25)
    summary = run_caption(config)
    pipe_s = summary["run"]["wall_s"]
    steady = steady_state(os.path.join(work, "out", DATA_DIR))
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": len(ids), "batch_size": args.batch_size, "hidden": args.hidden, "layers": args.layers,
            "loop_s": round(loop_s, 2), "loop_images_per_s": round(len(ids) / loop_s, 2),
            "pipeline_s": pipe_s, "pipeline_images_per_s": round(len(ids) / pipe_s, 2),
            "ratio": round(loop_s / pipe_s, 3), "status": summary["status"],
            "pipeline_steady_images_per_s": steady,
            "steady_ratio": round(steady / (len(ids) / loop_s), 3) if steady else None}


def steady_state(data_dir: str) -> float | None:
    """Images/s between the first and the last committed output file (startup excluded)."""
    files = sorted((os.path.getmtime(os.path.join(data_dir, f)), os.path.join(data_dir, f))
                   for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if len(files) < 3:
        return None
    rows = sum(pq.ParquetFile(path).metadata.num_rows for _, path in files[1:])
    span = files[-1][0] - files[0][0]
    return round(rows / span, 2) if span > 0 else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("loop-vs-pipeline")
    a.add_argument("--rows", type=int, default=256)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--max-new-tokens", type=int, default=16)
    a.add_argument("--hidden", type=int, default=64)
    a.add_argument("--layers", type=int, default=2)
    a.add_argument("--image-size", type=int, default=16)
    a.add_argument("--target")
    a.add_argument("--draft")
    args = parser.parse_args()
    result = loop_vs_pipeline(args)
    print(json.dumps({"bench": args.cmd, **result}))


if __name__ == "__main__":
    main()
