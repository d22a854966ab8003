"""The caption actor with a LLaVA-NeXT target (no Ray): images of different sizes in one batch,
a NeXT draft or a text-only draft, bad rows kept; captions equal the target's own greedy ones."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.pipeline_helpers import corrupt_bytes, processed_inputs, reference_captions
from workers.preprocess import Preprocessor

MAX_NEW = 8
SIZES = [(16, 16), (20, 40), (40, 18), (33, 33), (8, 30), (64, 20)]   # (height, width)


def image_bytes(seed: int, height: int, width: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["next", "text"])
def next_pair(request, tmp_path_factory):
    from decoding.testing import save_tiny_next_pair

    target, draft = save_tiny_next_pair(tmp_path_factory.mktemp(f"next-{request.param}"), draft=request.param)
    return str(target), str(draft)


def mixed_batch(seed: int = 0):
    images = {f"r{i}": image_bytes(seed + i, h, w) for i, (h, w) in enumerate(SIZES)}
    images["corrupt"] = corrupt_bytes()
    prompts = {"r1": "w5 w6 w7 w8 w9", "r4": "w3"}
    ids = list(images)
    table = pa.table({"id": ids, "image": pa.array([images[k] for k in ids], pa.binary()),
                      "prompt": pa.array([prompts.get(k) for k in ids], pa.string())})
    return images, prompts, table


def test_preprocess_carries_tiles_and_image_sizes(next_pair):
    pre = Preprocessor(next_pair[0], image_column="image", prompt_column="prompt")
    assert pre.anyres and pre.pixel_shape == (5, 3, 16, 16)          # base tile + the 2x2 grid at most
    images, prompts, table = mixed_batch()
    out = pre(table)
    rows = out.to_pylist()
    assert [r["image_sizes"] for r in rows] == [list(s) for s in SIZES] + [None]
    counts = [sum(t == 95 for t in r["input_ids"]) for r in rows[:-1]]
    assert len(set(counts)) > 2                                       # sizes give other token counts
    assert rows[-1]["status"] == "error"


@pytest.mark.parametrize("budget", ["off", "auto"])
def test_next_worker_matches_target_greedy_on_mixed_sizes(next_pair, budget):
    from workers.caption import CaptionWorker

    pre = Preprocessor(next_pair[0], image_column="image", prompt_column="prompt")
    worker = CaptionWorker(*next_pair, max_new_tokens=MAX_NEW, torch_threads=1, batch_size=4, tree_budget=budget)
    assert worker.decoder.text_draft == (type(worker.draft).__name__ == "LlamaForCausalLM")
    images, prompts, table = mixed_batch(seed=10)
    out = {r["id"]: r for r in worker.caption(pre(table)).to_pylist()}
    assert out["corrupt"]["status"] == "error"
    ref = reference_captions(next_pair[0], processed_inputs(pre, images, prompts), MAX_NEW)
    assert set(ref) == {f"r{i}" for i in range(len(SIZES))}
    for key, caption in ref.items():
        assert out[key]["status"] == "ok" and out[key]["caption"] == caption, key
        assert out[key]["new_tokens"] == 1 + sum(out[key]["accepted_lengths"])
    if budget == "auto":
        assert worker.budget is not None
