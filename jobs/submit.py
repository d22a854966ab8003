"""Ray Jobs: run `caption` / `resume` on a cluster and follow it from a terminal.

    specllava submit --address http://HEAD:8265 --input s3://b/shards --output s3://b/captions
    specllava status ID | logs ID [--follow] | stop ID | list        (each with --address)

`submit` takes the same options as `caption` and runs `python -m jobs.cli caption ...` on the
cluster as a Ray job whose working_dir is this project (the code and the demo pair travel with
it; the cluster needs the same Python dependencies installed). Local relative paths are made
absolute, which is right for a one-machine cluster; on a real cluster use s3:// URIs.

Credentials are never sent with the job: the cluster's nodes read S3 credentials from their own
environment, instance role or AWS config, like any Ray Data job.

The dashboard address defaults to $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from jobs.common import (DEMO_PAIR_DIR, UserError, add_address_argument, add_caption_arguments,
                         add_job_arguments, default_address, parse_actors, public_endpoint, resume_hint)
from jobs.common import JOB_DASHBOARD_ENV

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with the job (on top of .gitignore and .git, which Ray skips itself).
WORKING_DIR_EXCLUDES = ["venv", "specllava-demo", "**/__pycache__", "*.egg-info", ".pytest_cache", "tests",
                        "docs", "out", "runs", ".cache"]


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("submit", help="run `caption` on a Ray cluster as a Ray job",
                              description=__doc__.split("\n\n")[0] + " The job's options are those of "
                              "`caption`; the last line of stdout is the submission id.")
    add_caption_arguments(s, address=False)
    add_job_arguments(s)
    s.set_defaults(func=submit_command)

    for name, helptext, func in [("status", "print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, "
                                  "STOPPED)", status_command),
                                 ("logs", "print a job's logs", logs_command),
                                 ("stop", "stop a running job (its output stays resumable)", stop_command)]:
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument("submission_id", metavar="ID", help="submission id printed by `specllava submit`")
        add_address_argument(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="return without waiting for STOPPED")
        p.set_defaults(func=func)

    p = subparsers.add_parser("list", help="list the jobs on a Ray cluster", description="list Ray jobs")
    add_address_argument(p)
    p.add_argument("--all", action="store_true", help="include jobs not submitted by specllava")
    p.set_defaults(func=list_command)


def client(address: str | None):
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    from pipeline.run import use_local_auth_token

    address = address or default_address()
    use_local_auth_token()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({' '.join(str(exc).split())[:200]}); "
                        "start a cluster (`ray start --head`) or pass --address http://HEAD:8265") from None
    except RayError as exc:  # AuthenticationError: the cluster wants a token we do not have
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the Ray dashboard at {address} refused us ({first}); give the cluster's token "
                        "with RAY_AUTH_TOKEN or ~/.ray/auth_token") from None


def _job_call(what: str, fn, submission_id: str, address: str | None):
    try:
        return fn(submission_id)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if "404" in text or "does not exist" in text:
            raise UserError(f"no job {submission_id!r} at {address or default_address()} "
                            "(see `specllava list`)") from None
        raise UserError(f"cannot {what} job {submission_id}: {text[:300]}") from None


def _absolute(value: str | None) -> str | None:
    """Local paths become absolute (the job runs in its own working_dir); URIs are kept."""
    if value is None or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def caption_argv(args: argparse.Namespace) -> list[str]:
    """The `caption` flags equivalent to `args` (defaults omitted), for the job's entrypoint."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # never parses: lists the options
    add_caption_arguments(parser, address=False)
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or not action.option_strings:
            continue
        if action.dest in ("input", "output", "target", "draft"):
            value = _absolute(value)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def submit_job(args: argparse.Namespace, command: list[str], metadata: dict, needs_demo_pair: bool = True) -> int:
    """Submit `python -m jobs.cli COMMAND...` (plus `--address auto`) and print how to follow it."""
    import logging

    from workers.drill import drill_env

    address = args.address or default_address()
    # Only these kinds of variable travel: never credentials (the nodes have their own). The
    # dashboard's address lets the driver print `specllava resume ... --submit --address ...`.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", JOB_DASHBOARD_ENV: address, **drill_env()}}
    if args.working_dir.lower() != "none":
        root = Path(args.working_dir).expanduser().resolve()
        if not (root / "jobs" / "cli.py").is_file():
            raise UserError(f"--working-dir {root} is not the specllava project (no jobs/cli.py); "
                            "pass the project directory, or 'none' if the cluster has specllava installed")
        excludes = WORKING_DIR_EXCLUDES + ([] if needs_demo_pair else [DEMO_PAIR_DIR])
        runtime_env.update(working_dir=str(root), excludes=excludes)
    if not getattr(args, "debug", False):  # Ray's packaging logs a line per ignored file
        logging.getLogger("ray").setLevel(logging.ERROR)
    entrypoint = shlex.join([args.python, "-m", "jobs.cli", *command, "--address", "auto"])
    jobs = client(address)
    try:
        submission_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                        submission_id=args.submission_id,
                                        entrypoint_num_cpus=args.entrypoint_num_cpus or None,
                                        metadata={"specllava": "1", **metadata})
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"job submission to {address} failed: {' '.join(str(exc).split())[:300]}") from None
    flag = "" if address == default_address() else f" --address {address}"
    print(f"submitted {command[0]} job to {address}; follow it with:", file=sys.stderr)
    print(f"  specllava logs {submission_id} --follow{flag}", file=sys.stderr)
    print(f"  specllava status {submission_id}{flag}", file=sys.stderr)
    print(f"  specllava stop {submission_id}{flag}", file=sys.stderr)
    print(f"  dashboard: {address.rstrip('/')}/#/jobs/{submission_id}", file=sys.stderr)
    code = 0
    if args.wait:
        status = wait_for(jobs, submission_id, TERMINAL)
        print(f"job {submission_id}: {status}", file=sys.stderr)
        code = 0 if status == "SUCCEEDED" else 1
    print(submission_id, flush=True)
    return code


