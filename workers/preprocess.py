"""CPU stage: image bytes (or URI) + prompt → input_ids and pixel_values, one row per input row.

A plain callable on pyarrow batches (Ray Data `map_batches(..., batch_format="pyarrow")`), so
it is tested without Ray. A row whose image cannot be used (empty, undecodable, truncated,
not an allowed format, over the byte/pixel/aspect limits, missing URI) becomes status="error"
with a one-line reason; nothing here raises for bad data. Images that decode are normalised to
upright 8-bit RGB (see decode_image). Rows are not padded: the worker pads its own batch.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError, features

from workers import storage
from workers.schema import (DEFAULT_PROMPT, OUTPUT_FIELDS, STATUS_ERROR, STATUS_OK, carry_row_index, one_line,
                            output_schema, preprocessed_schema)

DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # ~6300x6300; Pillow's own bomb limit is 89M
DEFAULT_MAX_ASPECT = 50.0  # beyond this, shortest-edge resizing makes absurdly long images


class ImageRejected(ValueError):
    """The row's image cannot be used; the message goes to the `error` column."""


# Formats a caption corpus holds (JPEG includes MPO). Anything else (EPS, PDF, PSD, ...) is
# refused before a plugin parses it: EPS would hand the bytes to Ghostscript, a classic
# remote-code vector.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF") + (("AVIF",) if features.check("avif") else ())
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
Image.init()  # register every plugin once, so Image.open(formats=...) can name WEBP and TIFF


