"""Helpers for pipeline/worker tests: synthetic images, bad images, shards, greedy references."""
from __future__ import annotations

import contextlib
import io
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def cli(argv: list[str]) -> int:
    """`specllava ARGV` in-process, with only this module's subcommands registered (so another
    subcommand's import problem cannot fail these tests)."""
    import jobs.cli

    saved = list(jobs.cli.COMMAND_MODULES)
    jobs.cli.COMMAND_MODULES[:] = ["jobs.caption"]
    try:
        return jobs.cli.main(argv)
    finally:
        jobs.cli.COMMAND_MODULES[:] = saved


CLI_SUBPROCESS = ["-c", "import sys, jobs.cli as c; c.COMMAND_MODULES[:] = ['jobs.caption']; "
                        "sys.exit(c.main(sys.argv[1:]))"]


@contextlib.contextmanager
def sigkilled_on_exit(proc):
    """The block runs while `proc` (a driver process) lives; leaving it SIGKILLs and reaps the
    process: the drills' kill, and the clean-up when the block failed."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def batch_delay(seconds: float):
    """Caption actors started inside this block sleep `seconds` after each batch (workers/drill.py),
    so a kill or an outage lands mid-run. Restores the environment after."""
    from workers.drill import BATCH_DELAY_ENV

    saved = os.environ.get(BATCH_DELAY_ENV)
    os.environ[BATCH_DELAY_ENV] = str(seconds)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(BATCH_DELAY_ENV, None)
        else:
            os.environ[BATCH_DELAY_ENV] = saved


def png_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def corrupt_bytes() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4


def truncated_bytes() -> bytes:
    return png_bytes(7, 64)[:120]


def huge_bytes(side: int = 8000) -> bytes:
    """A small file whose header claims side*side pixels (over the default 40M-pixel limit)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(fs, path: str, table: pa.Table) -> None:
    pq.write_table(table, path, filesystem=fs)


def reference_captions(target_dir: str, rows: dict, max_new_tokens: int) -> dict:
    """The target's own greedy captions: target.generate(do_sample=False) on the same processed
    inputs (one row at a time, no padding), decoded like the worker decodes.

    rows: {id: (input_ids [T], pixel_values [C, H, W] or [tiles, C, H, W], image size or None)}.
    """
    from transformers import AutoProcessor

    from decoding.loading import load_model

    target = load_model(target_dir)
    tokenizer = AutoProcessor.from_pretrained(target_dir).tokenizer
    out = {}
    with torch.no_grad():
        for key, (ids, pix, size) in rows.items():
            ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
            vision = {} if size is None else {"image_sizes": torch.tensor([size])}
            gen = target.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                                  pixel_values=torch.as_tensor(pix)[None], do_sample=False,
                                  max_new_tokens=max_new_tokens, **vision)
            out[key] = tokenizer.decode(gen[0, ids_t.shape[1]:].tolist(), skip_special_tokens=True).strip()
    return out


def processed_inputs(preprocessor, images: dict, prompts: dict | None = None) -> dict:
    """{id: (input_ids, pixel_values, image size or None)} for decodable images, using the pipeline's Preprocessor."""
    from workers.preprocess import decode_image

    rows = {}
    for key, data in images.items():
        try:
            image = decode_image(data)
        except Exception:  # noqa: BLE001 - bad images have no reference caption
            continue
        prompt = (prompts or {}).get(key) or preprocessor.prompt
        rows[key] = preprocessor.encode(image, prompt)
    return rows


def image_bytes(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    """A valid 1-bit side x side PNG of zeros: ~side²/8000 bytes on disk, side² bytes once decoded
    by Pillow (mode "1" keeps a byte per pixel). Written by hand so building it needs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    block = 1000  # rows per compress call: 30000 calls of one row take seconds
    data = b"".join(packer.compress(row * min(block, side - start)) for start in range(0, side, block))
    data += packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def hostile_images() -> dict[str, bytes]:
    """The hostile corpus of issue 6, by name. tests/faults/test_hostile_images.py states what
    each one must become (an error row with a given reason, or a decoded image)."""
    rng = np.random.default_rng(6)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    jpeg = image_bytes(photo, "JPEG", quality=90)
    two_halves = Image.new("RGB", (40, 20), (255, 0, 0))
    two_halves.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    palette = Image.fromarray(np.repeat(np.array([[0] * 10 + [1] * 10], np.uint8), 20, axis=0), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    frames = [Image.new("RGB", (24, 24), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gray16 = Image.fromarray((np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113).astype(np.uint16))
    return {
        "jpeg-truncated-header": jpeg[:300],
        "jpeg-truncated-scan": jpeg[: len(jpeg) * 2 // 3],
        "zero-bytes": b"",
        "random-bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n",
        "cmyk-jpeg": image_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95),
        "png-16bit": image_bytes(gray16, "PNG"),
        "palette-alpha": image_bytes(palette, "PNG", transparency=1),
        "one-pixel": image_bytes(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "bomb-30000": bomb_png(30000),
        "exif-rotated": image_bytes(two_halves, "JPEG", quality=95, exif=exif.tobytes()),
        "animated-gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40,
                                    loop=0),
    }
