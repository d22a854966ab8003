"""Build and run the Ray Data captioning graph, checkpointed on the id column.

    read_parquet(native S3FileSystem) → [CheckpointFilter, added by Ray on resume]
      → Preprocessor (CPU actor pool) → CaptionWorker (actor pool, integer batch_size)
      → write_parquet(OUTPUT/data) with Ray Data's two-phase-commit checkpoint in OUTPUT/_checkpoint

Output layout: OUTPUT/data/*.parquet (the table), OUTPUT/_checkpoint/ (committed ids, kept after
success so a rerun skips done work), OUTPUT/_run.json (manifest). Readers that skip names
starting with '_' (pyarrow.dataset, DuckDB via pyarrow) can read OUTPUT directly.

Before any work: every input shard's schema is checked and all ids are read (id column only)
to reject duplicates or nulls — a duplicate would silently break exactly-once.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from decoding.stats import mean_accepted_length
from pipeline import manifest as mf
from pipeline import preflight
from workers import storage
from pipeline.config import CaptionConfig, PipelineError
from pipeline.layout import CHECKPOINT_DIR, DATA_DIR


@dataclass
class InputScan:
    fs: pafs.FileSystem
    files: list[str]
    num_rows: int
    id_type: pa.DataType
    prompt_column: str | None


def _read_shard_meta(fs, path: str, id_column: str):
    pf = pq.ParquetFile(path, filesystem=fs)
    schema = pf.schema_arrow
    ids = None
    if id_column in schema.names and pf.metadata.num_rows > 0:
        ids = pf.read(columns=[id_column]).column(id_column)
    return schema, pf.metadata.num_rows, ids


def scan_input(config: CaptionConfig) -> InputScan:
    """Check every shard's columns and that ids are unique and non-null; raise PipelineError if not."""
    try:
        fs, files = storage.list_parquet_files(config.input, config.s3_endpoint)
    except FileNotFoundError as exc:
        raise PipelineError(str(exc)) from None
    if not files:
        raise PipelineError(f"no *.parquet files under {config.input}")
    with ThreadPoolExecutor(max_workers=16) as pool:
        metas = list(pool.map(lambda p: _read_shard_meta(fs, p, config.id_column), files))
    image_col = config.image_column or config.image_uri_column
    with_prompt = 0
    id_chunks = []
    id_type = None
    for path, (schema, _rows, ids) in zip(files, metas):
        for col in (config.id_column, image_col):
            if col not in schema.names:
                raise PipelineError(f"shard {path} has no column {col!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(image_col).type
        if config.image_column and not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise PipelineError(f"image column {image_col!r} of {path} is {kind}, not binary "
                                "(use --image-uri-column for URIs)")
        if config.image_uri_column and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PipelineError(f"URI column {image_col!r} of {path} is {kind}, not string")
        with_prompt += "prompt" in schema.names
        this_type = schema.field(config.id_column).type
        id_type = id_type or this_type
        if ids is not None:
            try:
                id_chunks.append(ids.cast(id_type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise PipelineError(f"id column of {path} is {this_type}, other shards have {id_type}") from None
    if 0 < with_prompt < len(files):
        raise PipelineError("a 'prompt' column is in some shards but not all; add it (nulls allowed) everywhere")
    all_ids = pa.chunked_array(id_chunks, type=id_type) if id_chunks else pa.chunked_array([], type=id_type)
    if all_ids.null_count:
        raise PipelineError(f"{all_ids.null_count} rows have a null {config.id_column!r}")
    counts = pc.value_counts(all_ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        examples = ", ".join(repr(v) for v in dupes.field("values")[:5].to_pylist())
        raise PipelineError(f"{len(dupes)} duplicate ids in column {config.id_column!r} "
                            f"(e.g. {examples}); ids must be unique across all shards")
    return InputScan(fs, files, len(all_ids), id_type, "prompt" if with_prompt else None)


def ensure_ray(address: str | None) -> None:
    """Use the Ray this process is connected to, else connect to `address`, else start a local one.

    A local Ray gets at least 4 logical CPUs: Ray 2.60's ListFiles task and CheckpointFilter
    actor take 1 CPU each whatever the stage settings, and on 2 logical CPUs a resumed run
    deadlocks (backpressured:tasks(ResourceBudget)).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


def _list_files(fs, path: str) -> set[str]:
    return {e.path for e in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if e.type == pafs.FileType.File and e.path.endswith(".parquet")}


def _read_columns(fs, files, columns) -> pa.Table:
    if not files:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pq.ParquetDataset(sorted(files), filesystem=fs).read(columns=columns)


def build_dataset(config: CaptionConfig, scan: InputScan, out_fs, data_path: str):
    """The lazy Ray Data graph, ending in a write to `data_path` (not executed here)."""
    import ray.data

    from workers.caption import CaptionWorker
    from workers.drill import drill_env
    from workers.preprocess import Preprocessor

    image_col = config.image_column or config.image_uri_column
    columns = [config.id_column, image_col] + ([scan.prompt_column] if scan.prompt_column else [])
    ds = ray.data.read_parquet(scan.files, filesystem=scan.fs, num_cpus=config.stage_cpus)
    ds = ds.select_columns(columns)
    # One block per batch from here to the write: each caption task is one batch and each
    # write commits one batch, so a kill loses at most the batches in flight (a streaming
    # map, not an all-to-all repartition, so Ray's checkpointing stays enabled).
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        Preprocessor, batch_format="pyarrow", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, 2 * config.actors_max)),
        num_cpus=config.stage_cpus,
        fn_constructor_kwargs=dict(
            target=config.target, id_column=config.id_column, image_column=config.image_column,
            image_uri_column=config.image_uri_column, prompt=config.prompt,
            prompt_column=scan.prompt_column, s3_endpoint=config.s3_endpoint))
    threads = max(1, int(config.cpus_per_actor)) if config.gpus_per_actor == 0 else None
    drills = drill_env()  # tests only (workers/drill.py); actors do not see the driver's later env
    ds = ds.map_batches(
        CaptionWorker, batch_format="pyarrow", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=config.actors_min, max_size=config.actors_max),
        num_gpus=config.gpus_per_actor or None, num_cpus=config.cpus_per_actor,
        fn_constructor_kwargs=dict(
            target=config.target, draft=config.draft, id_column=config.id_column,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            tree=dict(config.tree), s3_endpoint=config.s3_endpoint, dtype=config.dtype,
            device="cuda" if config.gpus_per_actor > 0 else "cpu", torch_threads=threads,
            seed=config.seed),
        **({"runtime_env": {"env_vars": drills}} if drills else {}))
    return ds


def execute(ds_builder, config: CaptionConfig, out_fs, data_path: str, ckpt_path: str) -> None:
    """Run the graph with Ray Data's checkpointing on the id column (progress kept on success)."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column=config.id_column, checkpoint_path=ckpt_path,
        delete_checkpoint_on_success=False, override_filesystem=out_fs)
    try:
        ds = ds_builder()  # read_parquet copies the current DataContext, checkpoint config included
        ds.write_parquet(data_path, filesystem=out_fs, ray_remote_args={"num_cpus": config.stage_cpus},
                         min_rows_per_file=config.batch_size)
    finally:
        ctx.checkpoint_config = saved


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _run_stats(table: pa.Table, wall_s: float) -> dict:
    status = table.column("status").to_pylist() if table.num_rows else []
    ok = sum(s == "ok" for s in status)
    new_tokens = forwards = 0
    if ok:
        new_tokens = pc.sum(table.column("new_tokens")).as_py()
        forwards = pc.sum(table.column("target_forwards")).as_py()
    return {
        "rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "wall_s": round(wall_s, 3),
        "images_per_s": round(table.num_rows / wall_s, 3) if wall_s > 0 else None,
        "tokens_per_s": round(new_tokens / wall_s, 3) if wall_s > 0 else None,
        "new_tokens": new_tokens,
        "mean_accepted": _rounded(mean_accepted_length(new_tokens, forwards, ok), 4),
    }


def check_compatible(previous: dict | None, config: CaptionConfig, models: dict) -> None:
    if previous is None:
        return
    old = previous.get("config", {})
    changed = [k for k, v in config.identity().items() if old.get(k) != v]
    for role in ("target", "draft"):
        if previous.get("models", {}).get(role, {}).get("sha256") != models[role]["sha256"]:
            changed.append(f"{role} weights")
    if changed:
        raise PipelineError(f"{config.output} holds a run with different {', '.join(changed)}; "
                            "use a new --output (or the same options to continue it)")


def _record_failure(config: CaptionConfig, manifest: dict, run: dict, exc: BaseException, log) -> None:
    from workers.schema import one_line

    run.update(finished=mf.now(), status="failed", error=one_line(exc, 1000))
    manifest.update(status="failed")
    try:
        mf.write_manifest(config.output, manifest, config.s3_endpoint)
    except OSError as write_exc:  # the store itself is failing; the caller still gets `exc`
        log(f"specllava caption: could not record the failure in _run.json: {one_line(write_exc, 300)}")


def run_caption(config: CaptionConfig, log=print) -> dict:
    """Caption every input row not yet in the output; returns the summary (also in _run.json).

    Raises PipelineError for user errors, before any work starts.
    """
    preflight.check_run(config)  # models safe and paired, output bucket/dir exists: before any reading
    out_fs, root = storage.resolve(config.output, config.s3_endpoint)
    data_path = posixpath.join(root, DATA_DIR)
    ckpt_path = posixpath.join(root, CHECKPOINT_DIR)
    scan = scan_input(config)
    models = {}
    for role in ("target", "draft"):
        try:
            models[role] = {"path": getattr(config, role),
                            **mf.hash_model_dir(getattr(config, role), config.s3_endpoint)}
        except FileNotFoundError as exc:
            raise PipelineError(str(exc)) from None
    previous = mf.read_manifest(config.output, config.s3_endpoint)
    check_compatible(previous, config, models)
    before = _list_files(out_fs, data_path)
    if before and out_fs.get_file_info(ckpt_path).type == pafs.FileType.NotFound:
        raise PipelineError(f"{config.output} has data files but no {CHECKPOINT_DIR}/; "
                            "cannot resume it exactly once")
    runs = list(previous.get("runs", [])) if previous else []
    run = {"started": mf.now(), "status": "running", "config": config.to_dict()}
    manifest = {"version": 1, "status": "running", "config": config.to_dict(), "models": models,
                "packages": mf.package_versions(), "input": {"files": len(scan.files), "rows": scan.num_rows},
                "runs": runs + [run]}
    preflight.check_output_writable(config.output, config.s3_endpoint)  # a probe, before the first write
    mf.write_manifest(config.output, manifest, config.s3_endpoint)

    ensure_ray(config.address)
    if config.gpus_per_actor is None:
        import ray
        config = dataclasses.replace(config, gpus_per_actor=1.0 if ray.cluster_resources().get("GPU") else 0.0)
        run["config"] = manifest["config"] = config.to_dict()
    start = time.perf_counter()
    try:
        execute(lambda: build_dataset(config, scan, out_fs, data_path), config, out_fs, data_path, ckpt_path)
        wall = time.perf_counter() - start
        # The check below reads the store too: a failure there (e.g. the store away for longer
        # than the retries) is recorded like a failed execution, never left as "running".
        after = _list_files(out_fs, data_path)
        new = _read_columns(out_fs, after - before, ["status", "new_tokens", "target_forwards"])
        this_run = _run_stats(new, wall)
        everything = _read_columns(out_fs, after, [config.id_column, "status"])
        ids = everything.column(config.id_column)
        unique = pc.count_distinct(ids).as_py() if len(ids) else 0
        ok_total = (pc.sum(pc.equal(everything.column("status"), "ok")).as_py() or 0) if len(ids) else 0
        complete = unique == len(ids) == scan.num_rows
        totals = {"input_rows": scan.num_rows, "output_rows": len(ids), "unique_ids": unique,
                  "ok": ok_total, "error": len(ids) - ok_total}
        run.update(finished=mf.now(), status="finished" if complete else "incomplete", **this_run)
        manifest.update(status=run["status"], counts=totals, finished=run["finished"])
        mf.write_manifest(config.output, manifest, config.s3_endpoint)
    except BaseException as exc:  # record why in _run.json, then let the caller see the error
        _record_failure(config, manifest, run, exc, log)
        raise
    log(f"specllava caption: {this_run['rows']} rows decoded this run ({this_run['ok']} ok, "
        f"{this_run['error']} error) in {wall:.1f}s: {this_run['images_per_s'] or 0:.2f} images/s, "
        f"{this_run['tokens_per_s'] or 0:.1f} tokens/s, mean accepted length "
        f"{this_run['mean_accepted'] if this_run['mean_accepted'] is not None else 'n/a'}")
    log(f"specllava caption: table {totals['output_rows']}/{scan.num_rows} ids "
        f"({totals['ok']} ok, {totals['error']} error) -> {config.output} [{run['status']}]")
    return {"status": run["status"], "run": this_run, "counts": totals}
