"""Run a caption job: plan the input, stream the rows that still need work through Ray Data,
commit them in large units, check the table at the end.

    plan (footers; pipeline/plan.py) -> can the cluster host the graph? (pipeline/cluster.py)
      -> distributed id check (new outputs; pipeline/idcheck.py)
      -> Ray Data: read specs -> ShardReader (tasks) -> Preprocessor (CPU actors)
           -> CaptionWorker (actors, integer batch_size)      [--dry-run: -> ImageChecker]
         (until a caption actor has a node: the start-up watch, pipeline/watch.py)
      -> driver: UnitWriter commits OUTPUT/data/unit-N.parquet per `commit_rows` rows (pipeline/commit.py)

Decode batches are `batch_size` rows; the unit of commit is `commit_rows` rows (default 5,000),
independent of it. A resume reads only the row groups that hold uncommitted rows. Nothing the
driver holds or reads grows with the number of rows: it holds the plan (one row per input row
group), the committed unit indices, and the rows of the few units in flight.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import time

import pyarrow.fs as pafs

from decoding.stats import mean_accepted_length
from pipeline import manifest as mf
from pipeline import preflight
from pipeline.cluster import Cluster, caption_request, check_fits, gpu_capacity, read_cluster, unbounded_gpu_types
from pipeline.commit import RunCounters, UnitWriter, committed_units, foreign_files, remove_temporaries, unit_footers
from pipeline.config import CaptionConfig, PipelineError
from pipeline.idcheck import check_ids
from pipeline.layout import BUDGET_DIR, DATA_DIR, LEGACY_CHECKPOINT_DIR
from pipeline.lease import Lease, new_run_id
from pipeline.plan import InputPlan, build_plan, check_input_unchanged, load_plan, save_plan
from pipeline.progress import RunProgress
from pipeline.watch import StartWatch
from workers import storage

DRY_RUN_BLOCK_ROWS = 4096  # no decode batch in a dry run: larger blocks, less per-block overhead


def scan_input(config: CaptionConfig, out_fs, root: str) -> tuple[InputPlan, bool]:
    """(plan, new): the output's saved plan after checking the input did not change, or a new
    plan from the shards' footers (then the caller must check ids before saving it)."""
    plan = load_plan(out_fs, root)
    if plan is None:
        return build_plan(config), True
    if plan.commit_rows != config.commit_rows:
        raise PipelineError(f"{config.output} commits units of {plan.commit_rows} rows; "
                            f"--commit-rows {config.commit_rows} cannot continue it")
    check_input_unchanged(plan, config)
    return plan, False


def quiet_ray() -> None:
    """Ray Data's INFO lines and progress bars off the console (they stay in Ray's session logs);
    the run prints its own progress (pipeline/progress.py)."""
    import logging

    import ray.data

    logging.getLogger("ray").setLevel(logging.WARNING)
    # "Progress bars disabled" and "token authentication is enabled" are notices, not problems
    for name in ("ray.data", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def use_local_auth_token() -> None:
    """Like `ray start`: send the local Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) when RAY_AUTH_MODE is unset. Ray 2.5x+ clusters require it by default, and
    `ray.init(address=...)` does not look for it by itself."""
    import logging

    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # older Ray: no token authentication
        return
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = log.level
    log.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is noise here
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def ensure_ray(address: str | None, verbose: bool = True) -> None:
    """Use the Ray this process is connected to, else connect to `address`, else start a private
    local one.

    Without `address`, a head already running on this machine (`ray start --head`) is left alone:
    `address="local"` always starts a new instance, where a plain `ray.init(num_cpus=...)` would
    find that head (or a stale address file of a dead one) and raise "When connecting to an
    existing cluster, num_cpus and num_gpus must not be provided". Use `--address auto` to run
    on that head instead. A private Ray gets at least 4 logical CPUs, so the read, preprocess and
    caption stages all find room on a small machine.
    """
    import ray

    if ray.is_initialized():
        return
    # Not verbose: the workers' own output (model loading bars, Ray's worker notices) stays in
    # Ray's session logs instead of being forwarded to this console.
    import logging

    options = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        use_local_auth_token()
        ray.init(address=address, **options)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, **options)
    from pipeline.console import exit_on_sigterm
    exit_on_sigterm()


