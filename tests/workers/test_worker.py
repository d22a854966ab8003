"""Preprocessor and CaptionWorker as plain callables (no Ray): bad images, one row per row, exactness."""
from __future__ import annotations

import pyarrow as pa
import pytest

from workers.schema import output_schema
from tests.pipeline_helpers import (corrupt_bytes, huge_bytes, png_bytes, processed_inputs,
                              reference_captions, truncated_bytes)
from workers.preprocess import ImageRejected, Preprocessor, decode_image

MAX_NEW = 8


@pytest.fixture(scope="module")
def preprocessor(tiny_pair):
    return Preprocessor(tiny_pair[0], image_column="image", prompt_column="prompt")


@pytest.fixture(scope="module")
def worker(tiny_pair):
    from workers.caption import CaptionWorker
    return CaptionWorker(*tiny_pair, max_new_tokens=MAX_NEW, torch_threads=1)


def test_decode_image_limits():
    assert decode_image(png_bytes(0)).mode == "RGB"
    with pytest.raises(ImageRejected, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageRejected, match="pixel limit"):
        decode_image(huge_bytes(7000))
    with pytest.raises(ImageRejected, match="byte limit"):
        decode_image(png_bytes(0), max_bytes=10)
    with pytest.raises(ImageRejected, match="aspect"):
        decode_image(_wide_png())
    with pytest.raises(Exception):
        decode_image(corrupt_bytes())
    with pytest.raises(Exception):
        decode_image(truncated_bytes())


def _wide_png() -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (600, 2)).save(buf, format="PNG")
    return buf.getvalue()


def test_worker_batch_matches_target_greedy_and_keeps_every_row(preprocessor, worker, tiny_pair):
    images = {f"r{i}": png_bytes(i) for i in range(6)}
    images.update({"corrupt": corrupt_bytes(), "empty": b"", "huge": huge_bytes(),
                   "truncated": truncated_bytes(), "none": None})
    prompts = {"r1": "w5 w6 w7 w8 w9", "r4": "w3"}  # different lengths -> real left padding
    ids = list(images)
    batch = pa.table({"id": ids, "image": pa.array([images[k] for k in ids], pa.binary()),
                      "prompt": pa.array([prompts.get(k) for k in ids], pa.string())})
    pre = preprocessor(batch)
    assert pre.column("id").to_pylist() == ids
    out = worker.caption(pre)
    assert out.schema == output_schema("id", pa.string())
    rows = {r["id"]: r for r in out.to_pylist()}
    assert list(rows) == ids
    for bad in ("corrupt", "empty", "huge", "truncated", "none"):
        assert rows[bad]["status"] == "error" and rows[bad]["caption"] is None
        assert rows[bad]["error"] and "\n" not in rows[bad]["error"]
    assert "pixel limit" in rows["huge"]["error"] and "empty" in rows["empty"]["error"]
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, images, prompts), MAX_NEW)
    assert set(ref) == {f"r{i}" for i in range(6)}
    for key, caption in ref.items():
        row = rows[key]
        assert row["status"] == "ok" and row["error"] is None
        assert row["caption"] == caption, key
        assert row["new_tokens"] == 1 + sum(row["accepted_lengths"])
        assert row["target_forwards"] >= 1 and row["decode_s"] > 0
    assert worker.rows_decoded == 6


def test_worker_all_error_batch_decodes_nothing(preprocessor, worker):
    batch = pa.table({"id": ["a", "b"], "image": pa.array([b"", corrupt_bytes()], pa.binary()),
                      "prompt": pa.array([None, None], pa.string())})
    before = worker.rows_decoded
    out = worker.caption(preprocessor(batch))
    assert out.column("status").to_pylist() == ["error", "error"]
    assert worker.rows_decoded == before


def test_integer_ids_keep_their_type(tiny_pair):
    pre = Preprocessor(tiny_pair[0], id_column="key", image_column="img")
    out = pre(pa.table({"key": pa.array([5, 9], pa.int64()), "img": pa.array([png_bytes(1), b""])}))
    assert out.column("key").type == pa.int64() and out.column("status").to_pylist() == ["ok", "error"]


