"""The `ffcv` backend's host-side finish on a CPU: the strong view's colour ops and the
normalisation of both views, compiled with numba and run on the loader's threads, one sample each.

On a CUDA device the `ffcv` backend keeps doing this on the device, batched (mopro_fast.views.color).
On a CPU those batched tensor ops ran on the trainer's thread after FFCV's threads were done:
seven blend stages and a hue rotation over the whole float batch, then a normalisation pass:
12.9 ms per 224 px sample on one thread here, against 1.3 ms for the pass below (`bench loader`:
ffcv went from about 1x to about 3x the original's PIL loader), while FFCV's own threads waited.
Here each sample is one pass over its pixels, in parallel over the batch
(`numba.prange`, numba's thread pool, which the FFCV loader sizes to `loader.workers`):

- weak view: uint8 -> `(x - 255 mean) / (255 std)` float32;
- strong view: grayscale (if drawn), then brightness / contrast / saturation / hue in the sample's
  own order, each with its factor, each followed by a clamp to [0, 255], nothing rounded between ops,
  then the same normalisation. These are the float definitions of `views.augment.color_jitter`
  (torchvision's formulas; contrast blends with the mean of the grey image, saturation with the grey
  image, hue is the hexcone rotation of `views.hue`), with the same parameters
  (`views.color.sample_strong_color`, drawn on the host as before): the oracle test
  (tests/test_ffcv.py) compares the two to float rounding.

Compiled with `fastmath` (reassociation, no NaN/inf checks: the values are bounded), about 20 %
faster here and still equal to the tensor ops to float rounding. Arrays are HWC (FFCV's output
layout): `B x H x W x 3` float32, which is `B x 3 x H x W` channels-last after a permute, with no copy.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from mopro_fast.data.batch import IMAGENET_MEAN, IMAGENET_STD

# These parallel loops run on the trainer's thread while FFCV's pipeline thread runs its own: numba's
# "workqueue" layer is not safe for that, so ask for a thread-safe one (TBB, which the ffcv extra's
# system packages bring along with OpenCV, or OpenMP). Set before the first parallel launch.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "threadsafe"

_LUMA_R, _LUMA_G, _LUMA_B = 0.2989, 0.587, 0.114  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # op codes, views.cpu.JITTER_OPS order
MEAN = np.array([255 * m for m in IMAGENET_MEAN], dtype=np.float32)
INV_STD = np.array([1 / (255 * s) for s in IMAGENET_STD], dtype=np.float32)


@numba.njit(nogil=True, inline="always", fastmath=True, error_model="numpy")
def _clamp255(v):
    return min(max(v, np.float32(0.0)), np.float32(255.0))


@numba.njit(nogil=True, inline="always", fastmath=True, error_model="numpy")
def _ramp(n, h6):
    """clamp(min(k, 4 - k), 0, 1) with k = (n + h6) mod 6: one channel's share of the chroma removed."""
    k = n + h6
    k = k - 6.0 * math.floor(k / 6.0)
    return min(max(min(k, 4.0 - k), 0.0), 1.0)


@numba.njit(nogil=True, fastmath=True, error_model="numpy")
def _hue_pixel(r, g, b, shift6):
    """One pixel's hue rotated by `shift6` sextants (shift x 6), values on [0, 255] (views.hue's form)."""
    top = max(r, max(g, b))
    chroma = top - min(r, min(g, b))
    if chroma <= 0:
        return r, g, b
    if top == r:
        h6 = (g - b) / chroma
    elif top == g:
        h6 = (b - r) / chroma + 2.0
    else:
        h6 = (r - g) / chroma + 4.0
    h6 = h6 + shift6
    return (np.float32(top - chroma * _ramp(5.0, h6)), np.float32(top - chroma * _ramp(3.0, h6)),
            np.float32(top - chroma * _ramp(1.0, h6)))