def check_layout(out_fs, root: str, output: str) -> None:
    """Refuse outputs this version cannot continue exactly once."""
    if out_fs.get_file_info(posixpath.join(root, LEGACY_CHECKPOINT_DIR)).type != pafs.FileType.NotFound:
        raise PipelineError(f"{output} was written by an older specllava (per-batch Ray Data checkpoints in "
                            f"{LEGACY_CHECKPOINT_DIR}/); finish it with that version or start a new --output")
    foreign = foreign_files(out_fs, posixpath.join(root, DATA_DIR))
    if foreign:
        raise PipelineError(f"{output}/{DATA_DIR}/ holds files that are not committed units (e.g. {foreign[0]}); "
                            "use an empty --output")


def auto_actors(cluster_gpus: float, gpus_per_actor: float) -> int:
    """`--actors auto`: one caption actor per `gpus_per_actor` GPUs of the cluster, at least 1."""
    if gpus_per_actor <= 0:
        return 1
    return max(1, int(cluster_gpus // gpus_per_actor))


def decide_resources(config: CaptionConfig, cluster_gpus: float) -> CaptionConfig:
    """GPUs per actor and `--actors auto` for a cluster with `cluster_gpus` GPUs (its capacity:
    pipeline.cluster.gpu_capacity, autoscaling node types included).

    `--device cpu` decodes on CPU (no GPU requested); otherwise GPUs per actor default to 1 when
    the cluster has GPUs, and asking for none on a cluster that has some is refused: a model
    silently decoding on CPU next to idle GPUs is never what a user wants.
    """
    if config.device == "cpu":
        if config.gpus_per_actor:
            raise PipelineError("--device cpu and --gpus-per-actor > 0 contradict each other")
        config = dataclasses.replace(config, gpus_per_actor=0.0)
    elif config.gpus_per_actor is None:
        config = dataclasses.replace(config, gpus_per_actor=1.0 if cluster_gpus else 0.0)
    elif config.gpus_per_actor == 0 and cluster_gpus and not config.dry_run:
        raise PipelineError(f"the cluster has (or can scale to) {cluster_gpus:g} GPUs but --gpus-per-actor 0 "
                            "would decode on CPU; "
                            "pass --device cpu if that is what you want")
    if config.device == "cuda" and not config.gpus_per_actor:
        raise PipelineError("--device cuda needs GPUs: the cluster has none (or pass --gpus-per-actor)")
    if config.actors_max is None:
        config = dataclasses.replace(config, actors_max=auto_actors(cluster_gpus, config.gpus_per_actor))
    return config


def resolve_resources(config: CaptionConfig, cluster: Cluster | None = None) -> CaptionConfig:
    """decide_resources on the cluster's GPU capacity: the GPUs of its live nodes or, when more,
    what its autoscaler's node types can reach (GPU nodes at zero count as what they may become).
    _run.json keeps what the user asked for (a resume decides again on its own cluster)."""
    import logging

    cluster = cluster if cluster is not None else read_cluster()
    unbounded = unbounded_gpu_types(cluster)
    if unbounded and config.actors_max is None and "GPU" not in cluster.max_resources:
        logging.getLogger(__name__).warning(
            "--actors auto cannot count the GPUs of node type(s) %s (no max_workers): it counts the "
            "other node types and the live nodes; pass --actors MIN,MAX to use more", ", ".join(unbounded))
    return decide_resources(config, gpu_capacity(cluster))


# Ray Data (2.60) fails the whole run on the first actor that dies before its constructor returns
# (DataContext.max_consecutive_actor_init_deaths = 0). A pending actor can die without any fault of
# ours: seen in the README-tour test, a Preprocessor actor "cancelled before it started running"
# while its pool scaled, which failed a fresh job. A few consecutive deaths are replaced instead; the
# count resets at every actor that starts, so a constructor that always fails (a model that cannot
# load) still fails the run, after this many more tries.
ACTOR_INIT_DEATHS = 2


def build_dataset(config: CaptionConfig, plan: InputPlan, specs: list[dict], budget_report: str | None = None):
    """The lazy Ray Data graph over `specs`, yielding output rows with their ROW_COLUMN."""
    import ray.data

    context = ray.data.DataContext.get_current()
    if hasattr(context, "max_consecutive_actor_init_deaths"):
        context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    from workers.read import ShardReader

    image_col = config.image_column or config.image_uri_column
    columns = [config.id_column, image_col] + ([plan.prompt_column] if plan.prompt_column else [])
    block_rows = max(config.batch_size, DRY_RUN_BLOCK_ROWS) if config.dry_run else config.batch_size
    reader = ShardReader(config.input, columns, block_rows, config.s3_endpoint)

    def read(batch):  # a plain function: Ray Data runs it as tasks, one input shard each
        yield from reader(batch)

    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=config.stage_cpus)
    # Ray Data merges a task's outputs into blocks of up to 128 MiB, so a shard would travel as one
    # block and reach the driver only when all of it is decoded. A streaming split (a map, not an
    # all-to-all) makes each downstream task one batch: rows reach the commit as they are done.
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    image_options = dict(id_column=config.id_column, image_column=config.image_column,
                         image_uri_column=config.image_uri_column, s3_endpoint=config.s3_endpoint)
    if config.dry_run:
        from workers.preprocess import ImageChecker
        return ds.map_batches(
            ImageChecker, batch_format="pyarrow", batch_size=block_rows,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(2, 2 * config.actors_max)),
            num_cpus=config.stage_cpus, fn_constructor_kwargs=image_options)

    from workers.caption import CaptionWorker
    from workers.drill import drill_env, with_device_drill
    from workers.preprocess import Preprocessor

    ds = ds.map_batches(
        Preprocessor, batch_format="pyarrow", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, 2 * config.actors_max)),
        num_cpus=config.stage_cpus,
        fn_constructor_kwargs=dict(target=config.target, prompt=config.prompt,
                                   prompt_column=plan.prompt_column, **image_options))
    threads = max(1, int(config.cpus_per_actor)) if config.gpus_per_actor == 0 else None
    drills = drill_env()  # tests only (workers/drill.py); actors do not see the driver's later env
    CaptionWorker = with_device_drill(CaptionWorker)  # the same class unless a test sets SPECLLAVA_DRILL_DEVICE
    # Several input batches in flight per actor (as ray.data.llm's engine stage): CaptionWorker's
    # async __call__ hands each to its continuous batcher, which keeps batch_size rows decoding.
    in_flight = config.max_concurrent_batches
    return ds.map_batches(
        CaptionWorker, batch_format="pyarrow", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=config.actors_min, max_size=config.actors_max,
                                           max_tasks_in_flight_per_actor=in_flight,
                                           max_concurrent_calls_per_actor=in_flight),
        runtime_env={"env_vars": drills} if drills else None,
        num_gpus=config.gpus_per_actor or None, num_cpus=config.cpus_per_actor,
        fn_constructor_kwargs=dict(
            target=config.target, draft=config.draft, id_column=config.id_column,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, tree=dict(config.tree), s3_endpoint=config.s3_endpoint, dtype=config.dtype,
            device="cuda" if config.gpus_per_actor > 0 else "cpu", torch_threads=threads,
            seed=config.seed, batch_size=config.batch_size, tree_budget=config.tree_budget,
            compile=config.compile, kv_memory_gb=config.kv_memory_gb, budget_report=budget_report))


