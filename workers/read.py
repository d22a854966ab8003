"""Read stage: the rows of one input shard that still need work, tagged with their global row index.

A plain callable (Ray Data runs it as a `map_batches` task over one *read spec* per shard;
tests call it directly). A read spec names a Parquet file, the row groups to read and the
global row ranges still pending in it:

    {"path": "bucket/in/shard-00007.parquet",   # a path inside the input filesystem
     "row_groups": [0, 2], "first_rows": [350000, 370000],   # global index of each group's row 0
     "pending": [[352000, 360000], [370000, 375000]]}        # [start, stop) global rows to emit

Row groups that hold no pending row are never opened, so a resume does not read input that is
already committed (the planner decides which groups a spec names, and counts their bytes).
Output: blocks of at most `block_rows` rows with the selected columns plus `ROW_COLUMN`
(int64), the row's global index: the key the driver commits by (pipeline/commit.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers import storage
from workers.schema import ROW_COLUMN


class ShardReader:
    """Args:
        input_uri: the input as given by the user (local dir or s3:// prefix); only its scheme
            and endpoint matter: spec paths are inside the same filesystem.
        columns: the columns to read (id, image or URI, optional prompt).
        block_rows: rows per output block.
    """

    def __init__(self, input_uri: str, columns: list[str], block_rows: int, s3_endpoint: str | None = None):
        self.input_uri, self.s3_endpoint = input_uri, s3_endpoint
        self.columns = list(columns)
        self.block_rows = max(1, int(block_rows))
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:  # built in the worker: pyarrow drops an S3 retry strategy when pickled
            self._fs = storage.resolve(self.input_uri, self.s3_endpoint)[0]
        return self._fs

    def read(self, spec: dict) -> Iterator[pa.Table]:
        pending = np.asarray(spec["pending"], dtype=np.int64).reshape(-1, 2)  # [R, 2]
        for group, first in zip(spec["row_groups"], spec["first_rows"]):
            # Ray Data does not retry a failed UDF: a store away for a while is retried here.
            table = storage.retry_io(self._read_group, spec["path"], group)
            rows = np.arange(first, first + table.num_rows, dtype=np.int64)  # [n]
            keep = ((rows[:, None] >= pending[None, :, 0]) & (rows[:, None] < pending[None, :, 1])).any(axis=1)
            if not keep.all():
                table, rows = table.filter(pa.array(keep)), rows[keep]
            table = table.append_column(ROW_COLUMN, pa.array(rows, pa.int64()))
            for start in range(0, table.num_rows, self.block_rows):
                yield table.slice(start, self.block_rows)

    def _read_group(self, path: str, group: int) -> pa.Table:
        return pq.ParquetFile(path, filesystem=self.fs).read_row_group(group, columns=self.columns)

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        """Ray Data entry point: `batch` holds one or more read specs as columns of a pyarrow table."""
        specs = batch.to_pylist() if isinstance(batch, pa.Table) else [batch]
        for spec in specs:
            yield from self.read(spec)
