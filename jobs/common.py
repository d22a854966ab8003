"""What the `specllava` commands share: the user-error type, the demo pair's place, the dtype
flag, and the options of `caption` (which `submit` and `resume --submit` reuse).

One home for each of these facts: the command modules import them from here, never from each
other (so `caption` and `submit` do not import one another).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_PAIR_DIR = "assets/demo-pair"            # relative to the project (a job's working_dir too)
DEMO_PAIR = PROJECT_ROOT / DEMO_PAIR_DIR       # target/ and draft/ of the shipped demo pair


# True only in the `specllava` program itself (jobs.cli.program), never in a library call or a test
# calling jobs.cli.main: only the program may take over the process's descriptor 2 (the filter of
# Ray's native console noise, pipeline/console.py).
OWN_CONSOLE = False


class UserError(Exception):
    """An error the user can fix (bad argument, missing path): printed as one line, exit code 2."""


# --- numeric options ------------------------------------------------------------------------

def _fmt(value: float) -> str:
    return f"{value:g}"


def number(kind=int, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False):
    """An argparse `type=` for a number in a range. Its error states the rule only; argparse adds
    the option and jobs.cli prints one line, e.g. `--batch-size must be >= 1, got 0`."""
    if low is not None and high is not None:
        rule = f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        rule = f"{'>' if low_open else '>='} {_fmt(low)}"
    elif high is not None:
        rule = f"{'<' if high_open else '<='} {_fmt(high)}"
    else:
        rule = ""
    noun = "an integer" if kind is int else "a number"

    def convert(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + rule if rule else ''}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) \
                or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"must be {rule or 'finite'}, got {text}")
        return value

    convert.__name__ = f"{kind.__name__} {rule}".strip()  # what argparse would show for a bare failure
    return convert


POSITIVE_INT = number(int, 1)             # counts and sizes: >= 1
COUNT = number(int, 0)                    # >= 0
NONNEGATIVE = number(float, 0.0)          # CPUs, GPUs, seconds, temperature: >= 0
POSITIVE = number(float, 0.0, low_open=True)


# --- models ---------------------------------------------------------------------------------

def default_model(role: str) -> str:
    """The demo pair's `role` ("target" or "draft") directory, or a UserError saying what to pass."""
    path = DEMO_PAIR / role
    if not (path / "config.json").exists():
        raise UserError(f"no --{role} given and the demo pair is missing ({path}); "
                        f"pass --target DIR and --draft DIR (local dirs or s3:// prefixes)")
    return str(path)


def relocated_demo_model(path: str | None, role: str) -> str | None:
    """A run that used the demo pair from another copy of the project (a Ray job's working_dir,
    gone after the job) resumes with this copy's demo pair; the weights hash in _run.json still
    has to match, so this can never mix models."""
    if path and "://" not in path and not Path(path).exists() and Path(path).parts[-3:] == \
            (*Path(DEMO_PAIR_DIR).parts[-2:], role):
        return str(DEMO_PAIR / role)
    return path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_dtype_argument(p, flag: str = "--dtype", *, default: str, auto: bool = False, help: str = "") -> None:
    """A dtype flag in the one vocabulary of decoding.loading (float32, bfloat16, float16; fp32,
    bf16, fp16 accepted as aliases; `auto` where the device decides)."""
    from decoding.dtypes import DTYPE_NAMES, canonical_dtype

    choices = (["auto"] if auto else []) + list(DTYPE_NAMES)
    p.add_argument(flag, type=canonical_dtype, choices=choices, default=default,
                   metavar="{" + ",".join(choices) + "}", help=help or None)


# --- caption options ------------------------------------------------------------------------

def parse_actors(text: str) -> tuple[int, int | None]:
    """`--actors N`, `MIN,MAX` or `auto` as (min, max); max None = one actor per GPU of the cluster."""
    if text.strip().lower() == "auto":
        return 1, None
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--actors takes N or MIN,MAX (or auto), got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise UserError(f"--actors takes N or MIN,MAX (or auto), got {text!r}")


TREE_FLAGS = {"tree_top_k": "top_k", "tree_frontier": "frontier", "tree_depth": "max_depth",
              "tree_nodes": "max_nodes", "tree_threshold": "threshold"}


def tree_options(args) -> dict:
    """The decoding.TreeConfig fields given as --tree-* flags."""
    return {field: getattr(args, arg) for arg, field in TREE_FLAGS.items() if getattr(args, arg) is not None}


