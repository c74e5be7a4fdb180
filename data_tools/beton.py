"""FFCV `.beton` output of `mopro-fast convert --format ffcv|both` (DESIGN.md section 3).

One file per split, `OUT/<split>.beton`, in FFCV's own format (version 2, readable by a stock
`ffcv.loader.Loader`) with three fields:
    image   RGBImageField: per sample a JPEG or raw RGB pixels (FFCV's `mode` 0 / 1), width, height
    label   IntField: the web label
    index   IntField: the sample index within the split (the shards' `.sid`)

The records, their order and the rejects are the shards' own: the file is written from the
finished per-shard tars in plan order, so the image of each record is the one `prepare_image`
produced for the shard (one decode/resize path feeds both outputs). Per sample, `write_mode`:
- "jpg": the shard's JPEG bytes, unchanged (no second generation loss);
- "raw": the shard's JPEG decoded once here (Pillow, libjpeg-turbo), stored as uint8 H x W x 3;
- "proportion": "jpg" with probability `compress_probability`, else "raw"; the draw is seeded
  per (seed, split, sample index), so the file is a pure function of the shards and settings.
`max_resolution` > 0 additionally bounds the longer side (FFCV's meaning of the word), resizing
with the convert's own bicubic filter; such a resized image is JPEG-encoded at `jpeg_quality`
when stored as JPEG. With the default 0 the .beton holds exactly the shards' images.
A raw image that does not fit one page (8 MiB, FFCV's default page size) is stored as JPEG.

Writing is single-process and streaming: FFCV's own `DatasetWriter` forks worker processes
(unsafe after torch has started threads) and re-encodes every image, so we lay the file out
ourselves with FFCV's header types and page allocator: header, field descriptors, the metadata
table, data pages, allocation table.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from mopro_fast.errors import MoproError
from data_tools.convert_config import DEFAULTS as _D, recipe_of, validate_convert
from mopro_fast.config import ConfigError
from mopro_fast.safe_io import OutputError, describe, discard, temp_name

PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's DatasetWriter default (4 x its 2 MiB minimum)
FIELDS_DOC = {"image": "RGBImageField: JPEG (mode 0) or raw uint8 H x W x 3 (mode 1), width, height",
              "label": "IntField: web label", "index": "IntField: sample index in split (the shards' sid)"}
_MODE_JPG, _MODE_RAW = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES


class BetonError(MoproError):
    """The .beton cannot be written as asked; one line."""


@dataclass(frozen=True)
class BetonSettings:
    """FFCV write options: the ffcv section of a convert settings file (data_tools/convert_config.py
    documents them and holds the defaults; FFCV-style: ffcv-imagenet writes proportion / 0.5 / 90)."""

    write_mode: str = _D.ffcv.write_mode
    max_resolution: int = _D.ffcv.max_resolution  # 0 = the shards' images as they are
    jpeg_quality: int = _D.ffcv.jpeg_quality
    compress_probability: float = _D.ffcv.compress_probability

    def check(self) -> None:
        """BetonError naming the first bad value (the settings file's rules, convert_config.py)."""
        from data_tools.convert import ConvertSettings

        try:
            validate_convert(recipe_of(ConvertSettings(), self))
        except ConfigError as exc:
            raise BetonError(str(exc)) from None


def require_ffcv() -> None:
    """Raise BetonError with what to install when ffcv cannot be imported."""
    try:
        import ffcv.types  # noqa: F401
    except ImportError as exc:
        raise BetonError(f"--format ffcv needs the ffcv package ({exc}); install: apt-get install pkg-config "
                         f"libopencv-dev libturbojpeg0-dev, then pip install -e .[ffcv]") from None


def store_as_jpeg(settings: BetonSettings, seed: int, split: str, index: int) -> bool:
    if settings.write_mode == "proportion":
        # str seeds hash with SHA-512 in `random`: stable across runs and machines.
        return random.Random(f"ffcv-mode/{seed}/{split}/{index}").random() < settings.compress_probability
    return settings.write_mode == "jpg"


def encode_image(jpeg: bytes, as_jpeg: bool, settings: BetonSettings) -> tuple[int, int, int, np.ndarray]:
    """(mode, height, width, payload) of one sample's image; the payload is the uint8 data to store."""
    img = Image.open(io.BytesIO(jpeg))  # lazy: only the header is read here
    width, height = img.size
    if settings.max_resolution and max(width, height) > settings.max_resolution:
        scale = settings.max_resolution / max(width, height)
        img = img.convert("RGB").resize((max(1, int(width * scale)), max(1, int(height * scale))),
                                        Image.Resampling.BICUBIC)
        if as_jpeg:
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=settings.jpeg_quality)
            jpeg = out.getvalue()
    if as_jpeg:
        return _MODE_JPG, img.height, img.width, np.frombuffer(jpeg, dtype=np.uint8)
    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)  # H x W x 3
    if pixels.nbytes > PAGE_SIZE:  # FFCV keeps a sample within one page
        return encode_image(jpeg, True, settings)
    return _MODE_RAW, pixels.shape[0], pixels.shape[1], np.ascontiguousarray(pixels).reshape(-1)


