"""The pipeline end to end (real local Ray, Parquet in and out) with a LLaVA-NeXT target and a
text-only draft: images of different sizes become different token counts and tile counts;
every id comes out once and the captions equal the target's own greedy captions."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tests.pipeline_helpers import cli, corrupt_bytes, processed_inputs, reference_captions
from tests.workers.test_anyres_worker import SIZES, image_bytes

MAX_NEW = 8


def test_next_target_with_a_text_draft_end_to_end(ray_address, tmp_path):
    from decoding.testing import save_tiny_next_pair
    from workers.preprocess import Preprocessor

    target, draft = (str(p) for p in save_tiny_next_pair(tmp_path / "pair", draft="text"))
    images = {f"n{i:02d}": image_bytes(100 + i, *SIZES[i % len(SIZES)]) for i in range(18)}
    images["bad"] = corrupt_bytes()
    ids = list(images)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "image": pa.array([images[k] for k in ids], pa.binary())}),
                   tmp_path / "in" / "shard-0.parquet")
    rc = cli(["caption", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--target", target,
              "--draft", draft, "--stage-cpus", "0.25", "--cpus-per-actor", "0.5", "--batch-size", "6",
              "--max-new-tokens", str(MAX_NEW), "--prompt", "w4 w5"])
    assert rc == 0
    table = pads.dataset(str(tmp_path / "out" / "data"), format="parquet").to_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(ids) and table.num_rows == len(ids)
    assert rows["bad"]["status"] == "error"
    pre = Preprocessor(target, image_column="image", prompt="w4 w5")
    ref = reference_captions(target, processed_inputs(pre, {k: v for k, v in images.items() if k != "bad"}), MAX_NEW)
    mismatches = [k for k in ref if rows[k]["caption"] != ref[k]]
    assert not mismatches, mismatches[:5]
