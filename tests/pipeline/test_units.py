"""Commit units without Ray: the plan's read specs, the shard reader, the unit writer."""
from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commit import UnitWriter, committed_units, unit_footers, unit_name
from pipeline.config import CaptionConfig, PipelineError
from pipeline.plan import build_plan, check_input_unchanged, load_plan, save_plan
from workers.read import ShardReader
from workers.schema import ROW_COLUMN, output_schema


def write_input(folder, sizes: list[int], group: int) -> list[str]:
    """Shards of `sizes` rows in row groups of `group` rows; ids f"{shard}-{i}"."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        path = folder / f"shard-{s}.parquet"
        table = pa.table({"id": pa.array([f"{s}-{i}" for i in range(n)], pa.string()),
                          "image": pa.array([b"x" * (i % 5 + 1) for i in range(n)], pa.binary())})
        pq.write_table(table, path, row_group_size=group)
        paths.append(str(path))
    return paths


def config_for(tmp_path, commit_rows: int) -> CaptionConfig:
    return CaptionConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), dry_run=True,
                         commit_rows=commit_rows)


def test_plan_numbers_rows_and_reads_only_groups_with_pending_units(tmp_path):
    write_input(tmp_path / "in", [25, 0, 17], group=10)      # groups: 10,10,5 | (empty) | 10,7
    plan = build_plan(config_for(tmp_path, commit_rows=8))
    assert plan.num_rows == 42 and plan.num_units == 6 and plan.unit_rows(5) == 2
    assert plan.groups.column("first_row").to_pylist() == [0, 10, 20, 25, 25, 35]
    specs, nbytes = plan.read_specs(set())
    assert nbytes == plan.input_bytes and [len(s["row_groups"]) for s in specs] == [3, 2]
    # units 0..2 (rows 0-23) done: only shard 0's last group (rows 20-24, unit 2 done, unit 3 not)
    # and all of shard 2 are read, and only rows 24.. are pending
    specs, nbytes = plan.read_specs({0, 1, 2})
    assert [(s["row_groups"], s["pending"]) for s in specs] == [([2], [[24, 25]]), ([0, 1], [[25, 42]])]
    assert 0 < nbytes < plan.input_bytes
    assert plan.read_specs(set(range(6))) == ([], 0)


def test_plan_is_saved_and_a_changed_input_is_refused(tmp_path):
    import pyarrow.fs as pafs

    config = config_for(tmp_path, commit_rows=8)
    write_input(tmp_path / "in", [25, 17], group=10)
    plan = build_plan(config)
    (tmp_path / "out").mkdir()
    save_plan(plan, pafs.LocalFileSystem(), str(tmp_path / "out"))
    loaded = load_plan(pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert loaded.groups.equals(plan.groups) and loaded.commit_rows == 8 and loaded.id_type == pa.string()
    check_input_unchanged(loaded, config)
    write_input(tmp_path / "in", [25, 18], group=10)       # shard-1 rewritten with one more row
    with pytest.raises(PipelineError, match="input changed.*changed size: .*shard-1"):
        check_input_unchanged(loaded, config)


def test_reader_emits_pending_rows_with_their_global_index(tmp_path):
    paths = write_input(tmp_path / "in", [25], group=10)
    reader = ShardReader(str(tmp_path / "in"), ["id", "image"], block_rows=4)
    spec = {"path": paths[0], "row_groups": [1, 2], "first_rows": [110, 120], "pending": [[112, 114], [118, 123]]}
    blocks = list(reader(pa.Table.from_pylist([spec])))
    assert all(b.num_rows <= 4 for b in blocks)
    table = pa.concat_tables(blocks)
    assert table.column(ROW_COLUMN).to_pylist() == [112, 113, 118, 119, 120, 121, 122]
    assert table.column("id").to_pylist() == ["0-12", "0-13", "0-18", "0-19", "0-20", "0-21", "0-22"]


def test_unit_writer_commits_complete_units_once_in_row_order(tmp_path):
    import pyarrow.fs as pafs

    rows = 23
    schema = output_schema()
    table = pa.Table.from_pylist([{"id": f"r{i}", "caption": "", "status": "ok" if i % 3 else "error"}
                                  for i in range(rows)], schema=schema)
    table = table.append_column(ROW_COLUMN, pa.array(range(rows), pa.int64()))
    order = [i for i in range(rows) if i != 21] + [4, 5, 17]   # three rows arrive twice (a re-run batch)
    random.Random(0).shuffle(order)                                # row 21 never arrives: unit 2 stays open
    fs, data = pafs.LocalFileSystem(), str(tmp_path / "data")
    writer = UnitWriter(fs, data, num_rows=rows, commit_rows=10)
    for start in range(0, len(order), 5):
        writer.add(table.take(order[start:start + 5]))
    writer.close()
    assert committed_units(fs, data) == {0, 1} and writer.open_units == 1
    assert writer.counters.duplicates_dropped == 3 and writer.counters.rows == 20 and writer.counters.units == 2
    for unit in committed_units(fs, data):
        got = pq.read_table(f"{data}/{unit_name(unit)}")
        assert got.column_names == schema.names     # the row index is not written
        assert got.column("id").to_pylist() == [f"r{i}" for i in range(unit * 10, min(rows, unit * 10 + 10))]
    n, ok = unit_footers(fs, data, committed_units(fs, data))
    assert n == writer.counters.rows and ok == writer.counters.ok == sum(1 for i in range(20) if i % 3)


def test_actors_auto_is_one_per_gpu_and_at_least_one():
    from jobs.common import parse_actors
    from pipeline.run import auto_actors

    assert parse_actors("auto") == (1, None) and parse_actors("2,8") == (2, 8) and parse_actors("3") == (3, 3)
    assert auto_actors(64.0, 1.0) == 64          # a 64-GPU cluster: 64 caption actors, not 1
    assert auto_actors(8.0, 2.0) == 4 and auto_actors(1.0, 2.0) == 1
    assert auto_actors(0.0, 0.0) == 1            # CPU only: one actor
    assert CaptionConfig(input="i", output="o", dry_run=True, actors_max=None).actors_max is None


def test_resources_never_decode_on_cpu_next_to_gpus_unless_asked():
    from pipeline.run import decide_resources

    def cfg(**kw):
        return CaptionConfig(input="i", output="o", target="t", draft="d", actors_max=None, **kw)

    on_gpus = decide_resources(cfg(), cluster_gpus=8.0)
    assert on_gpus.gpus_per_actor == 1.0 and on_gpus.actors_max == 8
    cpu_only = decide_resources(cfg(), cluster_gpus=0.0)
    assert cpu_only.gpus_per_actor == 0.0 and cpu_only.actors_max == 1
    with pytest.raises(PipelineError, match="would decode on CPU; pass --device cpu"):
        decide_resources(cfg(gpus_per_actor=0.0), cluster_gpus=8.0)
    forced = decide_resources(cfg(device="cpu"), cluster_gpus=8.0)
    assert forced.gpus_per_actor == 0.0 and forced.actors_max == 1
    with pytest.raises(PipelineError, match="needs GPUs"):
        decide_resources(cfg(device="cuda"), cluster_gpus=0.0)
    two_each = decide_resources(cfg(gpus_per_actor=2.0), cluster_gpus=8.0)
    assert two_each.actors_max == 4
