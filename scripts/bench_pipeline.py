"""Pipeline benchmarks (not tests): results go to docs/benchmarks.md, "## Pipeline".

    python scripts/bench_pipeline.py loop-vs-pipeline --rows 256 --batch-size 8 [--hidden 64 --layers 2]
    python scripts/bench_pipeline.py scale --rows 1000000 --batch-size 10000

loop-vs-pipeline: the same CaptionWorker on the same images, (a) in a plain in-process loop
(Preprocessor then CaptionWorker, batch by batch; model load excluded) and (b) through the
Ray Data pipeline with one caption actor (local input/output; wall time of the Ray execution,
actor start and model load included). Reports images/s of both and the ratio, and the
pipeline's steady state: rows committed after the first output file / time from the first to
the last output file (startup of Ray workers and model loading excluded).

scale: N rows of (id, 16-byte image) through read → checkpoint filter → passthrough worker
(no model) → write with Ray Data checkpointing; then the same run again on the finished
output (every id checkpointed), timing the checkpoint load and the filter. Reports per-row
overhead, peak driver RSS and peak RSS summed over Ray worker processes (sampled from /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.layout import CHECKPOINT_DIR, DATA_DIR  # noqa: E402


class RayMemorySampler(threading.Thread):
    """Peak summed RSS of processes whose command line names a Ray worker, every `period` s."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.peak_sum = 0
        self.peak_single = 0
        self._halt = threading.Event()

    @staticmethod
    def _rss_of_workers() -> list[int]:
        sizes = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read()
                if b"ray::" not in cmd and b"default_worker.py" not in cmd:
                    continue
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            sizes.append(int(line.split()[1]) * 1024)
            except OSError:
                continue
        return sizes

    def run(self):
        while not self._halt.is_set():
            sizes = self._rss_of_workers()
            self.peak_sum = max(self.peak_sum, sum(sizes))
            self.peak_single = max([self.peak_single, *sizes])
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()


def driver_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        worker(pre(pa.table({"id": keys, "image": [images[k] for k in keys]})))
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


class Passthrough:
    """A worker without a model: one output-schema row per input row."""

    def __init__(self, id_column: str = "id"):
        self.id_column = id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        from workers.schema import OUTPUT_FIELDS, output_schema

        n = batch.num_rows
        ids = batch.column(self.id_column).combine_chunks()
        cols = [ids]
        for f in OUTPUT_FIELDS:
            if f.name == "status":
                cols.append(pa.array(["ok"] * n, f.type))
            else:
                cols.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(cols, schema=output_schema(self.id_column, ids.type))


def scale(args) -> dict:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig
    from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager

    from pipeline.config import CaptionConfig
    from pipeline.run import execute

    work = tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(os.path.join(work, "in"))
    shards = args.shards
    per = args.rows // shards
    t = time.perf_counter()
    for s in range(shards):
        pq.write_table(pa.table({"id": pa.array([f"img-{s:03d}-{i:07d}" for i in range(per)]),
                                 "image": pa.array([b"0123456789abcdef"] * per, pa.binary())}),
                       os.path.join(work, "in", f"{s:03d}.parquet"))
    gen_s = time.perf_counter() - t
    init_ray()
    fs = pa.fs.LocalFileSystem()
    out = os.path.join(work, "out")
    config = CaptionConfig(input=os.path.join(work, "in"), output=out, target="-", draft="-",
                           batch_size=args.batch_size, stage_cpus=0.25, cpus_per_actor=0.5)
    files = sorted(os.path.join(work, "in", f) for f in os.listdir(os.path.join(work, "in")))

    def build():
        ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=0.25).select_columns(["id", "image"])
        ds = ds.repartition(target_num_rows_per_block=args.batch_size)
        return ds.map_batches(Passthrough, batch_format="pyarrow", batch_size=args.batch_size,
                              compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)

    results = {"rows": per * shards, "shards": shards, "batch_size": args.batch_size, "generate_input_s": round(gen_s, 1)}
    for label in ("first_run", "rerun_all_checkpointed"):
        sampler = RayMemorySampler()
        sampler.start()
        t = time.perf_counter()
        execute(build, config, fs, os.path.join(out, DATA_DIR), os.path.join(out, CHECKPOINT_DIR))
        wall = time.perf_counter() - t
        sampler.stop()
        results[label] = {"wall_s": round(wall, 1), "per_row_us": round(1e6 * wall / results["rows"], 2),
                          "ray_workers_peak_rss_sum_mb": round(sampler.peak_sum / 2**20),
                          "ray_worker_peak_rss_single_mb": round(sampler.peak_single / 2**20),
                          "driver_peak_rss_mb": round(driver_peak_rss() / 2**20)}
        print(label, results[label], flush=True)
    written = pq.ParquetDataset(os.path.join(out, DATA_DIR)).read(columns=["id"])
    results["output_rows"] = written.num_rows
    results["output_unique"] = len(set(written.column("id").to_pylist()))
    ckpt = CheckpointConfig(id_column="id", checkpoint_path=os.path.join(out, CHECKPOINT_DIR),
                            delete_checkpoint_on_success=False, override_filesystem=fs)
    t = time.perf_counter()
    ref, size = IdColumnCheckpointManager(checkpoint_config=ckpt,
                                          data_context=ray.data.DataContext.get_current()).load_checkpoint()
    ray.get(ref)
    results["checkpoint_load_s"] = round(time.perf_counter() - t, 2)
    results["checkpoint_ids_bytes"] = size
    shutil.rmtree(work, ignore_errors=True)
    return results


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
    b = sub.add_parser("scale")
    b.add_argument("--rows", type=int, default=1_000_000)
    b.add_argument("--shards", type=int, default=20)
    b.add_argument("--batch-size", type=int, default=10_000)
    args = parser.parse_args()
    result = loop_vs_pipeline(args) if args.cmd == "loop-vs-pipeline" else scale(args)
    print(json.dumps({"bench": args.cmd, **result}))


if __name__ == "__main__":
    main()