def write_beton(path: Path, samples: Iterable[tuple[bytes, int, int]], num_samples: int, settings: BetonSettings,
                seed: int, split: str, tick: Callable[[], None] = lambda: None) -> dict:
    """Write `num_samples` (JPEG bytes, label, index) samples to `path` (via a temporary name).

    Returns {"samples", "jpg", "raw"} counts. The file is byte-identical for the same inputs. On
    any failure the temporary file is removed; an OS error (full disk, ...) is a one-line
    `mopro_fast.safe_io.OutputError`.
    """
    require_ffcv()
    tmp = temp_name(path)
    try:
        return _write_beton(path, tmp, samples, num_samples, settings, seed, split, tick)
    except OSError as exc:
        discard(tmp)
        raise OutputError(describe(exc, path)) from None
    except BaseException:
        discard(tmp)
        raise


def _write_beton(path: Path, tmp: Path, samples: Iterable[tuple[bytes, int, int]], num_samples: int,
                 settings: BetonSettings, seed: int, split: str, tick: Callable[[], None]) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_metadata_type)

    fields = {"image": RGBImageField(), "label": IntField(), "index": IntField()}
    metadata = np.zeros(num_samples, dtype=get_metadata_type(list(fields.values())))
    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"], header["num_fields"] = CURRENT_VERSION, len(fields)
    header["page_size"], header["num_samples"] = PAGE_SIZE, num_samples
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, field) in enumerate(fields.items()):
        descriptors[i]["type_id"] = type_ids[type(field)]
        descriptors[i]["name"][:len(name)] = np.frombuffer(name.encode("ascii"), dtype=np.uint8)
        descriptors[i]["arguments"][:] = field.to_binary()[0]
    metadata_start = HeaderType.itemsize + descriptors.nbytes

    counts = {"samples": 0, "jpg": 0, "raw": 0}
    with open(tmp, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(descriptors.tobytes())
    allocator = MemoryAllocator(str(tmp), metadata_start + metadata.nbytes, PAGE_SIZE)
    allocator.__enter__()  # opens the file for appending pages (FFCV's API is a bare context manager)
    try:
        for i, (jpeg, label, index) in enumerate(samples):
            if i >= num_samples:
                raise BetonError(f"{path.name}: more samples than the {num_samples} planned")
            mode, height, width, payload = encode_image(jpeg, store_as_jpeg(settings, seed, split, index), settings)
            if max(height, width) > 0xFFFF or payload.nbytes > PAGE_SIZE:
                raise BetonError(f"{split} sample {index}: a {width}x{height} image ({payload.nbytes} bytes) does "
                                 f"not fit FFCV's format (sides < 65536, 8 MiB a sample); lower --max-side")
            allocator.set_current_sample(i)
            ptr, storage = allocator.malloc(payload.nbytes)
            storage[:] = payload
            row = metadata[i]
            row["f0"]["mode"], row["f0"]["height"], row["f0"]["width"], row["f0"]["data_ptr"] = mode, height, width, ptr
            row["f1"], row["f2"] = label, index
            counts["samples"] += 1
            counts["jpg" if mode == _MODE_JPG else "raw"] += 1
            tick()
    finally:
        allocator.__exit__(None, None, None)
    if counts["samples"] != num_samples:
        raise BetonError(f"{path.name}: {counts['samples']} samples written, {num_samples} planned")
    table = np.array(allocator.allocations, dtype=ALLOC_TABLE_TYPE) if allocator.allocations else \
        np.zeros(0, dtype=ALLOC_TABLE_TYPE)
    with open(tmp, "r+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < metadata_start + metadata.nbytes:  # no data page written (no samples)
            fh.write(b"\0" * (metadata_start + metadata.nbytes - fh.tell()))
        header["alloc_table_ptr"] = fh.tell()
        fh.write(table.tobytes())
        fh.seek(metadata_start)
        fh.write(metadata.tobytes())
        fh.seek(0)
        fh.write(header.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return counts