def add_caption_arguments(p, *, address: bool = True) -> None:
    """The options of `caption` (shared with `submit`, which runs `caption` as a Ray job)."""
    p.add_argument("--input", required=True, help="Parquet shards: local dir/file or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="output dir or s3:// prefix (data/, _plan.parquet, _run.json)")
    p.add_argument("--target", help=f"target LLaVA checkpoint dir or s3:// prefix (default: {DEMO_PAIR_DIR}/target)")
    p.add_argument("--draft", help=f"draft LLaVA checkpoint dir or s3:// prefix (default: {DEMO_PAIR_DIR}/draft)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 "
                   "(credentials come from the usual AWS env/config, never from flags)")
    p.add_argument("--id-column", default="id", help="unique id column (default: id)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--image-column", default="image", help="column of image bytes (default: image)")
    images.add_argument("--image-uri-column", help="column of image URIs (s3://..., http(s)://... or paths) "
                        "instead of bytes")
    p.add_argument("--prompt", help="prompt for rows without a 'prompt' column value")
    p.add_argument("--actors", default="auto", help="caption actors: auto (one per GPU the cluster has, "
                   "at least 1), N, or MIN,MAX (an autoscaling pool); default auto")
    p.add_argument("--gpus-per-actor", type=NONNEGATIVE, default=None, help="default 1 when Ray sees GPUs, else 0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when the cluster has GPUs; cpu: decode on CPU even next to GPUs (default auto)")
    p.add_argument("--cpus-per-actor", type=NONNEGATIVE, default=1.0, help="default 1")
    p.add_argument("--stage-cpus", type=POSITIVE, default=0.5, help="CPUs per read/preprocess/write task or actor "
                   "(default 0.5)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="rows decoding together per actor; new "
                   "rows join as others finish (default 8)")
    p.add_argument("--kv-memory-gb", type=POSITIVE, default=None, help="KV cache memory per caption actor (GiB): "
                   "its pools are allocated once and a row joins only when its whole decode fits, so --batch-size "
                   "becomes an upper bound (default: 90%% of the GPU memory free after the weights; on a CPU no "
                   "plan, the cache grows as rows need)")
    p.add_argument("--max-concurrent-batches", type=POSITIVE_INT, default=8, help="input batches in flight per caption "
                   "actor, so finished rows are replaced at once; 1 = no continuous batching (default 8)")
    from pipeline.config import DEFAULT_COMMIT_ROWS

    p.add_argument("--commit-rows", type=POSITIVE_INT, default=DEFAULT_COMMIT_ROWS,
                   help=f"rows per committed output file, independent of --batch-size: a kill loses at most "
                   f"the units in flight (default {DEFAULT_COMMIT_ROWS:,})")
    p.add_argument("--dry-run", action="store_true", help="read, decode and check every image, commit and "
                   "write ok/error rows with empty captions; no model (size a dataset, find bad images)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="default 64")
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy, exactly the target's output "
                   "(default 0)")
    p.add_argument("--top-p", type=number(float, 0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--top-k", type=COUNT, default=None, help="sampling top-k (default: the target's generation "
                   "config, as generate applies it; transformers' 50 when unset); 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: a row's caption then depends only on "
                   "(seed, row id), in any batch, actor or resume")
    add_dtype_argument(p, default="auto", auto=True, help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--tree-top-k", type=POSITIVE_INT, help="children per expanded draft node (default 4)")
    p.add_argument("--tree-frontier", type=POSITIVE_INT, help="nodes expanded per draft level (default 4)")
    p.add_argument("--tree-depth", type=POSITIVE_INT, help="draft levels per step (default 6)")
    p.add_argument("--tree-nodes", type=POSITIVE_INT, help="tree size verified per step (default 24)")
    p.add_argument("--tree-budget", default="auto", choices=["auto", "off"], help="auto: each caption actor "
                   "measures on its device which tree (or no drafting) is fastest at each active batch size up to "
                   "--batch-size, before its first batch; off: the --tree-* shape at every step (default auto)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="how each decode step runs "
                   "(decoding/graphs.py): on = static shapes and compiled step graphs (CUDA graphs on a GPU; the "
                   "first steps of each batch bucket compile, shown in the actor's start-up log), off = op by op; "
                   "auto = on for CUDA, off on a CPU, where compiling does not pay (docs/benchmarks.md)")
    p.add_argument("--tree-threshold", type=number(float, 0.0, 1.0, high_open=True),
                   help="do not expand frontier nodes below this draft path probability (the greedy chain "
                   "always is); saves no draft work, since every depth is drafted (default 0 = off)")
    add_progress_argument(p)
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs (Ray Data, workers) on the "
                   "console; otherwise they stay in Ray's session logs")
    if address:
        p.add_argument("--address", help="existing Ray cluster ('auto' or HOST:PORT; default: a local Ray "
                       "started on demand)")


def add_progress_argument(p) -> None:
    p.add_argument("--progress-every", type=NONNEGATIVE, default=10.0, help="seconds between progress lines when "
                   "output is not a terminal (Ray jobs, logs; a terminal gets a live bar); 0 = none (default 10)")


# Set by `specllava submit` on the job's driver: the dashboard the job was submitted to, so that
# the driver's hints say `specllava resume OUTPUT --submit [--address ...]`.
JOB_DASHBOARD_ENV = "SPECLLAVA_JOB_DASHBOARD"


def public_endpoint(endpoint: str | None) -> str | None:
    """An S3 endpoint fit to print: any user:password@ part of the URL dropped."""
    if not endpoint or "@" not in endpoint:
        return endpoint
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{host}" if sep else host


def resume_hint(output: str, s3_endpoint: str | None = None, *, submit: bool = False,
                address: str | None = None) -> str:
    """The `specllava resume` command line that continues a run, ready to paste: the endpoint the
    run used (credentials never), and for a Ray job `--submit` plus a non-default dashboard."""
    import shlex

    argv = ["specllava", "resume", output]
    if submit:
        argv.append("--submit")
    if public_endpoint(s3_endpoint):
        argv += ["--s3-endpoint", public_endpoint(s3_endpoint)]
    if address and address != default_address():
        argv += ["--address", address]
    return shlex.join(argv)


# --- Ray jobs -------------------------------------------------------------------------------

def default_address() -> str:
    """The Ray dashboard the job commands talk to."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"


def add_address_argument(p) -> None:
    p.add_argument("--address", default=None, help="Ray dashboard address "
                   "(default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")


def add_job_arguments(p, *, address: bool = True) -> None:
    """Options of commands that submit a Ray job (`submit`, `resume --submit`)."""
    if address:
        add_address_argument(p)
    p.add_argument("--working-dir", default=str(PROJECT_ROOT), help="directory uploaded as the job's "
                   "working_dir (default: this project); 'none' when the cluster has specllava installed")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("--submission-id", help="job id to use (default: Ray generates one)")
    p.add_argument("--entrypoint-num-cpus", type=NONNEGATIVE, default=0.0,
                   help="CPUs reserved for the job's driver (default 0)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it SUCCEEDED")


