"""Resolve local paths and s3:// URIs to a pyarrow filesystem.

pyarrow's native S3FileSystem reads Parquet much faster than s3fs wrapped by Ray. Credentials
come from the usual AWS environment/config chain and are never logged or stored.

Retries: every client made here retries a failed request S3_MAX_ATTEMPTS times in all, with the
AWS SDK's standard jittered exponential backoff (a store that is away for a few seconds is ridden
out; an unreachable endpoint fails after ~5-30 s instead of ~2 s). pyarrow does not pickle the
retry strategy, so a filesystem shipped to Ray tasks falls back to pyarrow's 3 attempts there;
Ray Data's read, write and checkpoint tasks retry on top (DataContext.retried_io_errors, 10
attempts, 1..32 s backoff), see docs/reliability.md.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS = 5


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3FileSystem; `endpoint` (e.g. http://127.0.0.1:5000) selects an S3-compatible store."""
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"--s3-endpoint must look like http://host:port, got {endpoint!r}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        kwargs["allow_bucket_creation"] = True
    kwargs["region"] = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)


IO_RETRY_DELAYS_S = (1, 2, 4, 8, 16)  # after pyarrow's own attempts: rides out ~30 s of store outage


def retry_io(fn, *args, delays=IO_RETRY_DELAYS_S, **kwargs):
    """`fn(*args, **kwargs)`, retried on OSError (a store away for a while) after each of `delays`
    seconds; the last error is raised. For whole operations that are safe to repeat (a read, an
    idempotent write of a complete object). FileNotFoundError is not retried."""
    import time

    for delay in (*delays, None):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except OSError:
            if delay is None:
                raise
            time.sleep(delay)