def budget_report_uri(config: CaptionConfig, run_id: str) -> str | None:
    """Where this run's caption actors report their measured tree budget (OUTPUT/_budget/RUN)."""
    if config.dry_run or config.tree_budget != "auto":
        return None
    return f"{config.output.rstrip('/')}/{BUDGET_DIR}/{run_id}"


def read_budget_reports(out_fs, root: str, run_id: str) -> list[dict]:
    """The actors' reports of run `run_id`: [{actor, device, budget, remeasures}] ([] when none or
    unreadable); budget: the table in use at the end, remeasures: [{reason, budget, seconds}]."""
    import json

    import pyarrow.fs as pafs

    folder = posixpath.join(root, BUDGET_DIR, run_id)
    try:
        infos = out_fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        reports = []
        for info in sorted(infos, key=lambda i: i.path):
            if info.base_name.endswith(".json") and not info.base_name.startswith("."):
                with out_fs.open_input_stream(info.path) as stream:
                    record = json.loads(stream.read())
                reports.append({**{k: record.get(k) for k in ("actor", "device", "budget")},
                                "remeasures": record.get("remeasures") or []})
        return reports
    except (OSError, ValueError):
        return []


def execute(ds, writer: UnitWriter) -> None:
    """Stream the graph's output into the unit writer; every complete unit is committed."""
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(block)
    except BaseException:
        writer.abandon()
        raise
    writer.close()


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _run_stats(counters: RunCounters, wall_s: float) -> dict:
    rows, ok = counters.rows, counters.ok
    return {
        "rows": rows, "ok": ok, "error": rows - ok, "wall_s": round(wall_s, 3),
        "units": counters.units,
        "images_per_s": round(rows / wall_s, 3) if wall_s > 0 else None,
        "tokens_per_s": round(counters.new_tokens / wall_s, 3) if wall_s > 0 else None,
        "new_tokens": counters.new_tokens,
        "mean_accepted": _rounded(mean_accepted_length(counters.new_tokens, counters.target_forwards, ok), 4),
    }