def test_models_from_s3_prefix(s3, tiny_pair, tmp_path, monkeypatch):
    """s3:// model prefixes are copied to a local cache once; the preprocessor copies no weights."""
    import os

    import pyarrow.fs as pafs

    from workers.caption import CaptionWorker

    monkeypatch.setenv("SPECLLAVA_MODEL_CACHE", str(tmp_path / "cache"))
    fs = s3.filesystem()
    s3.make_bucket("models")
    for role, path in zip(("target", "draft"), tiny_pair):
        pafs.copy_files(path, f"models/pair/{role}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    pre = Preprocessor("s3://models/pair/target", s3_endpoint=s3.endpoint)
    worker = CaptionWorker("s3://models/pair/target", "s3://models/pair/draft", s3_endpoint=s3.endpoint,
                           max_new_tokens=4, torch_threads=1)
    out = worker.caption(pre(pa.table({"id": ["a"], "image": [png_bytes(3)]})))
    assert out.column("status").to_pylist() == ["ok"]
    copies = sorted(os.listdir(tmp_path / "cache"))
    assert len(copies) == 3  # processor-only copy of the target, full target, full draft
    weights = [sorted(f for f in os.listdir(tmp_path / "cache" / c) if f.endswith(".safetensors")) for c in copies]
    assert sorted(len(w) > 0 for w in weights) == [False, True, True]


def test_tree_budget_auto_measures_a_table_and_keeps_captions_exact(preprocessor, tiny_pair, tmp_path):
    """--tree-budget auto: the actor measures a tree (or none) per active batch size on its first
    rows; several batches in flight through the async entry point; captions stay the target's."""
    import asyncio

    from workers.caption import CaptionWorker

    worker = CaptionWorker(*tiny_pair, max_new_tokens=MAX_NEW, torch_threads=1, batch_size=3, tree_budget="auto",
                           budget_report=str(tmp_path / "_budget" / "run-x"))
    images = {f"q{i}": png_bytes(40 + i) for i in range(7)}
    prompts = {"q2": "w5 w6 w7 w8 w9 w10 w11", "q5": "w3"}
    groups = [["q0", "q1", "q2"], ["q3", "q4"], ["q5", "q6"]]

    def table(keys):
        return preprocessor(pa.table({"id": keys, "image": pa.array([images[k] for k in keys], pa.binary()),
                                      "prompt": pa.array([prompts.get(k) for k in keys], pa.string())}))

    async def main():
        return await asyncio.gather(*(worker(table(g)) for g in groups))

    outs = asyncio.run(main())
    assert [o.column("id").to_pylist() for o in outs] == groups          # each batch whole, in input order
    assert [e["batch_size"] for e in worker.budget["by_batch_size"]] == [1, 3]
    import json

    from pipeline.run import read_budget_reports   # the driver's side of the report
    from pipeline.layout import BUDGET_DIR

    (report,) = [json.loads(p.read_text()) for p in (tmp_path / BUDGET_DIR / "run-x").glob("*.json")]
    assert report["table"] == worker.budget and report["budget"].startswith("batch>=1: ")
    import pyarrow.fs as pafs
    assert read_budget_reports(pafs.LocalFileSystem(), str(tmp_path), "run-x") == [
        {"actor": report["actor"], "device": "cpu", "budget": report["budget"], "remeasures": []}]
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, images, prompts), MAX_NEW)
    for out in outs:
        for row in out.to_pylist():
            assert row["status"] == "ok" and row["caption"] == ref[row["id"]], row["id"]


def test_tree_budget_is_measured_again_when_the_steps_drift_from_it(preprocessor, tiny_pair, tmp_path,
                                                                    monkeypatch, capsys):
    """A table measured at an unrepresentative moment (here: its step times 50x too slow, as if
    another process had the machine during calibration) is noticed within `budget_window` steps:
    the actor drains its batch, measures again on queued rows, reports both, and no row is lost
    or changed."""
    import asyncio
    import json

    import decoding.budget as budget
    from pipeline.layout import BUDGET_DIR
    from workers.caption import CaptionWorker

    calls = []
    real = budget.choose_table

    def skewed_first_table(*args, **kwargs):
        table = real(*args, **kwargs)
        if not calls:
            for entry in table.entries:
                entry.step_s = {k: v * 50 for k, v in entry.step_s.items()}
        calls.append(table)
        return table

    monkeypatch.setattr(budget, "choose_table", skewed_first_table)
    worker = CaptionWorker(*tiny_pair, max_new_tokens=MAX_NEW, torch_threads=1, batch_size=3, tree_budget="auto",
                           budget_report=str(tmp_path / BUDGET_DIR / "run-d"), budget_window=3)
    images = {f"d{i}": png_bytes(60 + i) for i in range(12)}
    groups = [[f"d{i}" for i in range(j, j + 3)] for j in range(0, 12, 3)]

    def table(keys):
        return preprocessor(pa.table({"id": keys, "image": pa.array([images[k] for k in keys], pa.binary()),
                                      "prompt": pa.array([None] * len(keys), pa.string())}))

    async def main():
        return await asyncio.gather(*(worker(table(g)) for g in groups))

    outs = asyncio.run(main())
    assert [o.column("id").to_pylist() for o in outs] == groups
    assert 1 <= len(worker.remeasures) <= 3 and len(calls) == 1 + len(worker.remeasures)
    first = worker.remeasures[0]
    assert first["reason"].startswith("at batch ") and "calibrated" in first["reason"] and first["seconds"] > 0
    assert "tree budget drifted at batch" in capsys.readouterr().out
    assert worker.budget == calls[-1].to_dict()                       # the new table is the one in use
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / BUDGET_DIR / "run-d").glob("*.json")]
    assert report["remeasures"] == worker.remeasures and report["table"] == worker.budget
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, images, {}), MAX_NEW)
    for out in outs:
        for row in out.to_pylist():
            assert row["status"] == "ok" and row["caption"] == ref[row["id"]], row["id"]


