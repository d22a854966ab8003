"""Unique, non-null ids across the whole input, checked by a distributed pass before any work.

Exactly-once is defined per id, so a duplicate id must stop the run before any of its rows is
written. The check runs once per output (a resume trusts the saved plan, whose input listing
it re-checks) as two rounds of Ray tasks; the driver only holds object references:

    1. one task per shard reads the id column only, counts nulls and splits the ids into
       `buckets` parts by a hash of the id;
    2. one task per bucket concatenates its parts from every shard and counts each id.

Memory per task is the ids of one shard or one bucket (the bucket count grows with the input).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

IDS_PER_BUCKET = 2_000_000


@dataclass
class IdReport:
    nulls: int
    duplicates: int              # distinct ids that occur more than once
    examples: list               # a few of them


def _partition(input_uri: str, s3_endpoint: str | None, path: str, id_column: str, id_type: pa.DataType,
               buckets: int):
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from workers import storage

    fs = storage.resolve(input_uri, s3_endpoint)[0]
    ids = pq.read_table(path, columns=[id_column], filesystem=fs).column(id_column)
    ids = ids.cast(id_type).combine_chunks() if len(ids) else pa.array([], id_type)
    nulls = ids.null_count
    if nulls:
        ids = ids.drop_null()
    values = ids.to_numpy(zero_copy_only=False)
    which = (pd.util.hash_array(values) % np.uint64(buckets)).astype(np.int64) if len(values) else \
        np.zeros(0, np.int64)
    parts = [ids.filter(pa.array(which == b)) for b in range(buckets)]
    return (nulls, *parts)


def _count(id_type: pa.DataType, *parts) -> tuple[int, list]:
    import pyarrow.compute as pc

    ids = pa.concat_arrays([p for p in parts if len(p)]) if any(len(p) for p in parts) else pa.array([], id_type)
    if not len(ids):
        return 0, []
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    return len(dupes), dupes.field("values")[:5].to_pylist()


def check_ids(files: list[str], num_rows: int, *, input_uri: str, s3_endpoint: str | None, id_column: str,
              id_type: pa.DataType, num_cpus: float = 0.5) -> IdReport:
    """Nulls and duplicates of `id_column` over `files` (paths inside the input filesystem)."""
    import ray

    buckets = max(1, -(-num_rows // IDS_PER_BUCKET))
    partition = ray.remote(num_cpus=num_cpus, num_returns=buckets + 1, max_retries=3)(_partition)
    count = ray.remote(num_cpus=num_cpus, max_retries=3)(_count)
    refs = [partition.remote(input_uri, s3_endpoint, path, id_column, id_type, buckets) for path in files]
    if buckets == 0 or not refs:
        return IdReport(0, 0, [])
    nulls = sum(ray.get([r[0] for r in refs]))
    results = ray.get([count.remote(id_type, *[r[b + 1] for r in refs]) for b in range(buckets)])
    examples = [e for _, ex in results for e in ex][:5]
    return IdReport(nulls, sum(n for n, _ in results), examples)
