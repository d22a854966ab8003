"""`specllava caption` and `specllava resume`: batch-caption Parquet shards with the Ray Data pipeline.

    specllava caption --input s3://bucket/shards --output s3://bucket/captions --s3-endpoint http://host:9000
    specllava resume s3://bucket/captions --s3-endpoint http://host:9000

Exit code 0 when the run finished (every input id in the table exactly once, error rows
included); 2 for a user error before any work; 1 when the run did not finish.
"""
from __future__ import annotations

from pathlib import Path

from jobs.cli import UserError

DEMO_PAIR = Path(__file__).resolve().parent.parent / "assets" / "demo-pair"


def _actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--actors takes N or MIN,MAX, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise UserError(f"--actors takes N or MIN,MAX, got {text!r}")


def _tree_options(args) -> dict:
    names = {"tree_top_k": "top_k", "tree_frontier": "frontier", "tree_depth": "max_depth",
             "tree_nodes": "max_nodes", "tree_threshold": "threshold"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def _default_model(role: str) -> str:
    path = DEMO_PAIR / role
    if not (path / "config.json").exists():
        raise UserError(f"no --{role} given and the demo pair is missing ({path}); "
                        f"pass --target DIR and --draft DIR (local dirs or s3:// prefixes)")
    return str(path)


def _relocated_demo_model(path: str | None, role: str) -> str | None:
    """A run that used the demo pair from another copy of the project (a Ray job's working_dir,
    gone after the job) resumes with this copy's demo pair; the weights hash in _run.json still
    has to match, so this can never mix models."""
    if path and "://" not in path and not Path(path).exists() and Path(path).parts[-3:] == \
            ("assets", "demo-pair", role):
        return str(DEMO_PAIR / role)
    return path


def add_caption_arguments(p, *, address: bool = True) -> None:
    """The options of `caption` (shared with `submit`, which runs `caption` as a Ray job)."""
    p.add_argument("--input", required=True, help="Parquet shards: local dir/file or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="output dir or s3:// prefix (data/, _checkpoint/, _run.json)")
    p.add_argument("--target", help="target LLaVA checkpoint dir or s3:// prefix (default: assets/demo-pair/target)")
    p.add_argument("--draft", help="draft LLaVA checkpoint dir or s3:// prefix (default: assets/demo-pair/draft)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 "
                   "(credentials come from the usual AWS env/config, never from flags)")
    p.add_argument("--id-column", default="id", help="unique id column (default: id)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--image-column", default="image", help="column of image bytes (default: image)")
    images.add_argument("--image-uri-column", help="column of image URIs (s3://... or paths) instead of bytes")
    p.add_argument("--prompt", help="prompt for rows without a 'prompt' column value")
    p.add_argument("--actors", default="1", help="caption actors: N or MIN,MAX (autoscaling; default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 when Ray sees GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="default 1")
    p.add_argument("--stage-cpus", type=float, default=0.5, help="CPUs per read/preprocess/write task or actor "
                   "(default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, exactly the target's output "
                   "(default 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed per actor (temperature > 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: float16 on GPU, float32 on CPU")
    p.add_argument("--tree-top-k", type=int, help="children per expanded draft node (default 4)")
    p.add_argument("--tree-frontier", type=int, help="nodes expanded per draft level (default 4)")
    p.add_argument("--tree-depth", type=int, help="draft levels per step (default 6)")
    p.add_argument("--tree-nodes", type=int, help="tree size verified per step (default 24)")
    p.add_argument("--tree-threshold", type=float, help="drop children below this draft probability "
                   "(default 0.05)")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines when "
                   "output is not a terminal (Ray jobs, logs); 0 = none (default 10)")
    if address:
        p.add_argument("--address", help="existing Ray cluster ('auto' or HOST:PORT; default: a local Ray "
                       "started on demand)")
    p.add_argument("--debug-batch-delay", type=float, default=0.0, help=argparse_suppress())


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
    r.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines "
                   "when output is not a terminal; 0 = none (default 10)")
    from jobs.submit import add_job_arguments
    add_job_arguments(r, address=False)
    r.set_defaults(func=run_resume_command)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def run_caption_command(args) -> int:
    from pipeline.config import CaptionConfig, PipelineError

    amin, amax = _actors(args.actors)
    try:
        config = CaptionConfig(
            input=args.input, output=args.output,
            target=args.target or _default_model("target"), draft=args.draft or _default_model("draft"),
            s3_endpoint=args.s3_endpoint, id_column=args.id_column,
            image_column=None if args.image_uri_column else args.image_column,
            image_uri_column=args.image_uri_column,
            **({"prompt": args.prompt} if args.prompt else {}),
            actors_min=amin, actors_max=amax,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor, stage_cpus=args.stage_cpus, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, tree=_tree_options(args), dtype=args.dtype, address=args.address,
            batch_delay_s=args.debug_batch_delay)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    return _run(config, args.progress_every, debug=getattr(args, "debug", False))


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
    try:
        # The address is where this resume runs, and test drills' delays are not carried over.
        saved = dict(previous["config"], address=args.address, output=args.output, batch_delay_s=0.0)
        for role in ("target", "draft"):
            saved[role] = _relocated_demo_model(saved.get(role), role)
        config = CaptionConfig.from_dict(saved, s3_endpoint=args.s3_endpoint)
    except (PipelineError, TypeError) as exc:
        raise UserError(f"cannot resume from {args.output}/_run.json: {exc}") from None
    return _run(config, args.progress_every, debug=getattr(args, "debug", False))


def _run(config, progress_every: float = 10.0, debug: bool = False) -> int:
    import signal
    import sys

    from pipeline.config import PipelineError
    from pipeline.progress import CheckpointProgress
    from pipeline.run import run_caption

    if not sys.stdout.isatty():
        # Logs and Ray jobs get one progress line every `progress_every` s instead of Ray Data's bars.
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False
    else:
        progress_every = 0
    try:
        with CheckpointProgress(config.output, config.s3_endpoint, every_s=progress_every):
            summary = run_caption(config)
    except PipelineError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"specllava: interrupted; `specllava resume {config.output}` continues the run "
              "(committed rows are kept)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run: one line (recorded in _run.json), exit 1
        if debug:
            raise
        from pipeline.schema import one_line
        print(f"specllava: run failed: {one_line(exc, 500)}\n  recorded in {config.output}/_run.json; "
              f"fix the cause and `specllava resume {config.output}` (--debug for the traceback)", file=sys.stderr)
        return 1
    except SystemExit as exc:
        # Ray's driver turns SIGTERM (`specllava stop`, `ray job stop`) into SystemExit(15);
        # run_caption has recorded the run as failed in _run.json by now.
        if exc.code == signal.SIGTERM:
            print(f"specllava: stopped by SIGTERM; `specllava resume {config.output}` continues the run",
                  file=sys.stderr)
        raise
    return 0 if summary["status"] == "finished" else 1
