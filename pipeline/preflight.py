"""Checks a caption run makes before it reads the input or starts any actor.

Each raises PipelineError with one line the user can act on (the CLI prints it and exits 2),
instead of a traceback from deep inside pyarrow or a run that fails inside a Ray actor. They run
cheapest first (`check_run`), all before Ray starts:

- `plan.check_input`: the input lists Parquet files and the first one has the columns asked for
  (a missing column's error suggests the flag for each column that could be it); on a resume
  (the output has its plan) only the listing, so committed shards are never read;

- `check_models`: both model directories exist, hold safetensors weights, ask for no remote code
  (auto_map in any config, tokenizer or processor file), and the draft can decode with the
  target (config-level pair checks and, when the draft ships one, an identical tokenizer).
  Reads only small files; s3:// prefixes are listed and their small files copied to the local
  model cache (storage.local_copy, skip_weights: the copy the preprocess stage uses for the
  target). No weights are loaded.
- `check_output_location`: the output's bucket exists (an S3 output is never a new bucket
  created by accident) or a local output's nearest existing parent is a writable directory.
  Writes nothing, so a run refused for another reason leaves no trace in the output.
- `check_output_writable`: the above, then a tiny probe object written under the output
  prefix and deleted: run just before the first real write.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from workers import storage
from pipeline.config import CaptionConfig, PipelineError
from workers.schema import one_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_run(config: CaptionConfig) -> None:
    """Everything checkable before the input is scanned, cheapest first: no credentials in a path,
    the input's listing and first schema, the output location, then the models."""
    from pipeline.plan import check_input

    for option in ("input", "output", "target", "draft"):
        if getattr(config, option):
            check_no_credentials(option, getattr(config, option))
    # Cheapest first: a wrong path or column is known in about a second. An output with a saved
    # plan (a resume) had its columns checked when it started; reading a shard now could touch
    # input that is fully committed and never read again (it may be gone or archived).
    check_input(config, read_schema=not _has_plan(config))
    check_output_location(config.output, config.s3_endpoint)
    if not config.dry_run:
        check_models(config.target, config.draft, config.s3_endpoint)


def _has_plan(config: CaptionConfig) -> bool:
    from pipeline.layout import PLAN_NAME

    try:
        fs, root = storage.resolve(config.output, config.s3_endpoint)
        return fs.get_file_info(posixpath.join(root, PLAN_NAME)).type == pafs.FileType.File
    except (OSError, ValueError):
        return False


def check_no_credentials(option: str, uri: str) -> None:
    """Refuse s3://KEY:SECRET@bucket/... (a form pyarrow accepts): the path would be echoed in
    errors and stored in _run.json. The message names the option, never the value."""
    if storage.is_s3(uri) and "@" in urlparse(uri).netloc:
        raise PipelineError(f"--{option} must not contain credentials (user:secret@); use the AWS "
                            "environment or config files")


def _model_dir(role: str, uri: str, s3_endpoint: str | None) -> str:
    """A local directory with `uri`'s small files, after the file-level safety checks."""
    from decoding.errors import ModelPairError
    from decoding.loading import check_no_remote_code, check_weight_files

    try:
        fs, root = storage.resolve(uri, s3_endpoint)
        info = fs.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise PipelineError(f"model directory not found: {uri} (--{role})")
        names = [posixpath.basename(e.path) for e in fs.get_file_info(pafs.FileSelector(root))
                 if e.type == pafs.FileType.File]
        if "config.json" not in names:
            raise PipelineError(f"not a model directory (no config.json): {uri} (--{role})")
        check_weight_files(names, f"--{role} {uri}")
        local = storage.local_copy(uri, s3_endpoint, skip_weights=True)
        check_no_remote_code(local, where=f"--{role} {uri}")
    except PipelineError:
        raise
    except ModelPairError as exc:
        raise PipelineError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read --{role} {uri}: {one_line(exc, 300)}") from None
    return local


def check_models(target: str, draft: str, s3_endpoint: str | None = None) -> None:
    """Refuse model directories that are unsafe, incomplete or do not form a target/draft pair."""
    from transformers import AutoConfig, AutoTokenizer

    from decoding.errors import ModelPairError
    from decoding.families import adapter
    from decoding.models import check_pair_configs, check_tokenizers

    configs, tokenizers = {}, {}
    for role, uri in (("target", target), ("draft", draft)):
        local = _model_dir(role, uri, s3_endpoint)
        try:
            # Safe: check_no_remote_code refused any auto_map, and remote code stays off.
            configs[role] = AutoConfig.from_pretrained(local)
            if any(os.path.isfile(os.path.join(local, name)) for name in TOKENIZER_FILES):
                tokenizers[role] = AutoTokenizer.from_pretrained(local)
        except (OSError, ValueError, KeyError) as exc:
            raise PipelineError(f"cannot load --{role} {uri}: {one_line(exc, 300)}") from None
    try:
        check_pair_configs(configs["target"], configs["draft"])
        if len(tokenizers) == 2:
            check_tokenizers(tokenizers["target"], tokenizers["draft"],
                             text_draft=not adapter(configs["draft"]).multimodal)
    except ModelPairError as exc:
        raise PipelineError(f"--draft {draft} cannot decode with --target {target}: {exc}") from None


def check_output_location(uri: str, s3_endpoint: str | None = None) -> None:
    """The output can exist there: the bucket exists, or the nearest local parent is a writable dir."""
    try:
        fs, root = storage.resolve(uri, s3_endpoint)
        if storage.is_s3(uri):
            bucket = root.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise PipelineError(f"output bucket {bucket!r} does not exist: create it first, or fix "
                                    f"--output {uri}")
            if fs.get_file_info(root).type == pafs.FileType.File:
                raise PipelineError(f"--output {uri} is an object, not a prefix")
            return
    except PipelineError:
        raise
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot reach --output {uri}: {one_line(exc, 300)}") from None
    path = root
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise PipelineError(f"--output {uri}: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PipelineError(f"--output {uri}: {path} is not writable")


def check_output_writable(uri: str, s3_endpoint: str | None = None) -> None:
    """check_output_location, then write and delete a probe object under the output prefix.

    Catches what the location check cannot see: an S3 policy or read-only mount refusing writes
    (root ignores permission bits, not a read-only or immutable directory).
    """
    check_output_location(uri, s3_endpoint)
    fs, root = storage.resolve(uri, s3_endpoint)
    probe = posixpath.join(root, f"_write_probe-{uuid.uuid4().hex}")
    try:
        if not storage.is_s3(uri):
            # S3 needs no directories; create_dir there could create a missing bucket.
            fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"specllava write probe\n")
        fs.delete_file(probe)
    except OSError as exc:
        raise PipelineError(f"cannot write to --output {uri}: {one_line(exc, 300)}; check the path and "
                            "your write permissions") from None
