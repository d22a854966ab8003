"""Synthetic caption data: determinism, caption language, shard schema, make-dataset CLI."""
from __future__ import annotations

import io
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from training import synthetic
from jobs.cli import main


def test_make_example_is_a_pure_function_of_seed_and_index():
    a, b = synthetic.make_example(3, 17), synthetic.make_example(3, 17)
    assert a == b
    assert synthetic.make_example(4, 17)["image"] != a["image"]
    assert synthetic.make_example(3, 18)["image"] != a["image"]
    assert a["id"] == "s3-00000017"


def test_images_decode_with_the_declared_size():
    row = synthetic.make_example(0, 5, side=96)
    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "PNG" and image.size == (96, 96) == (row["width"], row["height"])


def test_captions_parse_back_to_the_ground_truth_and_cover_every_value():
    rows = [synthetic.make_example(1, i) for i in range(300)]
    seen = {k: set() for k in synthetic.ATTRIBUTES}
    templates = set()
    for row in rows:
        truth = {k: row[k] for k in synthetic.ATTRIBUTES}
        assert synthetic.parse_caption(row["caption"]) == truth, row["caption"]
        assert synthetic.attribute_accuracy(synthetic.parse_caption(row["caption"]), truth)[0] == (
            6 if row["count"] == 1 else 5)
        for k in synthetic.ATTRIBUTES:
            seen[k].add(row[k])
        templates.add(row["caption"].split()[0:2].__repr__())
        assert set(row["caption"].split()) <= set(synthetic.vocabulary())
    assert seen["count"] == {1, 2, 3} and seen["shape"] == set(synthetic.SHAPES)
    assert seen["color"] == set(synthetic.COLORS) and seen["background"] == set(synthetic.BACKGROUNDS)
    assert seen["position"] == set(synthetic.POSITIONS) | {None}
    assert len(templates) >= 4  # several phrasings


def test_attribute_accuracy_scores_each_attribute():
    truth = {"count": 2, "size": "small", "color": "red", "shape": "circle", "background": "plain", "position": None}
    pred = synthetic.parse_caption("two small blue circles on a plain background")
    assert synthetic.attribute_accuracy(pred, truth) == (4, 5)
    assert synthetic.attribute_accuracy(synthetic.parse_caption("gibberish"), truth) == (0, 5)  # no position for 2


def test_write_shards_schema_atomicity_and_resume(tmp_path):
    out = tmp_path / "data"
    paths = synthetic.write_shards(10, 4, str(out), seed=7)
    assert sorted(os.listdir(out)) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert pq.read_schema(paths[0]).equals(synthetic.SCHEMA)
    table = synthetic.read_rows(str(out))
    assert table.num_rows == 10 and table.column("id").to_pylist() == [f"s7-{i:08d}" for i in range(10)]
    assert table.slice(4, 1).to_pylist()[0] == synthetic.make_example(7, 4)
    mtime = os.path.getmtime(paths[1])
    os.remove(paths[2])
    synthetic.write_shards(10, 4, str(out), seed=7)  # resumes: only the missing shard is written
    assert os.path.getmtime(paths[1]) == mtime and os.path.exists(paths[2])


def test_make_dataset_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-dataset", "--num-images", "5", "--shard-size", "2", "--output", str(out), "--quiet"]) == 0
    assert len(list(out.glob("shard-*.parquet"))) == 3
    assert "wrote 5 images in 3 shards" in capsys.readouterr().err
    assert main(["make-dataset", "--num-images", "0", "--output", str(out)]) == 2
    assert "specllava: error:" in capsys.readouterr().err


def test_scene_rejects_inconsistent_attributes():
    with pytest.raises(ValueError):
        synthetic.Scene(count=2, shape="circle", color="red", size="small", position="center",
                        background="plain", template=0)