def summary_line(this_run: dict, wall: float, dry_run: bool) -> str:
    """What this run did, in one line (a dry run checks images: no tokens, no speed of decoding)."""
    units = this_run["units"]
    committed = f"committed in {units} unit{'' if units == 1 else 's'}"
    if dry_run:
        return (f"{this_run['rows']} rows checked this run, dry run ({this_run['ok']} ok, {this_run['error']} "
                f"error; {committed}) in {wall:.1f}s: {this_run['images_per_s'] or 0:.2f} images/s")
    tau = this_run["mean_accepted"]
    return (f"{this_run['rows']} rows decoded this run ({this_run['ok']} ok, {this_run['error']} error; "
            f"{committed}) in {wall:.1f}s: {this_run['images_per_s'] or 0:.2f} images/s, "
            f"{this_run['tokens_per_s'] or 0:.1f} tokens/s, mean accepted length {tau if tau is not None else 'n/a'}")


def check_compatible(previous: dict | None, config: CaptionConfig, models: dict) -> None:
    if previous is None:
        return
    old = previous.get("config", {})
    changed = [k for k, v in config.identity().items() if old.get(k) != v]
    for role in ("target", "draft"):
        old_hash = ((previous.get("models") or {}).get(role) or {}).get("sha256")
        new_hash = (models.get(role) or {}).get("sha256")
        if old_hash != new_hash:
            changed.append(f"{role} weights")
    if changed:
        raise PipelineError(f"{config.output} holds a run with different {', '.join(changed)}; "
                            "use a new --output (or the same options to continue it)")


def _record_failure(config: CaptionConfig, manifest: dict, run: dict, exc: BaseException, log) -> None:
    from workers.schema import one_line

    # Ctrl-C is the user's choice, not a failure: "interrupted" (the output stays resumable either way)
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    run.update(finished=mf.now(), status=status, error=one_line(exc, 1000))
    manifest.update(status=status)
    try:
        mf.write_manifest(config.output, manifest, config.s3_endpoint)
    except OSError as write_exc:  # the store itself is failing; the caller still gets `exc`
        log(f"specllava caption: could not record the failure in _run.json: {one_line(write_exc, 300)}")


