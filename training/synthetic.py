"""Deterministic synthetic captioning data: Pillow scenes of simple shapes with reference captions.

Contract
- `make_example(seed, index)` is a pure function of (seed, index): same inputs, same PNG bytes,
  same attributes and caption, on any machine and in any order (shards can be made in parallel).
- A scene is 1-3 identical shapes (one shape, one color, one size class) on a plain, noisy or
  striped background. A single shape also has a position (a 3x3-grid corner or the center).
- The caption language is small and regular (see `TEMPLATES` and `vocabulary()`), with four
  phrasings chosen at random per image; `parse_caption` inverts any of them into attributes, so a
  model's caption can be scored attribute by attribute with `attribute_accuracy`.
- `write_shards` writes Parquet shards (columns in `SCHEMA`) to a local directory, or to any
  pyarrow filesystem the caller resolved (the CLI passes its S3 filesystem; this module has no
  storage code of its own).
  Locally a shard is written to `.<name>.tmp` and renamed, so a half-written shard never looks done;
  existing shards are skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 50), "purple": (160, 60, 210), "cyan": (60, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (0.14, 0.19), "large": (0.27, 0.33)}  # of image side
BACKGROUNDS = ("plain", "noisy", "striped")
# Single-shape positions: cells of a 3x3 grid, as (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top right": (2, 0), "center": (1, 1), "bottom left": (0, 2), "bottom right": (2, 2),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
TEMPLATES = (
    "{obj}{where} on a {bg} background",
    "there {be} {obj}{where} on a {bg} background",
    "a {bg} background with {obj}{where}",
    "the picture shows {obj}{where} on a {bg} background",
)
PROMPTS = ("describe the image .", "write a short caption for this picture .", "what is in the image ?")
ATTRIBUTES = ("count", "size", "color", "shape", "background", "position")

SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("count", pa.int32()), ("shape", pa.string()), ("color", pa.string()), ("size", pa.string()),
    ("position", pa.string()), ("background", pa.string()), ("caption", pa.string()),
    ("boxes", pa.string()),  # JSON list of [x0, y0, x1, y1] per shape
])


@dataclass(frozen=True)
class Scene:
    count: int
    shape: str
    color: str
    size: str
    position: str | None  # only when count == 1
    background: str
    template: int

    def __post_init__(self):
        if self.count not in COUNT_WORDS or self.shape not in SHAPES or self.color not in COLORS:
            raise ValueError(f"bad scene {self}")
        if (self.position is None) != (self.count != 1) or self.background not in BACKGROUNDS:
            raise ValueError(f"bad scene {self}")


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 4))
    return Scene(
        count=count,
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))] if count == 1 else None,
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        template=int(rng.integers(len(TEMPLATES))),
    )


def caption(scene: Scene) -> str:
    plural = "s" if scene.count > 1 else ""
    obj = f"{COUNT_WORDS[scene.count]} {scene.size} {scene.color} {scene.shape}{plural}"
    if scene.position is None:
        where = ""
    elif scene.position == "center":
        where = " in the center"
    else:
        where = f" in the {scene.position} corner"
    return TEMPLATES[scene.template].format(obj=obj, where=where, bg=scene.background,
                                            be="is" if scene.count == 1 else "are")


_OBJ = re.compile(r"\b(a|two|three) (small|large) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")s?\b")
_BG = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r") background\b")
_POS = re.compile(r"\bin the (" + "|".join(POSITIONS) + r")\b")


def parse_caption(text: str) -> dict:
    """Attributes named in a caption; a missing attribute maps to None."""
    text = " ".join(text.lower().split())
    out: dict = dict.fromkeys(ATTRIBUTES)
    if m := _OBJ.search(text):
        out.update(count={"a": 1, "two": 2, "three": 3}[m.group(1)], size=m.group(2), color=m.group(3), shape=m.group(4))
    if m := _BG.search(text):
        out["background"] = m.group(1)
    if m := _POS.search(text):
        out["position"] = m.group(1)
    return out


def attribute_accuracy(pred: dict, truth: dict) -> tuple[int, int]:
    """(correct, total) over the attributes that apply to `truth` (position only for one shape)."""
    keys = [k for k in ATTRIBUTES if k != "position" or truth.get("count") == 1]
    return sum(pred.get(k) == truth.get(k) for k in keys), len(keys)


def vocabulary() -> list[str]:
    """Every word the captions and the default prompts can contain (for building a tokenizer)."""
    words = set()
    for t in TEMPLATES:
        words.update(re.sub(r"\{\w+\}", " ", t).split())
    words.update(COUNT_WORDS.values())
    words.update(["is", "are", "in", "the", "corner", "center", "top", "bottom", "left", "right"])
    words.update(SIZES)
    words.update(COLORS)
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(BACKGROUNDS)
    for p in PROMPTS:
        words.update(p.split())
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def _background(scene: Scene, rng: np.random.Generator, side: int) -> np.ndarray:
    level = rng.integers(25, 100)
    tint = np.clip(level + rng.integers(-12, 13, size=3), 0, 255)
    img = np.broadcast_to(tint, (side, side, 3)).astype(np.float32).copy()  # [H, W, 3]
    if scene.background == "striped":
        period = int(rng.integers(4, 9))
        yy, xx = np.mgrid[0:side, 0:side]
        coord = [xx, yy, xx + yy, xx - yy][rng.integers(4)]
        img += (((coord // (period // 2 + 1)) % 2) * 45.0)[..., None]
    return img


def render(scene: Scene, rng: np.random.Generator, side: int = 64) -> tuple[Image.Image, list[list[int]]]:
    """Draw `scene` on a `side` x `side` RGB image; returns the image and the shapes' boxes."""
    base = _background(scene, rng, side)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    lo, hi = SIZES[scene.size]
    cell = side / 3
    for _layout in range(100):  # rejection sampling of non-overlapping boxes; restart on a dead end
        placed: list[tuple[float, float, float]] = []  # (cx, cy, r)
        boxes: list[list[int]] = []
        for _ in range(scene.count):
            for _attempt in range(50):
                r = rng.uniform(lo, hi) * side / 2
                if scene.position is not None:
                    col, row = POSITIONS[scene.position]
                    cx = rng.uniform(max(col * cell, r + 1), min((col + 1) * cell, side - r - 1))
                    cy = rng.uniform(max(row * cell, r + 1), min((row + 1) * cell, side - r - 1))
                else:
                    cx, cy = rng.uniform(r + 1, side - r - 1, size=2)
                box = [int(cx - r), int(cy - r), int(np.ceil(cx + r)), int(np.ceil(cy + r))]
                if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]
                       for b in boxes):
                    placed.append((cx, cy, r))
                    boxes.append(box)
                    break
            else:
                break
        if len(placed) == scene.count:
            break
    else:
        raise RuntimeError(f"could not place {scene.count} shapes on a {side}px image")
    for cx, cy, r in placed:
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[scene.color])
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif scene.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    if scene.background == "noisy":
        arr = np.asarray(image).astype(np.float32) + rng.normal(0, 22, size=(side, side, 3))
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return image, boxes


