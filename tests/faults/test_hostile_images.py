"""Issue 6, item 5: a hostile image corpus becomes error rows or correct captions, never a crash,
with bounded memory.

Layers: decode_image on each file (what it must decode to, or why it is refused); the
Preprocessor on the whole corpus as one batch (one row per row, no Ray); the peak RSS of the
preprocess step on a decompression bomb (a fresh process); then one real pipeline run (Ray Data,
moto S3, a URI column, so a missing object is part of the corpus) proving every id exactly once
and ok captions equal to the target's own greedy captions.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from tests import REPO_ROOT
from tests.pipeline_helpers import (cli, hostile_images, image_bytes, png_bytes, processed_inputs, reference_captions,
                              write_shard)
from workers.preprocess import ImageRejected, Preprocessor, decode_image

MAX_NEW = 8
OK = None  # expected error substring None: the image decodes and is captioned
EXPECTED = {
    "jpeg-truncated-header": "corrupt or truncated image header",
    "jpeg-truncated-scan": "corrupt or truncated JPEG data",
    "zero-bytes": "empty image",
    "random-bytes": "not a readable image",
    "eps": "not a readable image",
    "bomb-30000": "pixel limit",
    "cmyk-jpeg": OK,
    "png-16bit": OK,
    "palette-alpha": OK,
    "one-pixel": OK,
    "exif-rotated": OK,
    "animated-gif": OK,
}
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    images = hostile_images()
    assert sorted(images) == sorted(EXPECTED)
    return images


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decode_image_refuses_or_decodes_each_case(corpus, name):
    if EXPECTED[name] is not OK:
        with pytest.raises(ImageRejected, match=EXPECTED[name]):
            decode_image(corpus[name])
        return
    image = decode_image(corpus[name])
    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(int)  # [H, W, 3]
    if name == "cmyk-jpeg":
        assert np.abs(pixels - RED).max() <= 3
    elif name == "png-16bit":
        # The 16-bit gradient is scaled to 8 bits, not clipped to white (Pillow's plain convert).
        source = (np.arange(24 * 24).reshape(24, 24) * 113).astype(np.uint16)
        assert (pixels == (source >> 8)[..., None]).all()
    elif name == "palette-alpha":
        # Palette index 1 (blue) is the transparent one: composited on white, red kept.
        assert (pixels[:, :10] == RED).all() and (pixels[:, 10:] == WHITE).all()
    elif name == "one-pixel":
        assert image.size == (1, 1) and tuple(pixels[0, 0]) == (10, 200, 30)
    elif name == "exif-rotated":
        # Stored 40x20 left red / right blue, tagged "rotate 90° clockwise": upright it is 20x40,
        # red on top, blue below.
        assert image.size == (20, 40)
        assert np.abs(pixels[:16] - RED).max() <= 8 and np.abs(pixels[24:] - BLUE).max() <= 8
    elif name == "animated-gif":
        assert image.size == (24, 24) and (pixels == RED).all()  # the first frame
    else:
        raise AssertionError(f"no pixel check for {name}")


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", "BMP", "TIFF", "PNG-RGBA"])
def test_other_allowed_formats_decode(fmt):
    """The allow-list keeps the formats web corpora hold; an RGBA image is composited on white."""
    from workers.preprocess import ALLOWED_FORMATS

    if fmt == "AVIF" and "AVIF" not in ALLOWED_FORMATS:
        pytest.skip("this Pillow has no AVIF decoder")
    image = Image.new("RGBA" if fmt == "PNG-RGBA" else "RGB", (24, 24), RED)
    if fmt == "PNG-RGBA":
        image.paste((0, 0, 255, 0), (12, 0, 24, 24))  # right half: fully transparent blue
    lossy = {"WEBP": dict(lossless=True), "AVIF": dict(quality=100)}.get(fmt, {})
    pixels = np.asarray(decode_image(image_bytes(image, fmt.split("-")[0], **lossy))).astype(int)
    assert np.abs(pixels[:, :12] - RED).max() <= 6
    assert np.abs(pixels[:, 12:] - (WHITE if fmt == "PNG-RGBA" else RED)).max() <= 6


def test_formats_outside_the_allow_list_are_never_parsed(corpus, monkeypatch):
    """The EPS plugin (which would run Ghostscript on load) never sees the bytes."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    with pytest.raises(ImageRejected):
        decode_image(corpus["eps"])
    assert not opened
    with pytest.raises(Exception):  # control: a plain open does hand the bytes to the plugin
        Image.open(io.BytesIO(corpus["eps"]))
    assert opened


@pytest.fixture(scope="module")
def preprocessor(tiny_pair):
    return Preprocessor(tiny_pair[0], image_column="image", prompt="w7 w8")