def write_atomic(fs: pafs.FileSystem, path: str, write) -> None:
    """`write(target)` writes a complete file; readers of `path` never see it half-written.

    On an object store an object becomes visible only once its upload completes, so it is
    written in place (one PUT, no copy). On a local disk it goes to a hidden temporary beside
    `path` (`.<name>.tmp<pid>-<thread>`) and is renamed.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        write(path)
        return
    import threading

    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp{os.getpid()}-{threading.get_ident()}"
    write(tmp)
    fs.move(tmp, path)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """`data` as the whole file at `path`, atomically (write_atomic)."""
    def write(target: str) -> None:
        with fs.open_output_stream(target) as stream:
            stream.write(data)
    write_atomic(fs, path, write)


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3://bucket/prefix URI."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 URI has no bucket: {uri!r}")
        return s3_filesystem(s3_endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def fetch_bytes(uri: str, s3_endpoint: str | None = None, max_bytes: int | None = None,
                filesystems: dict | None = None) -> bytes:
    """Read one object (s3://bucket/key, http(s)://..., or a local path) into memory.

    Raises FileNotFoundError when it does not exist and ValueError when it is larger than
    `max_bytes` (checked from the listing or Content-Length before the body is read, and while
    reading). `filesystems` is an optional cache {key: filesystem} so a stage reading thousands of
    URIs builds one client.
    """
    if is_http(uri):
        return fetch_http(uri, max_bytes)
    key = "s3" if is_s3(uri) else "local"
    if filesystems is not None and key in filesystems:
        fs = filesystems[key]
        path = resolve(uri, s3_endpoint)[1] if key == "local" else _s3_path(uri)
    else:
        fs, path = resolve(uri, s3_endpoint)
        if filesystems is not None:
            filesystems[key] = fs
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such object: {uri}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"not a file: {uri}")
    if max_bytes is not None and info.size is not None and info.size > max_bytes:
        raise ValueError(f"object is {info.size} bytes, over the {max_bytes}-byte limit: {uri}")
    with fs.open_input_stream(path) as stream:
        return stream.read()


# http(s) image URIs (web crawls, presigned URLs): one request at a time per preprocess actor,
# so the concurrency is the number of those actors; each request has a timeout and is retried
# on network errors, 429 and 5xx.
HTTP_TIMEOUT_S = 20.0
HTTP_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
HTTP_USER_AGENT = "specllava/0.2 (image captioning)"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(uri: str) -> str:
    """scheme://host/path only: no user:password@, no query (presigned URLs carry signatures there)."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        return uri  # a local path
    host = parsed.hostname or ""
    if parsed.port:
        host += f":{parsed.port}"
    return f"{parsed.scheme}://{host}{parsed.path}"


def fetch_http(uri: str, max_bytes: int | None = None) -> bytes:
    import urllib.error
    import urllib.request

    shown = redact(uri)
    for delay in (*HTTP_RETRY_DELAYS_S, None):
        try:
            request = urllib.request.Request(uri, headers={"User-Agent": HTTP_USER_AGENT})
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                size = response.headers.get("Content-Length")
                if max_bytes is not None and size is not None and size.isdigit() and int(size) > max_bytes:
                    raise ValueError(f"object is {size} bytes, over the {max_bytes}-byte limit: {shown}")
                data = response.read(max_bytes + 1 if max_bytes is not None else -1)
                if max_bytes is not None and len(data) > max_bytes:
                    raise ValueError(f"object is over the {max_bytes}-byte limit: {shown}")
                return data
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(f"no such object (HTTP {exc.code}): {shown}") from None
            if exc.code != 429 and exc.code < 500 or delay is None:
                raise ValueError(f"HTTP {exc.code} for {shown}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if delay is None:
                reason = getattr(exc, "reason", exc)
                raise ValueError(f"cannot fetch {shown}: {reason}") from None
        import time
        time.sleep(delay)
    raise AssertionError("unreachable")


def _s3_path(uri: str) -> str:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def list_parquet_files(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """All *.parquet files under a local dir / S3 prefix (or the single file named), sorted.

    Names starting with '_' or '.' are skipped (markers, checkpoints, hidden files), as
    pyarrow.dataset does.
    """
    fs, path = resolve(uri, s3_endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return fs, [path]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = entry.path[len(path):].lstrip("/")
        if entry.type != pafs.FileType.File or not rel.endswith(".parquet"):
            continue
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        files.append(entry.path)
    return fs, sorted(files)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def local_copy(uri: str, s3_endpoint: str | None = None, cache_dir: str | None = None,
               skip_weights: bool = False) -> str:
    """A local directory holding `uri`'s files: the path itself when local, else a cached copy.

    S3 model directories are copied once to `cache_dir` (default $SPECLLAVA_MODEL_CACHE or ~/.cache/specllava/models)
    under a name derived from the URI *and the listing* (each file's path, size and last-modified
    time), so a model overwritten in place on S3 gets a fresh copy instead of the stale one (the
    run's manifest hashes the S3 files; loading an older local copy would break that record).
    The copy is made in a temporary directory and renamed into place, so a copy killed mid-way
    is never used. One process per node copies: the others (8 caption actors of an 8-GPU node)
    wait on a lock file beside the copy and then use it, so a node downloads a model once.
    `skip_weights` copies only the small files (configs, tokenizer, processor), for stages that
    need the processor only. Superseded copies are left in the cache.
    """
    if not is_s3(uri):
        return os.path.abspath(os.path.expanduser(uri))
    import hashlib

    cache_dir = (cache_dir or os.environ.get("SPECLLAVA_MODEL_CACHE")
                 or os.path.join(os.path.expanduser("~"), ".cache", "specllava", "models"))
    fs, path = resolve(uri, s3_endpoint)
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = entry.path[len(path):].lstrip("/")
        if entry.type == pafs.FileType.File and not (skip_weights and rel.endswith(WEIGHT_SUFFIXES)):
            files.append((rel, entry))
    files.sort(key=lambda item: item[0])
    listing = "".join(f"{rel}\0{e.size}\0{e.mtime_ns}\n" for rel, e in files)
    name = hashlib.sha256(f"{s3_endpoint or ''}|{uri}|{skip_weights}|{listing}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, name)
    if os.path.isdir(target):
        return target
    import fcntl

    os.makedirs(cache_dir, exist_ok=True)
    lock_path = f"{target}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.isdir(target):          # another process on this node copied it while we waited
            return target
        _copy_listed(fs, files, target)
        # The lock file goes once the copy exists: anyone still waiting on it (or opening it
        # now) checks for the copy first, and finds it.
        os.unlink(lock_path)
    return target


def _copy_listed(fs, files: list, target: str) -> None:
    import shutil

    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    local = pafs.LocalFileSystem()
    for rel, entry in files:
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        pafs.copy_files(entry.path, os.path.join(tmp, rel), source_filesystem=fs, destination_filesystem=local)
    try:
        os.rename(tmp, target)
    except OSError:  # another process renamed its complete copy first
        shutil.rmtree(tmp, ignore_errors=True)