def _hash_models(config: CaptionConfig, previous: dict | None) -> dict:
    """{role: {path, sha256, files, bytes, listing}}. The sha256 reads every byte of a model (tens
    of seconds for a 7B pair on S3), so a resume whose model listing (paths, sizes, last-modified
    times) is unchanged reuses the hash recorded in _run.json instead of downloading it again."""
    if config.dry_run:
        return {}
    models = {}
    for role in ("target", "draft"):
        uri = getattr(config, role)
        try:
            listing = mf.listing_fingerprint(uri, config.s3_endpoint)
            old = ((previous or {}).get("models") or {}).get(role) or {}
            if old.get("listing") == listing and old.get("path") == uri:
                models[role] = old
            else:
                models[role] = {"path": uri, **mf.hash_model_dir(uri, config.s3_endpoint), "listing": listing}
        except FileNotFoundError as exc:
            raise PipelineError(str(exc)) from None
    return models


def run_caption(config: CaptionConfig, log=print, *, progress_every: float = 0.0, progress_tty: bool = False,
                verbose: bool = True, label: str = "specllava caption", own_console: bool = False) -> dict:
    """Caption every input row not yet committed in the output; returns the summary (also in _run.json).

    Raises PipelineError for user errors (LeaseHeld when another live writer holds the output),
    before any row is written. `progress_every` > 0 prints a progress line that often;
    `progress_tty` shows a bar instead; `verbose=False` keeps Ray's own logs off the console;
    `label` starts the summary lines (the command that runs: caption or resume); `own_console`
    (the `specllava` program, not a library call) with `verbose=False` also drops Ray's native
    noise from descriptor 2 (pipeline/console.py).
    """
    preflight.check_run(config)  # models safe and paired, output bucket/dir exists: before any reading
    out_fs, root = storage.resolve(config.output, config.s3_endpoint)
    check_layout(out_fs, root, config.output)
    existed = out_fs.get_file_info(root).type != pafs.FileType.NotFound
    lease = Lease(out_fs, root, config.output, new_run_id(), log=log)
    try:
        lease.acquire()  # one writer per output, before anything of the output is written or cleaned
    except OSError as exc:
        from workers.schema import one_line
        raise PipelineError(f"cannot write --output {config.output}: {one_line(exc, 300)}") from None
    try:
        return _run_holding_lease(config, out_fs, root, lease, log,
                                  dict(every_s=progress_every, tty=progress_tty), verbose, label, own_console)
    except BaseException as exc:
        # A run that created the output and fails (or is interrupted) before its first commit
        # leaves nothing behind: the output is removed, still under the lease.
        if not existed and _nothing_committed(out_fs, root):
            lease.stop_heartbeat()
            try:
                out_fs.delete_dir(root)
                exc.specllava_output_removed = True  # the CLI's hint: run the same command again
            except OSError:
                pass
        raise
    finally:
        lease.release()


def _nothing_committed(out_fs, root: str) -> bool:
    try:
        return not committed_units(out_fs, posixpath.join(root, DATA_DIR))
    except OSError:
        return False  # cannot tell: keep everything


