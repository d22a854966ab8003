"""Pipeline benchmarks (not tests): results go to docs/benchmarks.md, "## Pipeline".

    python scripts/bench_pipeline.py loop-vs-pipeline --rows 256 --batch-size 8 [--hidden 64 --layers 2]
    python scripts/bench_pipeline.py continuous --pair mixed --rows 256 --batch-size 8 --max-new-tokens 96
    python scripts/bench_pipeline.py continuous --pair demo --rows 256 --batch-size 8
    python scripts/bench_pipeline.py join-cost --pair demo --rows 64 --batch-size 8
    (the 10M-row scale benchmark is scripts/bench_scale.py)

loop-vs-pipeline: the same CaptionWorker on the same images, (a) in a plain in-process loop
(Preprocessor then CaptionWorker, batch by batch; model load excluded) and (b) through the
Ray Data pipeline with one caption actor (local input/output; wall time of the Ray execution,
actor start and model load included). Reports images/s of both and the ratio, and the
pipeline's steady state: rows committed after the first output file / time from the first to
the last output file (startup of Ray workers and model loading excluded).

continuous: the same input through the pipeline twice in one Ray session, at the same
--batch-size: once with one input batch in flight per caption actor (--max-concurrent-batches 1:
a batch decodes to its end, shrinking as rows finish) and once with --in-flight batches (rows of
the next batches join as others finish). Reports images/s of both runs (whole run, and steady
state) and their ratio, and whether the two runs' captions are identical. --pair mixed is a tiny random
pair whose target's EOS logit is raised so that greedy caption lengths spread from a few tokens
to --max-new-tokens (a stand-in for short and detailed captions); --pair demo is the shipped
demo pair on its synthetic images. --repeats N alternates the two arms N times (medians).

join-cost: what admitting rows costs the running ones, in-process (no Ray): the caption actor's
ContinuousBatcher over the pair, all batches submitted at once; reports admissions, rows per
admission, median prefill seconds per admission next to the median step, the share of decode
wall time spent in admissions, and the mean rows decoding per step against --batch-size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
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


def mixed_length_pair(directory: str, eos_lift: float = 0.175) -> tuple[str, str]:
    """A tiny pair (saved with save_pretrained) whose greedy captions end anywhere from a few tokens
    to the length limit: the target's EOS logit is raised by `eos_lift` per hidden unit, and the
    draft is a perturbed copy of the target (so drafts are accepted often, as with a distilled draft)."""
    import copy

    import torch

    from decoding.testing import make_tiny_llava, make_tiny_processor

    target = make_tiny_llava(seed=0, hidden_size=64, num_layers=2)
    eos = target.config.text_config.eos_token_id
    with torch.no_grad():
        target.lm_head.weight[eos] += eos_lift
        draft = copy.deepcopy(target)
        g = torch.Generator().manual_seed(7)
        for p in draft.model.language_model.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    processor = make_tiny_processor()
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = os.path.join(directory, name)
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def continuous(args) -> dict:
    import statistics

    import pyarrow.dataset as pads

    from pipeline.config import CaptionConfig
    from pipeline.run import run_caption

    work = tempfile.mkdtemp(prefix="bench-cont-")
    inp = os.path.join(work, "in")
    if args.pair == "demo":
        from jobs.common import DEMO_PAIR
        from training.synthetic import write_shards
        target, draft = str(DEMO_PAIR / "target"), str(DEMO_PAIR / "draft")
        write_shards(args.rows, max(1, args.rows // 4), inp, seed=0)
    else:
        from tests.pipeline_helpers import png_bytes
        target, draft = mixed_length_pair(os.path.join(work, "pair"))
        os.makedirs(inp)
        per_shard = args.rows // 4
        for s in range(4):
            keys = [f"{s}-{i}" for i in range(per_shard)]
            pq.write_table(pa.table({"id": keys, "image": [png_bytes(s * per_shard + i, 16) for i in range(per_shard)]}),
                           os.path.join(inp, f"{s}.parquet"))
    init_ray()
    arms = {"one_batch": 1, "continuous": args.in_flight}
    runs: dict[str, list] = {name: [] for name in arms}
    captions: dict[str, dict] = {}
    for r in range(args.repeats):
        for name, in_flight in arms.items():
            out = os.path.join(work, f"out-{name}-{r}")
            config = CaptionConfig(input=inp, output=out, target=target, draft=draft, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, cpus_per_actor=1.0, stage_cpus=0.25,
                                   actors_max=1, max_concurrent_batches=in_flight, commit_rows=args.commit_rows,
                                   tree_budget=args.tree_budget)
            summary = run_caption(config)
            assert summary["status"] == "finished", summary
            table = pads.dataset(os.path.join(out, DATA_DIR), format="parquet").to_table(
                columns=["id", "caption", "new_tokens"])
            got = dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist()))
            captions.setdefault(name, got)
            lengths = table.column("new_tokens").to_pylist()
            runs[name].append({"images_per_s": round(args.rows / summary["run"]["wall_s"], 2),
                               "steady_images_per_s": steady_state(os.path.join(out, DATA_DIR))})
    identical = captions["one_batch"] == captions["continuous"]
    shutil.rmtree(work, ignore_errors=True)

    def med(name, key):
        values = [run[key] for run in runs[name] if run[key] is not None]
        return round(statistics.median(values), 2) if values else None

    result = {"pair": args.pair, "rows": args.rows, "batch_size": args.batch_size, "tree_budget": args.tree_budget,
              "max_new_tokens": args.max_new_tokens, "in_flight": args.in_flight, "repeats": args.repeats,
              "caption_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
              "captions_identical": identical, "runs": runs}
    for key in ("images_per_s", "steady_images_per_s"):
        a, b = med("one_batch", key), med("continuous", key)
        result[key] = {"one_batch": a, "continuous": b, "ratio": round(b / a, 3) if a and b else None}
    return result


def join_cost(args) -> dict:
    import statistics

    import torch

    from decoding import SpeculativeDecoder
    from decoding.loading import load_model
    from workers.batcher import ContinuousBatcher, RowRequest
    from workers.preprocess import Preprocessor

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-join-")
    if args.pair == "demo":
        from jobs.common import DEMO_PAIR
        from training.synthetic import write_shards
        target, draft = str(DEMO_PAIR / "target"), str(DEMO_PAIR / "draft")
        write_shards(args.rows, args.rows, os.path.join(work, "in"), seed=0)
        table = pq.read_table(os.path.join(work, "in"), columns=["id", "image"])
    else:
        from tests.pipeline_helpers import png_bytes
        target, draft = mixed_length_pair(os.path.join(work, "pair"))
        table = pa.table({"id": [str(i) for i in range(args.rows)], "image": [png_bytes(i, 16) for i in range(args.rows)]})
    pre = Preprocessor(target)(table)
    decoder = SpeculativeDecoder(load_model(target, torch.float32, "cpu"), load_model(draft, torch.float32, "cpu"))
    requests = []
    for row in pre.to_pylist():
        pixels = torch.tensor(row["pixel_values"], dtype=torch.float32)
        side = int(round((pixels.numel() / 3) ** 0.5))
        requests.append(RowRequest(np.asarray(row["input_ids"]), pixels.reshape(1, 3, side, side)))
    batcher = ContinuousBatcher(decoder.engine(max_new_tokens=args.max_new_tokens), max_rows=args.batch_size,
                                record_history=True, torch_threads=1)
    start = time.perf_counter()
    if args.one_batch:   # the baseline: each batch decodes to its end before the next is submitted
        for i in range(0, len(requests), args.batch_size):
            batcher.submit(requests[i:i + args.batch_size]).result()
    else:
        futures = [batcher.submit(requests[i:i + args.batch_size]) for i in range(0, len(requests), args.batch_size)]
        for f in futures:
            f.result()
    wall = time.perf_counter() - start
    batcher.close()
    shutil.rmtree(work, ignore_errors=True)
    st = batcher.stats
    return {"pair": args.pair, "rows": args.rows, "batch_size": args.batch_size, "one_batch": args.one_batch,
            "max_new_tokens": args.max_new_tokens, "admissions": st.admissions,
            "rows_per_admission": round(st.admitted_rows / st.admissions, 2),
            "median_admission_s": round(statistics.median(s for _, s in st.admit_log), 4),
            "median_step_s": round(statistics.median(s for _, s in st.step_log), 4),
            "admission_share_of_wall": round(st.prefill_s / wall, 3),
            "mean_rows_per_step": round(st.row_steps / st.steps, 2), "steps": st.steps,
            "images_per_s": round(args.rows / wall, 2)}


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
    c = sub.add_parser("continuous")
    c.add_argument("--pair", choices=["mixed", "demo"], default="mixed")
    c.add_argument("--rows", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--max-new-tokens", type=int, default=96)
    c.add_argument("--in-flight", type=int, default=8, help="--max-concurrent-batches of the continuous arm")
    c.add_argument("--commit-rows", type=int, default=32)
    c.add_argument("--repeats", type=int, default=1)
    c.add_argument("--tree-budget", choices=["auto", "off"], default="off",
                   help="off (default) isolates the batching effect: both arms use the default tree")
    j = sub.add_parser("join-cost")
    j.add_argument("--pair", choices=["mixed", "demo"], default="demo")
    j.add_argument("--rows", type=int, default=64)
    j.add_argument("--batch-size", type=int, default=8)
    j.add_argument("--max-new-tokens", type=int, default=64)
    j.add_argument("--one-batch", action="store_true", help="submit one batch at a time (no joining)")
    args = parser.parse_args()
    commands = {"loop-vs-pipeline": loop_vs_pipeline, "continuous": continuous, "join-cost": join_cost}
    result = commands[args.cmd](args)
    print(json.dumps({"bench": args.cmd, **result}))


if __name__ == "__main__":
    main()
