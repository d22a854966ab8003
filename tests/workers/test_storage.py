"""workers.storage: the S3 model cache follows the objects, one copy per node; the run reuses a model hash
while the model's listing is unchanged."""
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


def test_one_copy_per_node_when_actors_start_together(s3, tmp_path, monkeypatch):
    """Eight caption actors of one node asking at once: one downloads, the others wait and reuse."""
    import threading

    import workers.storage as storage

    fs = s3.filesystem()
    bucket = s3.make_bucket("cache-once")
    _put(fs, "cache-once/model/config.json", b"{}")
    _put(fs, "cache-once/model/model.safetensors", b"w" * 1000)
    copies = []
    real = storage._copy_listed

    def slow_copy(*args):
        copies.append(threading.get_ident())
        time.sleep(0.5)  # everyone else arrives while this copy runs
        real(*args)

    monkeypatch.setattr(storage, "_copy_listed", slow_copy)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        storage.local_copy(f"{bucket}/model", s3.endpoint, cache_dir=str(tmp_path / "cache")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(copies) == 1 and len(set(results)) == 1 and len(results) == 8
    assert open(os.path.join(results[0], "model.safetensors"), "rb").read() == b"w" * 1000


def test_model_hash_is_reused_while_the_listing_is_unchanged(s3, monkeypatch):
    import pipeline.manifest as mf
    from pipeline.config import CaptionConfig
    from pipeline.run import _hash_models

    fs = s3.filesystem()
    bucket = s3.make_bucket("hash-once")
    for role in ("target", "draft"):
        _put(fs, f"hash-once/{role}/config.json", b"{}")
        _put(fs, f"hash-once/{role}/model.safetensors", role.encode() * 100)
    config = CaptionConfig(input="in", output="out", target=f"{bucket}/target", draft=f"{bucket}/draft",
                           s3_endpoint=s3.endpoint)
    full_reads = []
    real = mf.hash_model_dir
    monkeypatch.setattr(mf, "hash_model_dir", lambda uri, ep=None: full_reads.append(uri) or real(uri, ep))
    first = _hash_models(config, None)
    assert len(full_reads) == 2 and len(first["target"]["sha256"]) == 64
    again = _hash_models(config, {"models": first})
    assert again == first and len(full_reads) == 2          # a resume reads no weights
    time.sleep(1.1)
    _put(fs, "hash-once/draft/model.safetensors", b"changed!" * 25)   # overwritten in place
    changed = _hash_models(config, {"models": first})
    assert full_reads[2:] == [f"{bucket}/draft"] and changed["draft"]["sha256"] != first["draft"]["sha256"]