def _run_holding_lease(config: CaptionConfig, out_fs, root: str, lease: Lease, log, progress: dict,
                       verbose: bool, label: str, own_console: bool = False) -> dict:
    data_path = posixpath.join(root, DATA_DIR)
    plan, new_plan = scan_input(config, out_fs, root)
    previous = mf.read_manifest(config.output, config.s3_endpoint)
    models = _hash_models(config, previous)
    check_compatible(previous, config, models)

    if not verbose:
        quiet_ray()
    ensure_ray(config.address, verbose=verbose)
    if own_console and not verbose:
        from pipeline.console import filter_native_stderr
        filter_native_stderr()
    # Before any Ray work (the id check's tasks need a node too): a graph the cluster can never
    # host fails here, in seconds, instead of waiting forever (pipeline/cluster.py).
    cluster = read_cluster()
    resolved = resolve_resources(config, cluster)
    placement = check_fits(resolved, cluster)
    if new_plan:  # a duplicate id is refused before anything is written
        report = check_ids(plan.files, plan.num_rows, input_uri=config.input, s3_endpoint=config.s3_endpoint,
                           id_column=config.id_column, id_type=plan.id_type, num_cpus=config.stage_cpus)
        if report.nulls:
            raise PipelineError(f"{report.nulls} rows have a null {config.id_column!r}")
        if report.duplicates:
            examples = ", ".join(repr(v) for v in report.examples)
            raise PipelineError(f"{report.duplicates} duplicate ids in column {config.id_column!r} "
                                f"(e.g. {examples}); ids must be unique across all shards")

    runs = list(previous.get("runs", [])) if previous else []
    run = {"run": lease.run_id, "started": mf.now(), "status": "running", "config": config.to_dict()}
    manifest = {"version": 2, "status": "running", "config": config.to_dict(), "models": models,
                "packages": mf.package_versions(),
                "input": {"files": len(plan.files), "rows": plan.num_rows, "bytes": plan.input_bytes,
                          "commit_rows": plan.commit_rows, "units": plan.num_units},
                "runs": runs + [run]}
    preflight.check_output_writable(config.output, config.s3_endpoint)  # a probe, before the first write
    if new_plan:
        save_plan(plan, out_fs, root)
    mf.write_manifest(config.output, manifest, config.s3_endpoint)

    config = resolved
    run["resources"] = {"actors": [config.actors_min, config.actors_max], "gpus_per_actor": config.gpus_per_actor,
                        "cpus_per_actor": config.cpus_per_actor, "gpu_capacity": gpu_capacity(cluster),
                        "caption_actor_fits": placement}
    start = time.perf_counter()
    writer = None
    try:
        remove_temporaries(out_fs, data_path)
        done = committed_units(out_fs, data_path)
        specs, read_bytes = plan.read_specs(done)
        run.update(units_before=len(done), input_bytes_read=read_bytes)
        writer = UnitWriter(out_fs, data_path, plan.num_rows, plan.commit_rows, guard=lease.check)
        before = sum(plan.unit_rows(u) for u in done)
        start_watch = StartWatch(caption_request(config), autoscaling=placement == "node type")
        with RunProgress(plan.num_rows, before, log=log, why=start_watch.why, **progress) as bar:
            bar.watch(writer.counters)
            if specs:
                report = budget_report_uri(config, lease.run_id)
                ds = build_dataset(config, plan, specs, report)
                if config.dry_run:
                    execute(ds, writer)
                else:
                    with start_watch:
                        execute(ds, writer)
        wall = time.perf_counter() - start
        this_run = _run_stats(writer.counters, wall)
        budgets = read_budget_reports(out_fs, root, lease.run_id)
        if budgets:
            run["tree_budget"] = budgets
        # The check below reads the store too: a failure there (e.g. the store away for longer
        # than the retries) is recorded like a failed execution, never left as "running".
        units = committed_units(out_fs, data_path)
        rows, ok_total = unit_footers(out_fs, data_path, units)
        complete = units == set(range(plan.num_units)) and rows == plan.num_rows
        # Committed rows are distinct rows of an input whose ids were checked unique: ids = rows.
        totals = {"input_rows": plan.num_rows, "output_rows": rows, "unique_ids": rows,
                  "ok": ok_total, "error": rows - ok_total, "units": len(units)}
        run.update(finished=mf.now(), status="finished" if complete else "incomplete", **this_run)
        manifest.update(status=run["status"], counts=totals, finished=run["finished"])
        mf.write_manifest(config.output, manifest, config.s3_endpoint)
    except BaseException as exc:  # record why in _run.json, then let the caller see the error
        if writer is not None and "wall_s" not in run:   # what the run did before it stopped (stats counts it)
            run.update(_run_stats(writer.counters, time.perf_counter() - start))
        _record_failure(config, manifest, run, exc, log)
        raise
    log(f"{label}: {summary_line(this_run, wall, config.dry_run)}")
    for line in mf.budget_lines(run.get("tree_budget", [])):
        log(f"{label}: {line}")
    log(f"{label}: table {totals['output_rows']}/{plan.num_rows} ids "
        f"({totals['ok']} ok, {totals['error']} error) -> {config.output} [{run['status']}]")
    return {"status": run["status"], "run": this_run, "counts": totals}
