"""`specllava caption` and `specllava resume`: batch-caption Parquet shards with the Ray Data pipeline.

    specllava caption --input s3://bucket/shards --output s3://bucket/captions --s3-endpoint http://host:9000
    specllava resume s3://bucket/captions --s3-endpoint http://host:9000

Exit code 0 when the run finished (every input id in the table exactly once, error rows
included); 2 for a user error before any work; 1 when the run did not finish.
"""
from __future__ import annotations

import os

from jobs.common import (UserError, add_caption_arguments, add_job_arguments, add_progress_argument,
                         default_model, parse_actors, relocated_demo_model, resume_hint, tree_options)
from jobs import common
from jobs.common import JOB_DASHBOARD_ENV


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption Parquet shards of images (Ray Data, resumable)",
                              description=__doc__.split("\n\n")[0])
    add_caption_arguments(p)
    p.set_defaults(func=run_caption_command)

    r = subparsers.add_parser("resume", help="continue a caption run from its output's _run.json")
    r.add_argument("output", help="the --output of the run to continue")
    r.add_argument("--s3-endpoint", help="S3-compatible endpoint (default: the one the run used)")
    r.add_argument("--address", help="existing Ray cluster for a local resume; with --submit, the Ray "
                   "dashboard (default http://127.0.0.1:8265)")
    r.add_argument("--submit", action="store_true", help="resume as a Ray job (like `specllava submit`)")
    add_progress_argument(r)
    r.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console")
    add_job_arguments(r, address=False)
    r.set_defaults(func=run_resume_command)


def run_caption_command(args) -> int:
    from pipeline.config import CaptionConfig, PipelineError

    amin, amax = parse_actors(args.actors)
    try:
        config = CaptionConfig(
            input=args.input, output=args.output,
            target=args.target or (None if args.dry_run else default_model("target")),
            draft=args.draft or (None if args.dry_run else default_model("draft")),
            s3_endpoint=args.s3_endpoint, id_column=args.id_column,
            image_column=None if args.image_uri_column else args.image_column,
            image_uri_column=args.image_uri_column,
            **({"prompt": args.prompt} if args.prompt else {}),
            actors_min=amin, actors_max=amax,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor, stage_cpus=args.stage_cpus, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, max_concurrent_batches=args.max_concurrent_batches,
            tree_budget=args.tree_budget, compile=args.compile, kv_memory_gb=args.kv_memory_gb, tree=tree_options(args), dtype=args.dtype, address=args.address,
            commit_rows=args.commit_rows, dry_run=args.dry_run, device=args.device)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    return _run(config, args.progress_every, debug=getattr(args, "debug", False), verbose=args.verbose)


def hint(config) -> str:
    """`specllava resume ...` for this run, as the user would paste it (from a Ray job: --submit)."""
    dashboard = os.environ.get(JOB_DASHBOARD_ENV)
    return resume_hint(config.output, config.s3_endpoint, submit=bool(dashboard), address=dashboard)


def run_resume_command(args) -> int:
    from pipeline.config import CaptionConfig, PipelineError
    from pipeline.manifest import read_manifest

    if args.submit:
        from jobs.submit import submit_resume
        return submit_resume(args)
    try:
        previous = read_manifest(args.output, args.s3_endpoint)
    except OSError as exc:
        raise UserError(f"cannot read {args.output}/_run.json: {exc}") from None
    if previous is None:
        raise UserError(f"{args.output} has no _run.json: nothing to resume (run `specllava caption` first)")
    if previous.get("status") == "finished":  # no Ray, no model hashing: a finished table is final
        counts = previous.get("counts") or {}
        print(f"specllava resume: nothing to do: {args.output} is finished "
              f"({counts.get('output_rows', '?')}/{counts.get('input_rows', '?')} ids)")
        return 0
    try:
        # The address is where this resume runs.
        saved = dict(previous["config"], address=args.address, output=args.output)
        for role in ("target", "draft"):
            saved[role] = relocated_demo_model(saved.get(role), role)
        config = CaptionConfig.from_dict(saved, s3_endpoint=args.s3_endpoint)
    except (PipelineError, TypeError) as exc:
        raise UserError(f"cannot resume from {args.output}/_run.json: {exc}") from None
    return _run(config, args.progress_every, debug=getattr(args, "debug", False), verbose=args.verbose,
                label="specllava resume")


def _run(config, progress_every: float = 10.0, debug: bool = False, verbose: bool = False,
         label: str = "specllava caption") -> int:
    import signal
    import sys

    from pipeline.config import PipelineError
    from pipeline.run import run_caption

    # A terminal gets one live bar; logs and Ray jobs a progress line every `progress_every` s.
    tty = sys.stdout.isatty() and progress_every > 0
    try:
        summary = run_caption(config, progress_every=0.0 if tty else progress_every, progress_tty=tty,
                              verbose=verbose, label=label, own_console=common.OWN_CONSOLE)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt as exc:
        if getattr(exc, "specllava_output_removed", False):
            print(f"{label}: interrupted before the first commit; {config.output}, which this run created, "
                  "was removed: run the same command again to start over", file=sys.stderr)
        else:
            print(f"{label}: interrupted; `{hint(config)}` continues the run "
                  "(committed rows are kept)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run: one line (recorded in _run.json), exit 1
        if debug:
            raise
        from workers.schema import one_line
        if getattr(exc, "specllava_output_removed", False):
            print(f"{label}: run failed: {one_line(exc, 500)}\n  nothing was committed, and {config.output}, "
                  "which this run created, was removed; fix the cause and run the same command again "
                  "(--debug for the traceback)", file=sys.stderr)
        else:
            print(f"{label}: run failed: {one_line(exc, 500)}\n  recorded in {config.output}/_run.json; "
                  f"fix the cause and `{hint(config)}` (--debug for the traceback)", file=sys.stderr)
        return 1
    except SystemExit as exc:
        # Ray's driver turns SIGTERM (`specllava stop`, `ray job stop`) into SystemExit(15);
        # run_caption has recorded the run as failed in _run.json by now.
        if exc.code == signal.SIGTERM:
            print(f"{label}: stopped by SIGTERM; `{hint(config)}` continues the run",
                  file=sys.stderr)
        raise
    return 0 if summary["status"] == "finished" else 1