def _arrow_pixels(rows: int, width: int):
    """A read-only float32 numpy view over Arrow memory, as CaptionWorker._requests gets it."""
    values = pa.array([[float(r * width + c) for c in range(width)] for r in range(rows)],
                      type=pa.list_(pa.float32(), width))
    flat = values.values.to_numpy(zero_copy_only=False).reshape(rows, width)
    assert not flat.flags.writeable
    return flat


def test_pixel_gather_is_one_copy_of_the_ok_rows():
    """The CUDA upload's host side (pin=False here: pinning needs CUDA): the ok rows, in order, in
    a new float32 tensor, without writing to (or warning about) the read-only Arrow memory."""
    import warnings

    import torch

    from workers.caption import gather_rows

    flat = _arrow_pixels(5, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = gather_rows(flat, [0, 2, 4], pin=False)
    assert rows.dtype == torch.float32 and torch.equal(rows, torch.tensor(flat[[0, 2, 4]]))
    assert gather_rows(flat, [], pin=False).shape == (0, 12)


def test_pixel_upload_on_cpu_is_unchanged():
    import torch

    from workers.caption import upload_pixels

    flat = _arrow_pixels(4, 12)
    for dtype in (torch.float32, torch.bfloat16):
        pixels = upload_pixels(flat, [1, 3], (3, 2, 2), torch.device("cpu"), dtype)
        assert pixels.dtype == dtype and pixels.shape == (2, 3, 2, 2)
        assert torch.equal(pixels, torch.tensor(flat[[1, 3]]).reshape(2, 3, 2, 2).to(dtype))


def test_pixel_upload_on_cuda_goes_through_pinned_memory():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (pinned memory)")
    from workers.caption import gather_rows, upload_pixels

    flat = _arrow_pixels(4, 12)
    assert gather_rows(flat, [0, 1], pin=True).is_pinned()
    pixels = upload_pixels(flat, [1, 3], (3, 2, 2), torch.device("cuda"), torch.bfloat16)
    assert pixels.device.type == "cuda" and pixels.dtype == torch.bfloat16
    assert torch.equal(pixels.cpu(), torch.tensor(flat[[1, 3]]).reshape(2, 3, 2, 2).to(torch.bfloat16))


def test_compiled_step_graphs_in_the_actor(preprocessor, tiny_pair, capsys):
    """--compile on: the actor's engine runs the compiled step graphs (decoding/graphs.py); its
    captions stay the target's and the start-up log says what was compiled and how long it took."""
    from workers.caption import CaptionWorker

    worker = CaptionWorker(*tiny_pair, max_new_tokens=MAX_NEW, torch_threads=1, batch_size=1, compile="on")
    assert worker.decoder.graphs is not None and worker.decoder.graphs.mode == "default"
    images, prompts = {"c0": png_bytes(77)}, {"c0": "w4 w5"}
    out = worker.caption(preprocessor(pa.table({"id": ["c0"], "image": pa.array([images["c0"]], pa.binary()),
                                                "prompt": pa.array([prompts["c0"]], pa.string())})))
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, images, prompts), MAX_NEW)
    assert out.to_pylist()[0]["caption"] == ref["c0"]
    assert "compiled 2 step graphs in" in capsys.readouterr().out
