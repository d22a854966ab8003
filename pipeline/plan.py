"""The input plan: every row of the input gets a global index, and rows are committed in units.

Shards are taken in path order and rows in file order; row g (0-based over the whole input)
belongs to commit unit g // commit_rows. The plan is one row per Parquet row group:

    path, file_size, row_group, first_row (global index of its row 0), rows, bytes

built from the shards' footers (never their data) when a run starts on a new output, and saved
as OUTPUT/_plan.parquet. A resume loads it instead of reading footers again, lists the input to
check nothing changed (same paths and sizes), and reads only the row groups that hold rows of
units not yet committed: work and driver memory grow with shards and units, never with rows.
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import CaptionConfig, PipelineError
from pipeline.layout import PLAN_NAME
from workers import storage

PLAN_SCHEMA = pa.schema([
    pa.field("path", pa.string()), pa.field("file_size", pa.int64()), pa.field("row_group", pa.int32()),
    pa.field("first_row", pa.int64()), pa.field("rows", pa.int64()), pa.field("bytes", pa.int64()),
])


@dataclass
class InputPlan:
    groups: pa.Table              # PLAN_SCHEMA, one row per row group, in global row order
    commit_rows: int
    id_type: pa.DataType
    prompt_column: str | None

    @cached_property
    def num_rows(self) -> int:
        return int(pc.sum(self.groups.column("rows")).as_py() or 0) if self.groups.num_rows else 0

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.commit_rows)

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self.groups.column("path").to_pylist()))

    @cached_property
    def input_bytes(self) -> int:
        return int(pc.sum(self.groups.column("bytes")).as_py() or 0) if self.groups.num_rows else 0

    def unit_rows(self, unit: int) -> int:
        return unit_rows(unit, self.num_rows, self.commit_rows)

    def read_specs(self, done_units: set[int]) -> tuple[list[dict], int]:
        """Read specs (workers/read.py) for the rows of units not in `done_units`, and the bytes
        (compressed column chunks) of the row groups they name."""
        U = self.commit_rows
        pending = np.ones(self.num_units, dtype=bool)
        if done_units:
            pending[np.fromiter(done_units, dtype=np.int64)] = False
        specs: dict[str, dict] = {}
        total = 0
        for path, group, first, rows, nbytes in zip(*(self.groups.column(c).to_pylist() for c in
                                                      ("path", "row_group", "first_row", "rows", "bytes"))):
            if rows == 0:
                continue
            units = np.arange(first // U, (first + rows - 1) // U + 1)
            todo = units[pending[units]]
            if not len(todo):
                continue  # every row of this group is committed: never opened
            spec = specs.setdefault(path, {"path": path, "row_groups": [], "first_rows": [], "pending": []})
            spec["row_groups"].append(group)
            spec["first_rows"].append(first)
            for unit in todo.tolist():
                lo, hi = max(first, unit * U), min(first + rows, (unit + 1) * U)
                if spec["pending"] and spec["pending"][-1][1] == lo:
                    spec["pending"][-1][1] = hi
                else:
                    spec["pending"].append([lo, hi])
            total += nbytes
        return list(specs.values()), total


def unit_rows(unit: int, num_rows: int, commit_rows: int) -> int:
    """Rows in commit unit `unit` (the last one may be short)."""
    return max(0, min(commit_rows, num_rows - unit * commit_rows))


def _footer(fs, path: str, columns: list[str]):
    pf = pq.ParquetFile(path, filesystem=fs)
    meta = pf.metadata
    schema = pf.schema_arrow
    groups = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        chunk_bytes = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                          if rg.column(c).path_in_schema.split(".")[0] in columns)
        groups.append((g, rg.num_rows, chunk_bytes if rg.num_rows else 0))
    return schema, groups


def _check_schema(config: CaptionConfig, path: str, schema: pa.Schema) -> None:
    image_col = config.image_column or config.image_uri_column
    for col in (config.id_column, image_col):
        if col not in schema.names:
            raise PipelineError(f"shard {path} has no column {col!r} (columns: {', '.join(schema.names)})"
                                + _column_hint(config, col, schema))
    kind = schema.field(image_col).type
    if config.image_column and not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise PipelineError(f"image column {image_col!r} of {path} is {kind}, not binary "
                            "(use --image-uri-column for URIs)")
    if config.image_uri_column and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PipelineError(f"URI column {image_col!r} of {path} is {kind}, not string")


def _column_hint(config: CaptionConfig, missing: str, schema: pa.Schema) -> str:
    """'; pass --image-column img (binary images) or ...': the flag for each column that could be
    the missing one, by type (binary = image bytes, string = image URIs or ids, integer = ids)."""
    taken = {config.id_column, config.image_column or config.image_uri_column} - {missing}
    options = []
    for field in schema:
        if field.name in taken or field.name == "prompt":
            continue
        kind = field.type
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        string = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if missing == config.id_column:
            if string or pa.types.is_integer(kind):
                options.append(f"--id-column {field.name}")
        elif binary:
            options.append(f"--image-column {field.name} (image bytes)")
        elif string:
            options.append(f"--image-uri-column {field.name} (image URIs)")
    return f"; pass {' or '.join(options)}" if options else ""


def check_input(config: CaptionConfig, read_schema: bool = True) -> None:
    """The fast check a run makes first (before models, output or Ray): the input lists at least
    one Parquet file and (`read_schema`) the first one's schema has the columns asked for. The
    full scan (every footer, id types) is build_plan's, later."""
    try:
        fs, infos = list_input(config)
    except (OSError, ValueError) as exc:  # FileNotFoundError is a PipelineError by now
        raise PipelineError(f"cannot read --input {config.input}: {' '.join(str(exc).split())[:300]}") from None
    if not read_schema:
        return
    try:
        schema = pq.ParquetFile(infos[0].path, filesystem=fs).schema_arrow
    except (OSError, pa.ArrowInvalid) as exc:
        raise PipelineError(f"cannot read shard {infos[0].path}: {' '.join(str(exc).split())[:300]}") from None
    _check_schema(config, infos[0].path, schema)


