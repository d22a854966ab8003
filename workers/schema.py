"""Column contracts between the pipeline stages, and the output table's schema.

Stage contracts (every stage keeps the id column untouched, and passes `ROW_COLUMN` through
when its input has it: the driver commits rows by that global row index):
- read → preprocess: `id`, `image` (binary) or an image-URI column (string), optional `prompt`.
- preprocess → worker (`preprocessed_schema`): id, status, error, input_ids (list<int32>, not
  padded), pixel_values (fixed-size list<float32> of C*H*W, or tiles*C*H*W for any-resolution
  targets (NeXT), tiles past the image's own zeroed; zeros for error rows), image_sizes
  (list<int32> [height, width] for any-resolution targets, else null).
- worker → commit: the output table below, one row per input row.
"""
from __future__ import annotations

import pyarrow as pa

DEFAULT_PROMPT = "Describe this image in one sentence."  # for rows without a prompt of their own
STATUS_OK = "ok"
STATUS_ERROR = "error"
# The row's index in the run's global input order (shards in name order, rows in file order).
# Internal: carried from the reader to the driver's commit, never written to the output table.
ROW_COLUMN = "_row"

# Output columns after the id column, in order.
OUTPUT_FIELDS: list[pa.Field] = [
    pa.field("caption", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("new_tokens", pa.int32()),
    pa.field("target_forwards", pa.int32()),
    pa.field("mean_accepted", pa.float32()),
    pa.field("accepted_lengths", pa.list_(pa.int16())),
    pa.field("draft_tokens", pa.int32()),
    pa.field("tree_nodes_mean", pa.float32()),
    pa.field("decode_s", pa.float32()),
]


def output_schema(id_column: str = "id", id_type: pa.DataType = pa.string()) -> pa.Schema:
    """The output table: the input's id column (same name and type) then OUTPUT_FIELDS."""
    return pa.schema([pa.field(id_column, id_type, nullable=False), *OUTPUT_FIELDS])


def preprocessed_schema(id_column: str, id_type: pa.DataType, pixel_size: int) -> pa.Schema:
    return pa.schema([
        pa.field(id_column, id_type, nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("pixel_values", pa.list_(pa.float32(), pixel_size)),
        pa.field("image_sizes", pa.list_(pa.int32())),
    ])


def carry_row_index(out: pa.Table, source: pa.Table) -> pa.Table:
    """`out` with `source`'s ROW_COLUMN appended, when `source` has one (row i of out is row i of source)."""
    if ROW_COLUMN in source.column_names and ROW_COLUMN not in out.column_names:
        return out.append_column(ROW_COLUMN, source.column(ROW_COLUMN))
    return out


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A one-line error message for the `error` column: exception type and first line, clipped."""
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
