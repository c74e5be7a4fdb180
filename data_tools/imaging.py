"""Decode, repair, bound, resize and re-encode one web image (the single image path of `convert`).

Web data is dirty (DESIGN.md section 2): every outcome here is either an `Encoded` image or an
`ImageRejected` carrying a short machine-readable reason, so the converter can account for each
listed record. Decompression bombs are refused from the header, before any pixel is decoded.

Pixel modes beyond 8 bits (TIFF, 16-bit PNG) are scaled to 8 bits, never clipped (clipping turns
them white): 16-bit modes ('I;16', 'I;16B', ...) by their fixed range, keeping the top 8 bits,
so brightness is kept; 32-bit integer ('I') and float ('F') images, whose range no format fixes
(0..1, 0..255, 0..65535 and raw sensor counts all occur), by their own finite minimum..maximum
(NaN and infinities become the minimum; a constant image is mid-grey). The repair is recorded as
"mode:F" (or "mode:I", ...) plus "scale:minmax" or "scale:16bit". A mode Pillow cannot turn into
RGB is rejected as `unsupported_pixel_format`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons a record can be rejected for; the manifest and the README use these words.
REASONS = {
    "missing_file": "listed but not on disk",
    "not_a_regular_file": "a directory, FIFO, socket or device, never opened",
    "empty_file": "zero bytes",
    "unreadable_file": "could not be read (permissions or I/O error)",
    "not_an_image": "bytes of no image format Pillow knows",
    "too_large": "more pixels than --max-pixels (decompression-bomb guard)",
    "truncated": "image data ends early",
    "decode_error": "the decoder failed on the image data",
    "unsupported_pixel_format": "a pixel mode with no RGB conversion (e.g. LAB, multi-band float)",
    "duplicate_listing": "the same path is listed again in the split",
}

EXIF_ORIENTATION = 0x0112


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    """The bytes written to the shard and what was done to get them."""

    data: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str  # what the bytes really were (JPEG, PNG, GIF, ...), whatever the file name says
    orig_mode: str  # Pillow mode before conversion (RGB, L, CMYK, P, ...)
    passthrough: bool  # original bytes kept unchanged
    repairs: tuple[str, ...]  # e.g. ("format:PNG", "mode:CMYK", "exif_rotate")


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the shorter side at most `max_side`, aspect ratio kept (never upscales)."""
    short = min(width, height)
    if short <= max_side:
        return width, height
    scale = max_side / short
    # The shorter side lands exactly on max_side; the longer one is rounded.
    if width <= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def prepare_image(raw: bytes, max_side: int = 256, quality: int = 90,
                  max_pixels: int = 100_000_000) -> Encoded:
    """Turn raw file bytes into an RGB JPEG with shorter side <= `max_side`.

    A JPEG that is already RGB, small enough and not rotated by EXIF passes through unchanged
    (after a full decode proves it is intact), so no generation loss is added to it.
    """
    if not raw:
        raise ImageRejected("empty_file")
    try:
        with warnings.catch_warnings():
            # Our own pixel bound below replaces Pillow's bomb warning/error at 89M/179M pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"starts with {raw[:8]!r}") from None
    except Exception as exc:  # noqa: BLE001 - any header parser failure is a decode error
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} > {max_pixels} pixels")

    fmt, mode = img.format or "unknown", img.mode
    orientation = _exif_orientation(img)
    new_w, new_h = target_size(width, height, max_side)
    if fmt == "JPEG" and mode == "RGB" and (new_w, new_h) == (width, height) and orientation in (None, 1):
        _load(img)
        return Encoded(raw, width, height, width, height, fmt, mode, True, ())

    if fmt == "JPEG" and mode in ("RGB", "L") and orientation in (None, 1):
        # DCT-domain downscaling: libjpeg decodes at 1/2, 1/4 or 1/8 size directly when that still
        # leaves at least the target size; large web images then decode several times faster.
        img.draft(mode, (new_w, new_h))
    _load(img)

    repairs: list[str] = []
    if fmt != "JPEG":
        repairs.append(f"format:{fmt}")
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        repairs.append("exif_rotate")
        new_w, new_h = target_size(img.width, img.height, max_side)
    if img.mode != "RGB":
        repairs.append(f"mode:{img.mode}")
        img, scaled = to_8bit(img)
        if scaled:
            repairs.append(scaled)
        img = _to_rgb(img)
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), new_w, new_h, width, height, fmt, mode, False, tuple(repairs))


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except OSError as exc:
        if "truncated" in str(exc) or "broken data stream" in str(exc):
            raise ImageRejected("truncated", str(exc)) from None
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - decoder internals raise many types
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, the pixels still count
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode; transparent pixels are laid on white, as a browser shows them."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:  # e.g. LAB, or a mode Pillow only reads
        raise ImageRejected("unsupported_pixel_format", f"mode {img.mode}: {exc}") from None


def to_8bit(img: Image.Image) -> tuple[Image.Image, str | None]:
    """A mode 'L' image from a 16-bit, 32-bit integer or float greyscale one (see the module
    docstring), and how it was scaled; other modes are returned unchanged with None."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)), "scale:16bit"
    if img.mode not in ("I", "F"):
        return img, None
    values = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", img.size, 128), "scale:minmax"
    low, high = values[finite].min(), values[finite].max()
    values = np.where(finite, values, low)
    if high == low:
        return Image.new("L", img.size, 128), "scale:minmax"
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8)), "scale:minmax"


def describe(reason: str) -> str:
    return REASONS.get(reason, reason)