def test_preprocessor_keeps_one_row_per_image_with_clear_errors(preprocessor, corpus):
    ids = ["good-a", *sorted(corpus), "good-b"]
    data = {"good-a": png_bytes(61), "good-b": png_bytes(62), **corpus}
    out = preprocessor(pa.table({"id": ids, "image": pa.array([data[k] for k in ids], pa.binary())}))
    assert out.column("id").to_pylist() == ids
    for key, status, error in zip(ids, out.column("status").to_pylist(), out.column("error").to_pylist()):
        expected = EXPECTED.get(key)
        if expected is OK:
            assert status == "ok" and error is None, (key, error)
        else:
            assert status == "error" and expected in error and "\n" not in error, (key, error)


PEAK_RSS_SCRIPT = r"""
import json, sys
import pyarrow as pa
from tests.pipeline_helpers import bomb_png, png_bytes
from workers.preprocess import Preprocessor

pre = Preprocessor(sys.argv[1], image_column="image")
bomb, control = bomb_png(30000), bomb_png(4000)
pre(pa.table({"id": ["warm"], "image": [png_bytes(1)]}))

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

def step_kib(data):
    # Reset the peak (VmHWM) to the current RSS first: ru_maxrss is a process-lifetime high-water
    # mark, so an earlier peak (imports, loading the processor) would hide this step's growth.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    out = pre(pa.table({"id": ["x"], "image": [data]}))
    return status_kib("VmHWM") - before, out.column("status")[0].as_py()

bomb_kib, bomb_status = step_kib(bomb)
control_kib, control_status = step_kib(control)
print(json.dumps({"bomb_kib": bomb_kib, "bomb_status": bomb_status,
                  "control_kib": control_kib, "control_status": control_status}))
"""


def test_decompression_bomb_costs_no_memory(tiny_pair):
    """Peak RSS of the preprocess step on a valid 30000x30000 PNG (110 KB on disk, 900 MB decoded)
    stays flat; a 4000x4000 control decoded by the same step does raise it, so the meter works."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, tiny_pair[0]],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    print(peak)
    assert peak["bomb_status"] == "error" and peak["control_status"] == "ok"
    assert peak["control_kib"] > 40 * 1024, "the control must decode 16M pixels (48 MB as RGB)"
    assert peak["bomb_kib"] < 16 * 1024, f"the bomb raised peak RSS by {peak['bomb_kib']} KiB"


def test_hostile_corpus_end_to_end_exactly_once_and_greedy_exact(s3, ray_address, tiny_pair, corpus,
                                                                  preprocessor):
    fs = s3.filesystem()
    bucket = s3.make_bucket("hostile-corpus")
    images = {**corpus, "good-a": png_bytes(71), "good-b": png_bytes(72)}
    uris = {}
    for key, data in images.items():
        with fs.open_output_stream(f"hostile-corpus/img/{key}") as stream:
            stream.write(data)
        uris[key] = f"{bucket}/img/{key}"
    uris["missing-object"] = f"{bucket}/img/not-there.png"
    uris["missing-bucket"] = "s3://no-such-bucket-hostile/x.png"
    write_shard(fs, "hostile-corpus/in/a.parquet", pa.table({"id": list(uris), "url": list(uris.values())}))

    output = f"{bucket}/out"
    rc = cli(["caption", "--input", f"{bucket}/in", "--output", output, "--target", tiny_pair[0],
              "--draft", tiny_pair[1], "--s3-endpoint", s3.endpoint, "--image-uri-column", "url",
              "--prompt", "w7 w8", "--batch-size", "4", "--max-new-tokens", str(MAX_NEW),
              "--stage-cpus", "0.25", "--cpus-per-actor", "0.5"])
    assert rc == 0

    table = pads.dataset("hostile-corpus/out/data", filesystem=fs, format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(uris)
    rows = {r["id"]: r for r in table.to_pylist()}
    expected = {**EXPECTED, "good-a": OK, "good-b": OK, "missing-object": "missing image object",
                "missing-bucket": "missing image object"}
    for key, row in rows.items():
        if expected[key] is OK:
            assert row["status"] == "ok" and row["caption"] is not None, (key, row["error"])
        else:
            assert row["status"] == "error" and row["caption"] is None, key
            assert expected[key] in row["error"] and "\n" not in row["error"], (key, row["error"])

    decodable = {k: v for k, v in images.items() if expected[k] is OK}
    ref = reference_captions(tiny_pair[0], processed_inputs(preprocessor, decodable), MAX_NEW)
    assert sorted(ref) == sorted(decodable)
    assert {k: rows[k]["caption"] for k in ref} == ref
