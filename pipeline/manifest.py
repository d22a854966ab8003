"""The `_run.json` manifest at the output root: configuration, model hashes, versions, runs, counts.

Written to a temporary name then renamed, so a reader never sees half a file. It never holds
credentials: only the S3 endpoint URL, which the CLI refuses if it carries user:password.
"""
from __future__ import annotations

import hashlib
import json
import platform
import posixpath
import time
from importlib import metadata

import pyarrow.fs as pafs

from pipeline.layout import MANIFEST_NAME
from workers import storage

PACKAGES = ("specllava", "torch", "transformers", "ray", "pyarrow", "pillow", "tokenizers", "safetensors")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hash_model_dir(uri: str, s3_endpoint: str | None = None) -> dict:
    """{"sha256": digest over (relative path, sha256 of content) of every file, "files": n, "bytes": n}.

    Reads every byte (a 7B checkpoint takes tens of seconds); the digest is what a resumed run
    compares to refuse mixing captions from different weights.
    """
    fs, root = storage.resolve(uri, s3_endpoint)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model directory not found: {uri}")
    if fs.get_file_info(posixpath.join(root, "config.json")).type != pafs.FileType.File:
        raise FileNotFoundError(f"not a model directory (no config.json): {uri}")
    entries = sorted((e for e in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                      if e.type == pafs.FileType.File), key=lambda e: e.path)
    outer = hashlib.sha256()
    total = 0
    for entry in entries:
        rel = entry.path[len(root):].lstrip("/")
        if rel.startswith(".") or "/." in rel:
            continue
        inner = hashlib.sha256()
        with fs.open_input_stream(entry.path) as stream:
            while chunk := stream.read(8 << 20):
                inner.update(chunk)
        total += entry.size or 0
        outer.update(f"{rel}\0{inner.hexdigest()}\n".encode())
    return {"sha256": outer.hexdigest(), "files": len(entries), "bytes": total}


def listing_fingerprint(uri: str, s3_endpoint: str | None = None) -> str:
    """sha256 over (relative path, size, last-modified) of every file: one listing, no reads.
    An object overwritten in place gets a new last-modified time, so a changed model changes it."""
    fs, root = storage.resolve(uri, s3_endpoint)
    entries = sorted((e for e in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                      if e.type == pafs.FileType.File), key=lambda e: e.path)
    digest = hashlib.sha256()
    for e in entries:
        digest.update(f"{e.path[len(root):].lstrip('/')}\0{e.size}\0{e.mtime_ns}\n".encode())
    return digest.hexdigest()


def read_manifest(output: str, s3_endpoint: str | None = None) -> dict | None:
    fs, root = storage.resolve(output, s3_endpoint)
    path = posixpath.join(root, MANIFEST_NAME)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def write_manifest(output: str, manifest: dict, s3_endpoint: str | None = None) -> None:
    fs, root = storage.resolve(output, s3_endpoint)
    fs.create_dir(root, recursive=True)
    final = posixpath.join(root, MANIFEST_NAME)
    storage.write_bytes_atomic(fs, final, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")


def budget_lines(reports: list[dict]) -> list[str]:
    """What the run's end and `stats` print of the actors' reports: the table each ended with, and
    each re-measure (why, and what it chose)."""
    lines = []
    for report in reports:
        lines.append(f"tree budget of actor {report['actor']} ({report['device']}): {report['budget']}")
        for n, again in enumerate(report.get("remeasures") or [], start=1):
            lines.append(f"  measured again ({n}) because {again['reason']}: {again['budget']}")
    return lines
