"""pipeline.storage.local_copy: the S3 model cache follows the objects, not only the URI."""
from __future__ import annotations

import os
import time


def _put(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def test_model_overwritten_in_place_gets_a_fresh_copy(s3, tmp_path):
    from workers.storage import local_copy

    fs = s3.filesystem()
    bucket = s3.make_bucket("cache-test")
    _put(fs, "cache-test/model/config.json", b'{"v": 1}')
    _put(fs, "cache-test/model/model.safetensors", b"old weights")
    cache = str(tmp_path / "cache")

    first = local_copy(f"{bucket}/model", s3.endpoint, cache_dir=cache)
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == b"old weights"
    assert local_copy(f"{bucket}/model", s3.endpoint, cache_dir=cache) == first  # unchanged: cached

    time.sleep(1.1)  # S3 last-modified times have 1 s resolution
    _put(fs, "cache-test/model/model.safetensors", b"new weights")  # same size, new content
    second = local_copy(f"{bucket}/model", s3.endpoint, cache_dir=cache)
    assert second != first
    assert open(os.path.join(second, "model.safetensors"), "rb").read() == b"new weights"

    small = local_copy(f"{bucket}/model", s3.endpoint, cache_dir=cache, skip_weights=True)
    assert sorted(os.listdir(small)) == ["config.json"]
