"""End to end on a real S3 API (moto) and a real local Ray: every id exactly once, captions equal
the target's own greedy captions, bad rows become error rows, bad inputs fail before any work."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs  # noqa: F401 - pa.fs
import pyarrow.parquet  # noqa: F401 - pa.parquet
import pytest

from tests.pipeline_helpers import (cli, corrupt_bytes, huge_bytes, png_bytes, processed_inputs,
                              reference_captions, truncated_bytes, write_shard)

MAX_NEW = 8
# Small stages for a 2-core box shared with other test runs.
RESOURCES = ["--stage-cpus", "0.25", "--cpus-per-actor", "0.5", "--batch-size", "8",
             "--max-new-tokens", str(MAX_NEW)]


def read_output(fs, output_uri: str) -> pa.Table:
    root = output_uri.removeprefix("s3://")
    return pads.dataset(f"{root}/data", filesystem=fs, format="parquet").to_table()


def read_manifest(fs, output_uri: str) -> tuple[dict, str]:
    with fs.open_input_stream(f"{output_uri.removeprefix('s3://')}/_run.json") as stream:
        text = stream.read().decode()
    return json.loads(text), text


@pytest.fixture(scope="module")
def e2e_input(s3):
    """4 shards of 52 good images + bad rows, an empty shard, a shard with extra columns."""
    fs = s3.filesystem()
    bucket = s3.make_bucket("e2e")
    images, prompts = {}, {}
    bad = {"corrupt": corrupt_bytes(), "empty": b"", "huge": huge_bytes(), "truncated": truncated_bytes(),
           "null": None}
    for shard in range(4):
        ids = [f"s{shard}-{i:03d}" for i in range(52)]
        for i, key in enumerate(ids):
            images[key] = png_bytes(1000 * shard + i)
            if i % 10 == 3:
                prompts[key] = f"w{3 + i % 7} w{5 + shard}"  # per-row prompts of other lengths
        bad_ids = [f"s{shard}-{name}" for name in bad]
        for name, key in zip(bad, bad_ids):
            images[key] = bad[name]
        ids += bad_ids
        write_shard(fs, f"e2e/in/shard-{shard}.parquet", pa.table({
            "id": ids, "image": pa.array([images[k] for k in ids], pa.binary()),
            "prompt": pa.array([prompts.get(k) for k in ids], pa.string())}))
    write_shard(fs, "e2e/in/shard-empty.parquet", pa.table({
        "id": pa.array([], pa.string()), "image": pa.array([], pa.binary()), "prompt": pa.array([], pa.string())}))
    extra = [f"x-{i}" for i in range(6)]
    for i, key in enumerate(extra):
        images[key] = png_bytes(99_000 + i)
    write_shard(fs, "e2e/in/shard-extra.parquet", pa.table({
        "id": extra, "width": list(range(6)), "image": pa.array([images[k] for k in extra], pa.binary()),
        "source": ["web"] * 6, "prompt": pa.array([None] * 6, pa.string())}))
    fs.create_dir("e2e/in/_markers")  # ignored: names starting with '_'
    return bucket, images, prompts


def test_end_to_end_exactly_once_and_greedy_exact(s3, ray_address, tiny_pair, e2e_input):
    from workers.preprocess import Preprocessor

    bucket, images, prompts = e2e_input
    output = f"{bucket}/out"
    rc = cli(["caption", "--input", f"{bucket}/in", "--output", output, "--target", tiny_pair[0],
              "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint, *RESOURCES, "--batch-size", "16",
              "--commit-rows", "50"])  # the unit of commit is not the decode batch
    assert rc == 0
    fs = s3.filesystem()
    table = read_output(fs, output)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(images) and len(ids) == len(set(ids)) == 4 * 57 + 6
    rows = {r["id"]: r for r in table.to_pylist()}
    for key, row in rows.items():
        expect_error = any(key.endswith(f"-{name}") for name in ("corrupt", "empty", "huge", "truncated", "null"))
        assert row["status"] == ("error" if expect_error else "ok"), (key, row["error"])
        if expect_error:
            assert row["error"] and "\n" not in row["error"] and row["caption"] is None
    assert "pixel limit" in rows["s0-huge"]["error"]

    preprocessor = Preprocessor(tiny_pair[0], image_column="image", prompt_column="prompt")
    good = {k: v for k, v in images.items() if rows[k]["status"] == "ok"}
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, good, prompts), MAX_NEW)
    assert len(ref) >= 200
    mismatches = [k for k in ref if rows[k]["caption"] != ref[k]]
    assert not mismatches, mismatches[:5]
    for key in ref:
        assert rows[key]["new_tokens"] == 1 + sum(rows[key]["accepted_lengths"])

    manifest, text = read_manifest(fs, output)
    assert manifest["status"] == "finished"
    assert manifest["counts"] == {"input_rows": len(images), "output_rows": len(images),
                                  "unique_ids": len(images), "ok": len(ref), "error": 20, "units": 5}
    # one file per 50-row unit (the last one short), whatever the batch size
    data = sorted(e.base_name for e in fs.get_file_info(pa.fs.FileSelector(f"{output[5:]}/data")))
    assert data == [f"unit-{u:08d}.parquet" for u in range(5)]
    assert [pa.parquet.read_metadata(f"{output[5:]}/data/{name}", filesystem=fs).num_rows for name in data] \
        == [50, 50, 50, 50, len(images) - 200]
    assert manifest["runs"][-1]["rows"] == len(images)
    assert len(manifest["models"]["target"]["sha256"]) == 64
    # --tree-budget auto (the default): each caption actor's measured table, reported from the actor
    # through S3, is in the run's record, readably.
    budgets = manifest["runs"][-1]["tree_budget"]
    assert budgets and all(b["budget"].startswith("batch>=1: ") and ":" in b["actor"] for b in budgets), budgets
    assert "testing" not in text  # the fake AWS key/secret never reach the manifest


def test_uri_column_missing_objects_then_rerun_is_a_no_op(s3, ray_address, tiny_pair, capsys):
    from workers.preprocess import Preprocessor

    fs = s3.filesystem()
    bucket = s3.make_bucket("uris")
    images = {}
    uris = {}
    for i in range(10):
        key = f"u{i}"
        images[key] = png_bytes(500 + i)
        with fs.open_output_stream(f"uris/img/{key}.png") as stream:
            stream.write(images[key])
        uris[key] = f"s3://uris/img/{key}.png"
    uris["gone"] = "s3://uris/img/does-not-exist.png"
    uris["nobucket"] = "s3://no-such-bucket-here/x.png"
    write_shard(fs, "uris/in/a.parquet", pa.table({"id": list(uris), "url": list(uris.values())}))
    output = f"{bucket}/out"
    args = ["caption", "--input", f"{bucket}/in", "--output", output, "--target", tiny_pair[0],
            "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint, "--image-uri-column", "url",
            "--prompt", "w7 w8", *RESOURCES]
    assert cli(args) == 0
    rows = {r["id"]: r for r in read_output(fs, output).to_pylist()}
    assert sorted(rows) == sorted(uris)
    assert rows["gone"]["status"] == "error" and "missing image object" in rows["gone"]["error"]
    assert rows["nobucket"]["status"] == "error"
    preprocessor = Preprocessor(tiny_pair[0], image_column="image", prompt="w7 w8")
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, images), MAX_NEW)
    assert {k: rows[k]["caption"] for k in ref} == ref

    # The same command again decodes nothing (the checkpoint is kept after success) ...
    assert cli(args) == 0
    manifest, _ = read_manifest(fs, output)
    assert [run["rows"] for run in manifest["runs"]] == [len(uris), 0]
    assert sorted(read_output(fs, output).column("id").to_pylist()) == sorted(uris)
    # ... and a different prompt may not continue this output.
    assert cli([a if a != "w7 w8" else "w9" for a in args]) == 2
    assert "different prompt" in capsys.readouterr().err


def test_duplicate_ids_fail_before_any_work(s3, ray_address, tiny_pair, capsys):
    fs = s3.filesystem()
    bucket = s3.make_bucket("dupes")
    write_shard(fs, "dupes/in/a.parquet", pa.table({"id": ["a", "b", "c"], "image": [png_bytes(1)] * 3}))
    write_shard(fs, "dupes/in/b.parquet", pa.table({"id": ["d", "b"], "image": [png_bytes(2)] * 2}))
    rc = cli(["caption", "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--target", tiny_pair[0],
              "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 duplicate ids" in err and "'b'" in err
    assert not fs.get_file_info(pa.fs.FileSelector("dupes/out", allow_not_found=True))


@pytest.mark.parametrize("case", ["no-image-column", "prompt-in-some", "no-shards", "missing-model"])
def test_bad_inputs_are_clear_user_errors(tmp_path, tiny_pair, case, capsys):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    target = tiny_pair[0]
    if case == "no-image-column":
        pq.write_table(pa.table({"id": ["a"], "img": [png_bytes(1)]}), src / "a.parquet")
    elif case == "prompt-in-some":
        pq.write_table(pa.table({"id": ["a"], "image": [png_bytes(1)], "prompt": ["w3"]}), src / "a.parquet")
        pq.write_table(pa.table({"id": ["b"], "image": [png_bytes(2)]}), src / "b.parquet")
    elif case == "missing-model":
        pq.write_table(pa.table({"id": ["a"], "image": [png_bytes(1)]}), src / "a.parquet")
        target = str(tmp_path / "nope")
    rc = cli(["caption", "--input", str(src), "--output", str(tmp_path / "out"), "--target", target,
              "--draft", tiny_pair[1]])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specllava: error:") and err.count("\n") == 0
    assert {"no-image-column": "no column 'image'", "prompt-in-some": "some shards but not all",
            "no-shards": "no *.parquet files", "missing-model": "model directory not found"}[case] in err
    if case == "no-image-column":
        assert err.endswith("(columns: id, img); pass --image-column img (image bytes)"), err
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_run_stats_mean_accepted_excludes_prefill_token():
    from pipeline.commit import RunCounters
    from pipeline.run import _run_stats

    # rows ok/error with (new_tokens, target_forwards) = (5, 3), (-, -), (9, 4)
    stats = _run_stats(RunCounters(rows=3, ok=2, new_tokens=5 + 9, target_forwards=3 + 4), 2.0)
    # (5-1 + 9-1) tokens from (3-1 + 4-1) verify steps
    assert stats["mean_accepted"] == 2.4 and stats["ok"] == 2 and stats["error"] == 1
    assert stats["images_per_s"] == 1.5 and stats["tokens_per_s"] == 7.0


def test_worker_that_cannot_start_fails_the_run_and_is_recorded(tmp_path, ray_address, tiny_pair, capsys):
    """A draft whose weights cannot be loaded (a truncated safetensors file: the pre-flight checks
    read configs and tokenizers, never weights) kills every caption actor at start: the command
    exits non-zero and _run.json says failed, with the reason. (A draft with another vocabulary,
    used here before, is now refused by pipeline/preflight.py: tests/faults/test_bad_models.py.)"""
    import shutil

    import pyarrow.parquet as pq

    bad_draft = tmp_path / "draft"
    shutil.copytree(tiny_pair[1], bad_draft)
    weights = bad_draft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": [png_bytes(1), png_bytes(2)]}), tmp_path / "in" / "a.parquet")
    # A new output: the run created it and failed before its first commit, so nothing is left.
    output = tmp_path / "out"
    argv = ["caption", "--input", str(tmp_path / "in"), "--output", str(output), "--target", tiny_pair[0],
            "--draft", str(bad_draft), *RESOURCES]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "specllava caption: run failed: " in err and "Traceback" not in err, err
    assert "was removed" in err and "run the same command again" in err and not output.exists()
    # An output that existed before (here an empty directory) is never removed: the failure is
    # recorded in its _run.json and the hint resumes it.
    output.mkdir()
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "specllava caption: run failed: " in err and "Traceback" not in err  # one line + how to resume
    assert f"`specllava resume {output}`" in err
    manifest = json.loads((output / "_run.json").read_text())
    assert manifest["status"] == "failed" and manifest["runs"][-1]["status"] == "failed"
    assert manifest["runs"][-1]["error"]


def test_dry_run_checks_every_image_without_a_model(tmp_path, ray_address, tiny_pair, capsys):
    """`caption --dry-run`: read, decode and check, commit and write; each row ok or error with an
    empty caption; no model is named, loaded or hashed. A rerun decodes nothing, and a real
    caption run may not continue a dry run's output."""
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    images = {}
    for shard in range(3):
        ids = [f"d{shard}-{i:02d}" for i in range(11)]
        for i, key in enumerate(ids):
            images[key] = {0: corrupt_bytes(), 1: b"", 2: truncated_bytes()}.get(i, png_bytes(300 * shard + i)) \
                if i < 3 and shard == 1 else png_bytes(300 * shard + i)
        pq.write_table(pa.table({"id": ids, "image": pa.array([images[k] for k in ids], pa.binary())}),
                       src / f"{shard}.parquet", row_group_size=4)
    output = tmp_path / "out"
    args = ["caption", "--input", str(src), "--output", str(output), "--dry-run", "--batch-size", "4",
            "--commit-rows", "7", "--stage-cpus", "0.25"]
    assert cli(args) == 0
    table = pads.dataset(str(output / "data"), format="parquet").to_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(images) and table.num_rows == len(images) == 33
    bad = {"d1-00", "d1-01", "d1-02"}
    assert {k for k, r in rows.items() if r["status"] == "error"} == bad
    assert all(rows[k]["error"] and rows[k]["caption"] is None for k in bad)
    assert all(r["caption"] == "" and r["new_tokens"] is None for k, r in rows.items() if k not in bad)
    assert len(list((output / "data").glob("unit-*.parquet"))) == 5      # ceil(33 / 7)
    manifest = json.loads((output / "_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["models"] == {} and manifest["config"]["dry_run"]
    assert manifest["counts"]["ok"] == 30 and manifest["counts"]["error"] == 3

    assert cli(args) == 0                                  # nothing left: decodes nothing
    assert [r["rows"] for r in json.loads((output / "_run.json").read_text())["runs"]] == [33, 0]
    capsys.readouterr()
    assert cli(["caption", "--input", str(src), "--output", str(output), "--target", tiny_pair[0],
                "--draft", tiny_pair[1], "--commit-rows", "7"]) == 2
    assert "different dry_run" in capsys.readouterr().err


def test_without_address_a_private_ray_starts_whatever_ray_address_says(tmp_path):
    """A head left running (or a dead head's address) must not break a plain `caption`: without
    --address a private Ray starts (before: "ValueError: When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided")."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from tests import REPO_ROOT
    from tests.pipeline_helpers import CLI_SUBPROCESS

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": [png_bytes(1), png_bytes(2)]}), tmp_path / "in" / "a.parquet")
    env = dict(__import__("os").environ, RAY_ADDRESS="127.0.0.1:1")  # nothing listens there
    proc = subprocess.run([sys.executable, *CLI_SUBPROCESS, "caption", "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--dry-run", "--stage-cpus", "0.25"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError" not in proc.stderr
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["status"] == "finished"