@numba.njit(nogil=True, inline="always", fastmath=True, error_model="numpy")
def _apply(op, f, r, g, b, mean):
    """Op `op` (not CONTRAST unless `mean` is the image's grey mean) with factor `f` on one pixel."""
    if op == HUE:
        return _hue_pixel(r, g, b, np.float32(6.0) * f)
    if op == BRIGHTNESS:
        other = np.float32(0.0)
    elif op == CONTRAST:
        other = mean
    else:  # SATURATION
        other = _LUMA_R * r + _LUMA_G * g + _LUMA_B * b
    keep = 1 - f
    return _clamp255(f * r + keep * other), _clamp255(f * g + keep * other), _clamp255(f * b + keep * other)


@numba.njit(nogil=True, fastmath=True, error_model="numpy")
def _strong_one(img, x, gray, factors, order, norm_mean, norm_inv_std):
    """The strong view of one sample: uint8 img H x W x 3 -> normalised float32 x H x W x 3.

    Two passes over the pixels: the ops before contrast (and the sum of the grey image they leave,
    the contrast's centre), then contrast, the ops after it and the normalisation.
    """
    height, width = img.shape[0], img.shape[1]
    at = 0  # the position of CONTRAST in the order
    for t in range(4):
        if order[t] == CONTRAST:
            at = t
    total = 0.0
    for y in range(height):
        for xx in range(width):
            r, g, b = np.float32(img[y, xx, 0]), np.float32(img[y, xx, 1]), np.float32(img[y, xx, 2])
            if gray:
                r = g = b = _LUMA_R * r + _LUMA_G * g + _LUMA_B * b
            for t in range(at):
                r, g, b = _apply(order[t], np.float32(factors[order[t]]), r, g, b, np.float32(0.0))
            total += _LUMA_R * r + _LUMA_G * g + _LUMA_B * b
            x[y, xx, 0], x[y, xx, 1], x[y, xx, 2] = r, g, b
    mean = np.float32(total / (height * width))
    for y in range(height):
        for xx in range(width):
            r, g, b = x[y, xx, 0], x[y, xx, 1], x[y, xx, 2]
            for t in range(at, 4):
                r, g, b = _apply(order[t], np.float32(factors[order[t]]), r, g, b, mean)
            x[y, xx, 0] = (r - norm_mean[0]) * norm_inv_std[0]
            x[y, xx, 1] = (g - norm_mean[1]) * norm_inv_std[1]
            x[y, xx, 2] = (b - norm_mean[2]) * norm_inv_std[2]


@numba.njit(nogil=True, parallel=True, fastmath=True, error_model="numpy")
def strong_views(images, out, gray, factors, order, mean, inv_std):
    """images B x H x W x 3 uint8 -> out B x H x W x 3 float32: colour ops, then normalised."""
    for i in prange(images.shape[0]):
        _strong_one(images[i], out[i], gray[i], factors[i], order[i], mean, inv_std)


@numba.njit(nogil=True, parallel=True, fastmath=True, error_model="numpy")
def weak_views(images, out, mean, inv_std):
    """images B x H x W x 3 uint8 -> out B x H x W x 3 float32, normalised."""
    for i in prange(images.shape[0]):
        for y in range(images.shape[1]):
            for xx in range(images.shape[2]):
                for c in range(3):
                    out[i, y, xx, c] = (np.float32(images[i, y, xx, c]) - mean[c]) * inv_std[c]


def finish_on_host(view_q: np.ndarray, view_k: np.ndarray, gray: np.ndarray, factors: np.ndarray,
                   order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weak, strong) B x H x W x 3 float32, normalised, from FFCV's uint8 HWC views and the strong
    view's colour parameters (gray B bool, factors B x 4 float32, order B x 4 int64)."""
    q = np.empty(view_q.shape, dtype=np.float32)
    k = np.empty(view_k.shape, dtype=np.float32)
    weak_views(view_q, q, MEAN, INV_STD)
    strong_views(view_k, k, gray, factors.astype(np.float32), order.astype(np.int64), MEAN, INV_STD)
    return q, k