def make_example(seed: int, index: int, side: int = 64) -> dict:
    """One dataset row (a dict matching `SCHEMA`), a pure function of (seed, index, side)."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    image, boxes = render(scene, rng, side)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    row = asdict(scene)
    row.pop("template")
    return dict(id=f"s{seed}-{index:08d}", image=buf.getvalue(), width=side, height=side,
                caption=caption(scene), boxes=json.dumps(boxes), **row)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def _filesystem(path: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it): a given filesystem takes `path` as is; a URI (s3://bucket/key with
    the default AWS endpoint) is resolved by pyarrow; anything else is a local path."""
    if filesystem is not None:
        return filesystem, path.rstrip("/")
    if "://" in path:
        return pafs.FileSystem.from_uri(path.rstrip("/"))
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def write_shards(num_images: int, shard_size: int, output: str, seed: int = 0, side: int = 64,
                 filesystem: pafs.FileSystem | None = None, progress: bool = False) -> list[str]:
    """Write `num_images` rows as Parquet shards under `output`; returns the shard paths.

    `output` is a local directory, or a path inside `filesystem` (e.g. "bucket/prefix" of an
    S3FileSystem). Shards that already exist are kept (same seed -> same content), so reruns resume.
    """
    if num_images < 1 or shard_size < 1:
        raise ValueError("num_images and shard_size must be >= 1")
    fs, root = _filesystem(output, filesystem)
    fs.create_dir(root, recursive=True)
    num_shards = (num_images + shard_size - 1) // shard_size
    shards = range(num_shards)
    if progress:
        from tqdm import tqdm
        shards = tqdm(shards, desc="shards", unit="shard")
    paths = []
    for shard in shards:
        path = f"{root}/{shard_name(shard)}"
        paths.append(path)
        if fs.get_file_info(path).type == pafs.FileType.File:
            continue
        start, stop = shard * shard_size, min(num_images, (shard + 1) * shard_size)
        rows = [make_example(seed, i, side) for i in range(start, stop)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        if not isinstance(fs, pafs.LocalFileSystem):  # an object only becomes visible once its upload completes
            pq.write_table(table, path, filesystem=fs)
        else:
            tmp = f"{root}/.{shard_name(shard)}.tmp"  # dot-prefixed: dataset readers skip it
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, path)
    return paths


def read_rows(path: str, filesystem: pafs.FileSystem | None = None, limit: int | None = None) -> pa.Table:
    """Read the shards under `path` (a directory of *.parquet or one file) as one table."""
    import pyarrow.dataset as ds

    fs, root = _filesystem(path, filesystem)
    dataset = ds.dataset(root, filesystem=fs, format="parquet", exclude_invalid_files=False)
    return dataset.head(limit) if limit else dataset.to_table()
