"""FFCV decoder operations for the `ffcv` backend: both training views from one decode, and the eval view.

FFCV 1.0.2 gives each field one pipeline, so two pipelines on the image field would decode it
twice. `TwoViewDecoder` instead decodes each image once (libjpeg-turbo through FFCV's `imdecode`,
or a view of the raw pixels) and writes both random resized crops of DESIGN.md section 1 from it:
area fraction U(0.2, 1), log aspect ratio U(log 3/4, log 4/3), torchvision's 10 tries then a
centre crop (`views.sample_crop`'s algorithm), resized with FFCV's own kernel (OpenCV INTER_AREA),
then a horizontal flip with p = 0.5 per view. The strong view's colour ops run later, batched on
the device (mopro_fast.views.color).

Randomness without RNG state: each value is a counter-based hash (SplitMix64) of the op's seed,
the batch's first and last sample ids, the sample's position in the batch and a draw counter.
Batches are a pure function of the epoch's order, so the views are too, whatever the thread
count, and a resumed epoch (which starts at a batch boundary of the same order) makes the same
views as an uninterrupted one.

Output per sample: uint8 `2 x (res + 1) x res x 3` (HWC, the layout FFCV's kernels write); rows
0..res-1 of view v are its pixels, row res carries its parameters as little-endian uint16s (top,
left, height, width of the crop, source height and width) and a flip byte, for tests and debugging,
and a status byte: 1 when the stored JPEG did not decode (a damaged .beton; the loader raises).

`EvalDecoder` makes `views.eval_view` exactly: resize the shorter side to `resize` with an
antialiased bilinear (triangle) filter, long side floored, then the centre crop with Python's
rounding; only the cropped output pixels are computed. Its output has one more row, whose first
byte is the same decode status.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numba
import numpy as np
from ffcv.libffcv import imdecode, resize_crop
from ffcv.memory_managers import OSCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from mopro_fast.views.cpu import CROP_RATIO, CROP_SCALE, FLIP_P

# Two corrections to FFCV 1.0.2, applied when the ffcv backend is imported (FFCV's only user here):
# 1. Compiler.set_num_threads also calls torch.set_num_threads, shrinking the trainer's intra-op
#    pool to the loader's thread count; keep only numba's half.
# 2. OSCacheManager.state_type sets `.mutable = False` on numba's interned `uint8[::1]` type, which
#    changes that shared object's hash: later dispatchers keyed by it fail (KeyError in typing and
#    at garbage collection) and writable uint8 arrays type as read-only. Build fresh types instead.
def _numba_threads_only(cls, n: int) -> None:
    cls.num_threads = n if n >= 1 else numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))


_READONLY_BYTES = numba.types.Array(numba.types.uint8, 1, "C", readonly=True)  # a fresh type, not the interned one


def _os_cache_state_type(self):
    table = numba.types.Array(numba.types.uint64, 1, "C")
    return numba.types.Tuple([_READONLY_BYTES, table, table])


def _os_cache_reader(self):
    def read(address, mem_state):  # FFCV's reader: the bytes of the allocation starting at `address`
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _READONLY_BYTES(numba.types.uint64, self.state_type))


Compiler.set_num_threads = classmethod(_numba_threads_only)
OSCacheManager.state_type = property(_os_cache_state_type)
OSCacheManager.compile_reader = _os_cache_reader


PARAM_FIELDS = ("top", "left", "height", "width", "src_height", "src_width")  # uint16 each, then a flip byte
_BAD_BYTE = 2 * len(PARAM_FIELDS) + 1  # then 1 when the stored JPEG did not decode (a damaged .beton)
_JPG = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]; 1 = raw pixels

# FFCV's ctypes wrappers, compiled once per process and shared by every pipeline (FFCV's own
# decoders wrap them afresh per pipeline, which compiles them again for every loader).
_imdecode = numba.njit(nogil=True)(imdecode)
_resize_crop = numba.njit(nogil=True)(resize_crop)



@numba.njit(nogil=True, inline="always")
def _mix(h, v):
    """One SplitMix64 round of `h` with `v` (uint64 in, uint64 out; wraps like C)."""
    h = h ^ v
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@numba.njit(nogil=True)
def _uniform(key, counter):
    """Draw number `counter` of stream `key`: a float in [0, 1) with 53 random bits."""
    return np.float64(_mix(key, np.uint64(counter)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True)
def sample_crop(key, first, height, width, scale_lo, scale_hi, log_lo, log_hi):
    """(top, left, h, w) of a RandomResizedCrop box: torchvision's algorithm on draws first, first+1, ..."""
    area = float(height) * float(width)
    for t in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * _uniform(key, first + 4 * t))
        ratio = math.exp(log_lo + (log_hi - log_lo) * _uniform(key, first + 4 * t + 1))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(_uniform(key, first + 4 * t + 2) * (height - h + 1)), height - h)
            left = min(int(_uniform(key, first + 4 * t + 3) * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < math.exp(log_lo):
        w, h = width, int(round(width / math.exp(log_lo)))
    elif in_ratio > math.exp(log_hi):
        h, w = height, int(round(height * math.exp(log_hi)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(nogil=True)
def _flip_columns(img):
    """Reverse the columns of an H x W x 3 image in place."""
    height, width = img.shape[0], img.shape[1]
    for y in range(height):
        for x in range(width // 2):
            for c in range(3):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, width - 1 - x, c]
                img[y, width - 1 - x, c] = tmp


@numba.njit(nogil=True)
def _put_byte(row, k, value):
    row[k // 3, k % 3] = value


@numba.njit(nogil=True)
def _put_params(row, top, left, h, w, src_h, src_w, flip):
    """Write the PARAM_FIELDS as little-endian uint16s and the flip byte into a parameter row (res x 3)."""
    k = 0
    for v in (np.int64(top), np.int64(left), np.int64(h), np.int64(w), np.int64(src_h), np.int64(src_w)):
        _put_byte(row, k, v & 255)
        _put_byte(row, k + 1, v >> 8)
        k += 2
    _put_byte(row, k, 1 if flip else 0)


def read_params(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The parameter rows (B x res x 3 uint8, one view) -> arrays of PARAM_FIELDS plus `flip` and `bad`."""
    flat = rows.reshape(rows.shape[0], -1).astype(np.int64)
    out = {name: flat[:, 2 * i] + 256 * flat[:, 2 * i + 1] for i, name in enumerate(PARAM_FIELDS)}
    out["flip"] = flat[:, 2 * len(PARAM_FIELDS)].astype(bool)
    out["bad"] = flat[:, _BAD_BYTE].astype(bool)
    return out


def bad_rows(rows: np.ndarray, byte: int = _BAD_BYTE) -> np.ndarray:
    """Positions in the batch whose JPEG did not decode: byte `byte` of their parameter rows
    (B x res x 3, `TwoViewDecoder`) or of their status rows (B x crop x 3, `EvalDecoder`: byte 0)."""
    return np.flatnonzero(rows.reshape(rows.shape[0], -1)[:, byte])


def _source_buffer(metadata) -> AllocationQuery:
    """Scratch space for one decoded image of the largest size in the file (uint64: no overflow)."""
    size = np.uint64(metadata["height"].max()) * np.uint64(metadata["width"].max()) * np.uint64(3)
    return AllocationQuery((int(size),), np.dtype("<u1"))


class TwoViewDecoder(Operation):
    """Decode once, emit the weak and the strong view's crops (with flips); see the module docstring."""

    def __init__(self, resolution: int, seed: int):
        super().__init__()
        if resolution < 5:  # the parameter row (3 x res bytes) needs 14
            raise ValueError(f"resolution must be at least 5, got {resolution}")
        self.resolution = resolution
        self.seed = seed & ((1 << 64) - 1)

    def declare_state_and_memory(self, previous_state):
        res = self.resolution
        shape = (2, res + 1, res, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")), _source_buffer(self.metadata)))

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_c, crop_c, flip_c, params_c, mix_c, uniform_c = (_imdecode, _resize_crop, sample_crop, _flip_columns, _put_params, _mix, _uniform)
        put_c, bad_byte = _put_byte, _BAD_BYTE
        res, seed = self.resolution, np.uint64(self.seed)
        scale_lo, scale_hi = CROP_SCALE
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        flip_p = FLIP_P

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            n = len(batch_indices)
            batch_key = mix_c(mix_c(seed, np.uint64(batch_indices[0])), np.uint64(batch_indices[n - 1]))
            for dst_ix in my_range(n):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                status = 0
                if field["mode"] == _JPG:
                    buf = scratch[dst_ix]
                    status = imdecode_c(data, buf, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buf.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                key = mix_c(batch_key, np.uint64(dst_ix))
                for view in range(2):
                    first = 64 * view  # draws 0..39 crop, 48 flip; the views' streams never overlap
                    top, left, h, w = crop_c(key, first, int(height), int(width), scale_lo, scale_hi, log_lo, log_hi)
                    out = destination[dst_ix, view, :res]
                    resize_c(image, top, top + h, left, left + w, out)
                    flip = uniform_c(key, first + 48) < flip_p
                    if flip:
                        flip_c(out)
                    params_c(destination[dst_ix, view, res], top, left, h, w, height, width, flip)
                    put_c(destination[dst_ix, view, res], bad_byte, 1 if status != 0 else 0)
            return destination[:n]

        decode.is_parallel = True
        return decode


@numba.njit(nogil=True)
def _aa_weights(in_size, out_size, first, count):
    """Antialiased bilinear taps for outputs first..first+count-1 of an in_size -> out_size resize.

    PIL's and torchvision's rule: centre (i + 0.5) * scale, triangle filter of support
    max(scale, 1), taps clipped to the image and normalised. Returns (starts, weights count x taps).
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    taps = int(math.ceil(support)) * 2 + 1
    starts = np.zeros(count, dtype=np.int64)
    weights = np.zeros((count, taps), dtype=np.float64)
    for k in range(count):
        center = (first + k + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        total = 0.0
        for j in range(hi - lo):
            wgt = max(0.0, 1.0 - abs((j + lo - center + 0.5) / support))
            weights[k, j] = wgt
            total += wgt
        if total > 0:
            for j in range(hi - lo):
                weights[k, j] /= total
        starts[k] = lo
    return starts, weights


@numba.njit(nogil=True)
def eval_crop(image, resize, crop, out, rows):
    """`views.eval_view(image, resize, crop)` into `out` (crop x crop x 3 uint8); `rows` is float scratch.

    Separable: a horizontal pass over every source row for the cropped output columns, rounded to
    integers as torchvision's uint8 kernel does, then a vertical pass for the cropped output rows.
    """
    height, width = image.shape[0], image.shape[1]
    if width <= height:
        out_h, out_w = int(resize * height / width), resize
    else:
        out_h, out_w = resize, int(resize * width / height)
    top = int(round((out_h - crop) / 2.0))  # Python's round: halves to even, as center_crop
    left = int(round((out_w - crop) / 2.0))
    x0, wx = _aa_weights(width, out_w, left, crop)
    y0, wy = _aa_weights(height, out_h, top, crop)
    for y in range(height):
        for j in range(crop):
            for c in range(3):
                acc = 0.0
                for t in range(wx.shape[1]):
                    if wx[j, t] != 0.0:
                        acc += wx[j, t] * image[y, x0[j] + t, c]
                rows[y, j, c] = min(max(math.floor(acc + 0.5), 0.0), 255.0)
    for i in range(crop):
        for j in range(crop):
            for c in range(3):
                acc = 0.0
                for t in range(wy.shape[1]):
                    if wy[i, t] != 0.0:
                        acc += wy[i, t] * rows[y0[i] + t, j, c]
                out[i, j, c] = np.uint8(min(max(math.floor(acc + 0.5), 0.0), 255.0))


class EvalDecoder(Operation):
    """Decode, resize the shorter side to `resize` (antialiased bilinear), centre crop `crop`."""

    def __init__(self, resize: int, crop: int):
        super().__init__()
        if resize < crop:
            raise ValueError(f"eval resize ({resize}) must be at least the crop ({crop})")
        self.resize, self.crop = resize, crop

    def declare_state_and_memory(self, previous_state):
        shape = (self.crop + 1, self.crop, 3)  # the crop, then a status row (byte 0: 1 = JPEG did not decode)
        rows = (int(self.metadata["height"].max()), self.crop, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")), _source_buffer(self.metadata),
                 AllocationQuery(rows, np.dtype("<f4"))))

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, crop_c = _imdecode, eval_crop
        resize, crop = self.resize, self.crop

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch, rows = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                status = 0
                if field["mode"] == _JPG:
                    buf = scratch[dst_ix]
                    status = imdecode_c(data, buf, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buf.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                crop_c(image, resize, crop, destination[dst_ix, :crop], rows[dst_ix])
                destination[dst_ix, crop, 0, 0] = 1 if status != 0 else 0
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