def wait_for(jobs, submission_id: str, states, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status in states or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def check_output_free(output: str, s3_endpoint: str | None) -> None:
    """Refuse (exit 2) before submitting when a live writer holds the output (pipeline/lease.py).
    The job's own driver takes the lease when it starts."""
    from pipeline.lease import LeaseHeld, check_free
    from workers.storage import resolve

    try:
        fs, root = resolve(output, s3_endpoint)
        check_free(fs, root, output)
    except LeaseHeld as exc:
        raise UserError(str(exc)) from None
    except (OSError, ValueError):
        return  # an unreadable output is the job's to report (pre-flight checks run there)


def submit_command(args) -> int:
    parse_actors(args.actors)  # validate cheap things here, not minutes later on the cluster
    check_output_free(args.output, args.s3_endpoint)
    return submit_job(args, ["caption", *caption_argv(args)], job_metadata(args),
                      needs_demo_pair=not (args.dry_run or (args.target and args.draft)))


def job_metadata(args) -> dict:
    """What `list` shows and `stop` needs for its resume hint (the endpoint without credentials)."""
    endpoint = public_endpoint(args.s3_endpoint)
    return {"output": args.output, **({"s3_endpoint": endpoint} if endpoint else {})}


def submit_resume(args) -> int:
    check_output_free(args.output, args.s3_endpoint)
    command = ["resume", args.output]
    if args.s3_endpoint:
        command += ["--s3-endpoint", args.s3_endpoint]
    if args.progress_every != 10.0:
        command += ["--progress-every", str(args.progress_every)]
    if getattr(args, "verbose", False):
        command.append("--verbose")
    return submit_job(args, command, job_metadata(args))


def status_command(args) -> int:
    jobs = client(args.address)
    status = _job_call("read", jobs.get_job_status, args.submission_id, args.address)
    print(status.value)
    return 0


def logs_command(args) -> int:
    jobs = client(args.address)
    if not args.follow:
        sys.stdout.write(_job_call("read the logs of", jobs.get_job_logs, args.submission_id, args.address))
        return 0
    _job_call("read", jobs.get_job_status, args.submission_id, args.address)  # clear error if unknown

    import asyncio
    import os
    import signal

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(args.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    def interrupted(signum, frame):
        # Ctrl-C stops following at once; the job goes on. asyncio.run's own handler only cancels
        # the tail task, and that cancel did not always end Ray's log stream: a test's SIGINT left
        # the follow printing for 15 minutes. Nothing is left to clean up (every chunk is flushed).
        sys.stdout.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the websocket closed: cluster gone or dashboard restarted
        raise UserError(f"log stream of {args.submission_id} ended early ({' '.join(str(exc).split())[:200]}); "
                        "check `specllava status`") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def stop_command(args) -> int:
    jobs = client(args.address)
    stopped = _job_call("stop", jobs.stop_job, args.submission_id, args.address)
    if not stopped:
        status = jobs.get_job_status(args.submission_id).value
        print(f"job {args.submission_id} is already {status}")
        return 0
    status = "STOP REQUESTED" if args.no_wait else wait_for(jobs, args.submission_id, TERMINAL, timeout_s=60)
    print(f"job {args.submission_id}: {status}")
    meta = _job_metadata(jobs, args.submission_id)
    if meta.get("specllava") == "1" and meta.get("output"):
        address = args.address or default_address()
        print(f"its output stays resumable: "
              f"{resume_hint(meta['output'], meta.get('s3_endpoint'), submit=True, address=address)}")
    return 0


def _job_metadata(jobs, submission_id: str) -> dict:
    try:
        return dict(jobs.get_job_info(submission_id).metadata or {})
    except (RuntimeError, OSError, ValueError):
        return {}


def list_command(args) -> int:
    jobs = client(args.address)
    try:
        infos = jobs.list_jobs()
    except RuntimeError as exc:
        raise UserError(f"cannot list jobs: {' '.join(str(exc).split())[:300]}") from None
    rows = []
    for info in sorted(infos, key=lambda i: i.start_time or 0):
        meta = info.metadata or {}
        if not args.all and meta.get("specllava") != "1":
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) \
            if info.start_time else "-"
        what = info.entrypoint.split(" -m jobs.cli ", 1)[-1].split(" ", 1)[0] if meta.get("specllava") else "-"
        rows.append([info.submission_id or info.job_id or "-", str(info.status.value), started, what,
                     meta.get("output", info.entrypoint[:60])])
    from jobs.query import print_rows
    print_rows(["ID", "STATUS", "STARTED", "COMMAND", "OUTPUT"], rows)
    return 0
