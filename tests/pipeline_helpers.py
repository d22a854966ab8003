"""Helpers for pipeline/worker tests: synthetic images, bad images, shards, greedy references."""
from __future__ import annotations

import io

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

    rows: {id: (input_ids [T], pixel_values [C, H, W])}.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = LlavaForConditionalGeneration.from_pretrained(target_dir, use_safetensors=True).eval()
    tokenizer = AutoProcessor.from_pretrained(target_dir).tokenizer
    out = {}
    with torch.no_grad():
        for key, (ids, pix) in rows.items():
            ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
            gen = target.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                                  pixel_values=torch.as_tensor(pix)[None], do_sample=False,
                                  max_new_tokens=max_new_tokens)
            out[key] = tokenizer.decode(gen[0, ids_t.shape[1]:].tolist(), skip_special_tokens=True).strip()
    return out


def processed_inputs(preprocessor, images: dict, prompts: dict | None = None) -> dict:
    """{id: (input_ids, pixel_values)} for decodable images, using the pipeline's Preprocessor."""
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