def decode_image(data: bytes | None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Decode and validate one image; returns a fully loaded RGB image or raises (ImageRejected
    with a readable reason for every case a corpus is known to hold).

    - Only ALLOWED_FORMATS are opened; the pixel limit is checked from the header, before any
      pixel data is decoded, so a decompression bomb costs a header read.
    - Animations (GIF, APNG, WebP) and multi-page files: the first frame.
    - The EXIF orientation is applied, so a phone photo stored sideways is captioned upright.
    - 16-bit grayscale is scaled to 8 bits (not clipped to white); transparency (RGBA, LA,
      palette with a transparent index) is composited on white, as img2dataset does; CMYK is
      converted by Pillow's JPEG decoder (Adobe-inverted CMYK included).
    """
    if data is None or len(data) == 0:
        raise ImageRejected("empty image")
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, over the {max_bytes}-byte limit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageRejected(f"not a readable image in a supported format ({', '.join(ALLOWED_FORMATS)}); "
                                f"{len(data)} bytes starting {data[:8].hex()}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Pillow's own header check (over ~89M pixels) fires before ours can.
            raise ImageRejected(f"image is over the {max_pixels}-pixel limit (decompression bomb: {exc})") from None
        except OSError as exc:
            raise ImageRejected(f"corrupt or truncated image header: {exc}") from None
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageRejected(f"image is {width}x{height}, over the {max_pixels}-pixel limit")
        if max(width, height) / min(width, height) > max_aspect:
            raise ImageRejected(f"image is {width}x{height}, aspect ratio over {max_aspect:g}")
        try:
            image.load()  # truncated/corrupt pixel data fails here, not later in the processor
        except OSError as exc:
            raise ImageRejected(f"corrupt or truncated {image.format} data: {exc}") from None
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode Pillow decodes to; see decode_image for the conventions."""
    if image.mode in _SIXTEEN_BIT_GRAY:
        values = np.asarray(image)  # [H, W] uint16, or int32 for "I" (taken as 16-bit data too)
        if values.dtype.kind == "i":
            values = np.clip(values, 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


class ImageSource:
    """A row's image: bytes from `image_column`, or an object fetched from `image_uri_column`;
    `image(batch, i)` decodes and validates it (ImageRejected and friends for a bad one)."""

    def __init__(self, *, id_column: str = "id", image_column: str | None = "image",
                 image_uri_column: str | None = None, s3_endpoint: str | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT):
        if (image_column is None) == (image_uri_column is None):
            raise ValueError("give exactly one of image_column and image_uri_column")
        self.id_column = id_column
        self.image_column = image_column
        self.image_uri_column = image_uri_column
        self.s3_endpoint = s3_endpoint
        self.limits = dict(max_bytes=max_image_bytes, max_pixels=max_pixels, max_aspect=max_aspect)
        self._filesystems: dict = {}

    def image(self, batch: pa.Table, i: int) -> Image.Image:
        return decode_image(self._image_bytes(batch, i), **self.limits)

    def _image_bytes(self, batch: pa.Table, i: int) -> bytes | None:
        if self.image_column is not None:
            return batch.column(self.image_column)[i].as_py()
        uri = batch.column(self.image_uri_column)[i].as_py()
        if not uri:
            raise ImageRejected("empty image URI")
        try:
            return storage.fetch_bytes(uri, self.s3_endpoint, self.limits["max_bytes"], self._filesystems)
        except FileNotFoundError as exc:
            raise ImageRejected(f"missing image object: {storage.redact(uri)}") from exc


class ImageChecker(ImageSource):
    """`caption --dry-run`'s only stage: every image decoded and checked as for captioning (same
    rules, same error messages), no model. Returns output-table rows: status ok with an empty
    caption, or error with the reason; decoding statistics stay null."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status, errors = [], []
        for i in range(n):
            try:
                self.image(batch, i)
            except Exception as exc:  # noqa: BLE001 - any failure is this row's error (see Preprocessor)
                status.append(STATUS_ERROR)
                errors.append(one_line(exc))
                continue
            status.append(STATUS_OK)
            errors.append(None)
        id_col = batch.column(self.id_column).combine_chunks()
        columns = {"caption": ["" if s == STATUS_OK else None for s in status], "status": status, "error": errors}
        arrays = [id_col] + [pa.array(columns.get(f.name, [None] * n), f.type) for f in OUTPUT_FIELDS]
        return carry_row_index(pa.Table.from_arrays(arrays, schema=output_schema(self.id_column, id_col.type)), batch)


class Preprocessor(ImageSource):
    """Decode images and run the target's processor.

    Args:
        target: local dir or s3:// prefix of the target checkpoint (its processor is used).
        id_column: kept unchanged in the output.
        image_column / image_uri_column: exactly one: bytes in the row, or a URI to fetch.
        prompt: used when the row has no `prompt_column` value.
        prompt_column: optional per-row prompt column name (None: always `prompt`).
        s3_endpoint: for s3:// URIs and an s3:// target.
    """

    def __init__(self, target: str, *, prompt: str = DEFAULT_PROMPT, prompt_column: str | None = None,
                 s3_endpoint: str | None = None, **image_options):
        from transformers import AutoProcessor

        super().__init__(s3_endpoint=s3_endpoint, **image_options)
        self.prompt = prompt
        self.prompt_column = prompt_column
        self.processor = AutoProcessor.from_pretrained(storage.local_copy(target, s3_endpoint, skip_weights=True))
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"the target's processor at {target} has no chat template")
        _, probe, size = self.encode(Image.new("RGB", (32, 32)), prompt)
        self.anyres = size is not None
        if self.anyres:   # NeXT: [tiles, C, H, W] per image, tiles by its size; rows hold the most a grid gives
            tile = probe.shape[1:]
            grids = self.processor.image_processor.image_grid_pinpoints
            self.pixel_shape = (1 + max((h // tile[1]) * (w // tile[2]) for h, w in grids), *tile)
        else:
            self.pixel_shape = tuple(probe.shape)  # [C, H, W]
        self.pixel_size = int(np.prod(self.pixel_shape))

    def render(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def encode(self, image: Image.Image, prompt: str) -> tuple[np.ndarray, np.ndarray, list[int] | None]:
        """(input_ids [T] int32, pixel_values float32, image size [height, width] or None) for one
        image and prompt: pixel_values [C, H, W], or [tiles, C, H, W] with the image's size for an
        any-resolution processor (NeXT)."""
        out = self.processor(images=[image], text=[self.render(prompt)], return_tensors="np")
        size = out.get("image_sizes")
        return (out["input_ids"][0].astype(np.int32), out["pixel_values"][0].astype(np.float32),
                None if size is None else [int(v) for v in size[0]])

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        prompts = (batch.column(self.prompt_column).to_pylist() if self.prompt_column
                   else [None] * n)
        status, errors, input_ids, sizes = [], [], [], []
        pixels = np.zeros((n, self.pixel_size), dtype=np.float32)
        for i in range(n):
            try:
                image = self.image(batch, i)
                ids, pix, size = self.encode(image, prompts[i] or self.prompt)
            # A row's image bytes can make Pillow (or the processor) fail in many ways
            # (OSError, SyntaxError, struct.error, ...): all of them are this row's error.
            except Exception as exc:  # noqa: BLE001
                status.append(STATUS_ERROR)
                errors.append(one_line(exc))
                input_ids.append([])
                sizes.append(None)
                continue
            status.append(STATUS_OK)
            errors.append(None)
            input_ids.append(ids)
            sizes.append(size)
            pixels[i, : pix.size] = pix.reshape(-1)   # any-resolution: the tiles past this image's stay zero
        id_col = batch.column(self.id_column).combine_chunks()
        schema = preprocessed_schema(self.id_column, id_col.type, self.pixel_size)
        pixel_col = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), self.pixel_size)
        out = pa.Table.from_arrays(
            [id_col, pa.array(status), pa.array(errors, pa.string()),
             pa.array(input_ids, pa.list_(pa.int32())), pixel_col, pa.array(sizes, pa.list_(pa.int32()))],
            schema=schema,
        )
        return carry_row_index(out, batch)
