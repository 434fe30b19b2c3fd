"""The one preprocessing path: file bytes -> uint8 RGB array of a fixed size, or a reject reason.

`prepare`, `score` and `predict` all call `decode_image`; the model itself holds the 1/255
scaling (see model.py), so training never sees pixels that scoring would see differently.

Decisions, documented once here:
- EXIF orientation is applied (phones store rotated JPEGs).
- Every mode becomes RGB. 16-bit grey (I;16*, I) is scaled by 1/257 rather than clipped;
  transparency (RGBA, LA, PA, P with a transparent colour) is composited on white.
- Resize squashes to `size` x `size` with bilinear filtering (antialiased by Pillow), as the
  seed's `image_dataset_from_directory` did: faces are not cropped away.
- JPEGs larger than twice the target use Pillow's draft mode (DCT scaling in libjpeg) first,
  which decodes at 1/2, 1/4 or 1/8 scale but never below the target size; bench/score.py
  measures its effect on pixels and predictions (bench/RESULTS.md).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from emotion_ray.config import DecodeLimits

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
ALPHA_BACKGROUND = (255, 255, 255)
# The limits' one definition is config.DecodeLimits; these are its defaults.
DEFAULT_MAX_PIXELS = DecodeLimits().max_pixels
DEFAULT_MAX_FILE_BYTES = DecodeLimits().max_file_bytes

# Pillow's own guard warns above MAX_IMAGE_PIXELS and raises at twice that; we check the header
# against our own limit first, so keep Pillow's error as the backstop only.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS * 2


@dataclass(frozen=True)
class Decoded:
    """Result of decoding one file: `pixels` is None exactly when `error` is set."""

    pixels: np.ndarray | None
    width: int | None  # original size, before resize
    height: int | None
    error: str | None = None


def read_and_decode(
    read: Callable[[], bytes], size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[bytes | None, Decoded]:
    """`read()` the file's bytes, then `decode_image` them; a failed read is an `unreadable`
    result (or the exception's own `reason`, e.g. too_large for a file refused unread).

    Returns the bytes too (None when unreadable) so callers can hash what they decoded.
    """
    try:
        data = read()
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a result, not a crash
        return None, Decoded(None, None, None, read_error(exc))
    return data, decode_image(data, size, max_pixels=max_pixels, max_file_bytes=max_file_bytes)


def read_error(exc: Exception) -> str:
    """The error text of a failed read: "<reason>: <type>: <detail>", reason `unreadable` unless
    the exception names its own (`reason` attribute)."""
    return f"{getattr(exc, 'reason', 'unreadable')}: {type(exc).__name__}: {exc}"


def has_image_extension(path: str) -> bool:
    dot = path.rfind(".")
    return dot != -1 and path[dot:].lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(wide / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    # Alpha channels, and colour keys (tRNS): a palette index, an RGB colour or a grey value.
    if "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


@dataclass(frozen=True)
class Opened:
    """A decoded picture before resizing: `image` is None exactly when `error` is set.

    `image` is RGB and EXIF-rotated; it may be smaller than the original (JPEG draft mode), so
    `scale` = width / image.width maps its pixels back to the displayed original's.
    """

    image: Image.Image | None
    width: int | None  # the displayed (EXIF-rotated) original's size
    height: int | None
    error: str | None = None

    @property
    def scale(self) -> float:
        return self.width / self.image.width if self.image is not None else 1.0


# EXIF orientations that turn the stored picture by 90 degrees: width and height swap on display.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def open_image(data: bytes, min_side: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Opened:
    """Decode `data` to an EXIF-rotated RGB Pillow image, or say why not. Never raises.

    JPEGs at least twice `min_side` on their shorter side are decoded with draft mode (DCT
    scaling) at the smallest of 1/2, 1/4, 1/8 that keeps the shorter side >= `min_side`.
    Reject reasons: empty, too_large (bytes or pixels), decompression_bomb, not_an_image,
    truncated, corrupt.
    """
    if not data:
        return Opened(None, None, None, "empty: file has no bytes")
    if len(data) > max_file_bytes:
        return Opened(None, None, None, f"too_large: {len(data)} bytes > limit {max_file_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return Opened(None, width, height, f"too_large: {width}x{height} pixels > limit {max_pixels}")
            if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            if img.format == "JPEG" and min(width, height) >= 2 * min_side:
                img.draft("RGB", (min_side, min_side))
            img.load()  # truncation surfaces here
            # in_place: without it Pillow returns a full copy even when there is nothing to rotate
            # (10% of the whole decode for a 512px JPEG).
            ImageOps.exif_transpose(img, in_place=True)
            return Opened(img, width, height)
    except Image.DecompressionBombError as exc:
        return Opened(None, None, None, f"decompression_bomb: {exc}")
    except Image.DecompressionBombWarning as exc:
        return Opened(None, None, None, f"decompression_bomb: {exc}")
    except UnidentifiedImageError:
        return Opened(None, None, None, "not_an_image: Pillow cannot identify the format")
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or damaged data as OSError/SyntaxError/ValueError.
        reason = "truncated" if "truncated" in str(exc).lower() or _shorter_than_declared(data) else "corrupt"
        return Opened(None, None, None, f"{reason}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one bad file must never kill a job
        return Opened(None, None, None, f"corrupt: {type(exc).__name__}: {exc}")


def _shorter_than_declared(data: bytes) -> bool:
    """Whether a RIFF (WebP) file holds fewer bytes than its header declares: Pillow says only
    "could not create decoder object" for a cut WebP, where JPEG and PNG say truncated."""
    return data[:4] == b"RIFF" and len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 > len(data)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """An opened picture as an (H, W, 3) uint8 RGB array at its own size (for face detection)."""
    return np.asarray(_to_rgb(img), dtype=np.uint8)


def decode_image(
    data: bytes,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Decoded:
    """Decode `data` to a (size, size, 3) uint8 RGB array, or say why not. Never raises.

    `width`/`height` are the displayed (EXIF-rotated) original's size.
    """
    opened = open_image(data, size, max_pixels=max_pixels, max_file_bytes=max_file_bytes)
    if opened.error:
        return Decoded(None, opened.width, opened.height, opened.error)
    img = opened.image
    try:
        if img.mode == "L" and img.size != (size, size) and "transparency" not in img.info:
            # Grey: resize one channel, then replicate it (the same pixels as converting
            # first, at a third of the cost; greyscale face datasets are common).
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - one bad file must never kill a job
        return Decoded(None, opened.width, opened.height, f"corrupt: {type(exc).__name__}: {exc}")
    if pixels.shape != (size, size, 3):
        return Decoded(None, opened.width, opened.height, f"corrupt: decoded shape {pixels.shape}")
    return Decoded(pixels, opened.width, opened.height)


def pixels_to_arrow(images: list[np.ndarray | None]) -> pa.BinaryArray:
    """Decoded images (None for a failed one) -> an Arrow binary column, null where None.

    Each image is copied once, straight into the column's data buffer (building it from
    `tobytes()` values costs two more copies: a tenth of the decode time at 256x256).
    """
    lengths = np.fromiter((0 if im is None else im.nbytes for im in images), dtype=np.int64, count=len(images))
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("batch too large for one Arrow binary column: use a smaller batch size")
    data = np.empty(offsets[-1], dtype=np.uint8)
    for im, start, length in zip(images, offsets, lengths):
        if im is not None:
            data[start : start + length] = im.reshape(-1)
    validity = pa.array([im is not None for im in images], pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), len(images), [validity, pa.py_buffer(offsets.astype(np.int32)),
                                                            pa.py_buffer(data)])


def pixels_from_arrow(column: pa.Array | pa.ChunkedArray, size: int) -> np.ndarray:
    """The non-null images of a binary column as one (N, size, size, 3) uint8 array.

    Every image has the same byte length, so the valid rows are contiguous in Arrow's data
    buffer: a view between the first and last offsets, no per-row copy.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    present = column.drop_null()
    if not len(present):
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    offsets = np.frombuffer(present.buffers()[1], dtype=np.int32)[present.offset : present.offset + len(present) + 1]
    data = np.frombuffer(present.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(-1, size, size, 3)