def list_input(config: CaptionConfig) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The input's Parquet files (path order) with their sizes; PipelineError if there are none."""
    try:
        fs, files = storage.list_parquet_files(config.input, config.s3_endpoint)
    except FileNotFoundError as exc:
        raise PipelineError(str(exc)) from None
    if not files:
        raise PipelineError(f"no *.parquet files under {config.input}")
    return fs, fs.get_file_info(files)


def build_plan(config: CaptionConfig) -> InputPlan:
    """Read every shard's footer (threads; no data): check columns and id types, number the rows."""
    fs, infos = list_input(config)
    image_col = config.image_column or config.image_uri_column
    columns = [config.id_column, image_col, "prompt"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda info: _footer(fs, info.path, columns), infos))
    with_prompt = 0
    id_type = None
    rows: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
    offset = 0
    for info, (schema, groups) in zip(infos, footers):
        _check_schema(config, info.path, schema)
        with_prompt += "prompt" in schema.names
        this_type = schema.field(config.id_column).type
        if id_type is None:
            id_type = this_type
        elif this_type != id_type and not _castable(this_type, id_type):
            raise PipelineError(f"id column of {info.path} is {this_type}, other shards have {id_type}")
        for group, n, nbytes in groups or [(-1, 0, 0)]:  # an empty shard keeps a row: the input listing
            for name, value in zip(PLAN_SCHEMA.names, (info.path, info.size, group, offset, n, nbytes)):
                rows[name].append(value)
            offset += n
    if 0 < with_prompt < len(infos):
        raise PipelineError("a 'prompt' column is in some shards but not all; add it (nulls allowed) everywhere")
    groups = pa.table(rows, schema=PLAN_SCHEMA)
    return InputPlan(groups, config.commit_rows, id_type, "prompt" if with_prompt else None)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    try:
        pa.array([], source).cast(target)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def save_plan(plan: InputPlan, out_fs, root: str) -> None:
    """OUTPUT/_plan.parquet (written once, before any row is committed)."""
    id_schema = pa.schema([pa.field("id", plan.id_type)]).serialize().to_pybytes()
    meta = {b"commit_rows": str(plan.commit_rows).encode(), b"id_schema": id_schema,
            b"prompt_column": (plan.prompt_column or "").encode()}
    table = plan.groups.replace_schema_metadata(meta)
    storage.write_atomic(out_fs, posixpath.join(root, PLAN_NAME),
                         lambda target: pq.write_table(table, target, filesystem=out_fs))


def load_plan(out_fs, root: str) -> InputPlan | None:
    """The plan saved in OUTPUT, or None when the output has none yet."""
    path = posixpath.join(root, PLAN_NAME)
    if out_fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    table = pq.read_table(path, filesystem=out_fs)
    meta = table.schema.metadata or {}
    id_type = pa.ipc.read_schema(pa.py_buffer(meta[b"id_schema"])).field("id").type
    prompt = meta.get(b"prompt_column", b"").decode() or None
    return InputPlan(table.replace_schema_metadata(None), int(meta[b"commit_rows"]), id_type, prompt)


def check_input_unchanged(plan: InputPlan, config: CaptionConfig) -> None:
    """A resume must see the input its plan numbered: same files, same sizes (one listing)."""
    _, infos = list_input(config)
    now = {info.path: info.size for info in infos}
    planned = dict(zip(plan.groups.column("path").to_pylist(), plan.groups.column("file_size").to_pylist()))
    if now != planned:
        added = sorted(set(now) - set(planned))
        gone = sorted(set(planned) - set(now))
        resized = sorted(p for p in set(now) & set(planned) if now[p] != planned[p])
        what = "; ".join(f"{label}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"
                         for label, paths in (("new", added), ("missing", gone), ("changed size", resized)) if paths)
        raise PipelineError(f"the input changed since {config.output} was started ({what}); rows are committed by "
                            "their place in the input, so it cannot be resumed exactly once: use a new --output")
