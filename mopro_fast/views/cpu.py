"""The image views of DESIGN.md section 1, on uint8 `3 x H x W` tensors, with explicit randomness.

Training gives each sample two views (MoPro section 3.1, augmentations of MoCo v1):
- weak view x (query encoder): RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)) to
  `resolution`^2, then a horizontal flip with p = 0.5;
- strong view x' (momentum encoder): an independent crop of the same family, then
  RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) (brightness, contrast, saturation
  factors uniform in [0.6, 1.4], hue shift uniform in [-0.4, 0.4], the four applied in a random
  order), then a horizontal flip with p = 0.5. This is MoCo v1's order; since every jitter op is
  channel-symmetric, a grayscale strong view stays R = G = B.
The pixel work is torchvision.transforms.v2.functional on uint8 (antialiased bilinear resize, flip),
so it matches `torchvision.transforms.v2` given the same parameters; the strong view's colour ops
are `views.jitter.strong_colour`, torchvision's uint8 kernels computed in one float buffer (the
same values, but the hue shift's, which is `views.hue`'s closed form: equal to one grey level, 4x
faster). The parameters are sampled here,
not by torchvision, because v2 transforms draw from the global torch RNG: our draws come from a
`torch.Generator` the caller seeds, which makes every view reproducible (see torch_loader.py) and
lets tests inspect the sampled parameters (`return_params=True`).

The eval view is `eval_view`; its docstring defines it to the pixel for other backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode

from mopro_fast.views.jitter import strong_colour

CROP_SCALE = (0.2, 1.0)  # area fraction of the source image (MoCo/MoPro use 0.2, not ImageNet's 0.08)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio w / h
FLIP_P = 0.5
GRAY_P = 0.2
JITTER = 0.4  # brightness, contrast, saturation: factor in [1 - 0.4, 1 + 0.4]
HUE = 0.4  # hue shift in [-0.4, 0.4] (fraction of the hue circle)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop before it falls back to a centre crop


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view: the crop box (source pixels), flip, grayscale, jitter."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    grayscale: bool = False
    jitter: tuple[tuple[str, float], ...] = ()  # (op, factor) in the order applied; () for the weak view


class Draws:
    """Uniform [0, 1) floats from a torch.Generator, fetched in blocks (one torch call per block).

    The sequence depends only on the generator's seed, so the views are a pure function of it.
    """

    BLOCK = 32

    def __init__(self, generator: torch.Generator):
        self._generator = generator
        self._buf: list[float] = []
        self._pos = 0

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if self._pos == len(self._buf):
            self._buf = torch.rand(self.BLOCK, generator=self._generator, dtype=torch.float64).tolist()
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return low + (high - low) * u

    def randint(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        return min(int(self.uniform() * n), n - 1)


def sample_crop(draws: Draws, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box: torchvision's algorithm, our random source.

    Up to 10 tries of area fraction ~ U(0.2, 1) and log aspect ratio ~ U(log 3/4, log 4/3); if no
    box fits, the largest centred box with an allowed aspect ratio.
    """
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(_CROP_TRIES):
        target = area * draws.uniform(*CROP_SCALE)
        ratio = math.exp(draws.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return draws.randint(height - h + 1), draws.randint(width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_weak(draws: Draws, height: int, width: int) -> ViewParams:
    top, left, h, w = sample_crop(draws, height, width)
    return ViewParams(top, left, h, w, flip=draws.uniform() < FLIP_P)


def sample_strong(draws: Draws, height: int, width: int) -> ViewParams:
    top, left, h, w = sample_crop(draws, height, width)
    gray = draws.uniform() < GRAY_P
    factors = {"brightness": draws.uniform(1 - JITTER, 1 + JITTER), "contrast": draws.uniform(1 - JITTER, 1 + JITTER),
               "saturation": draws.uniform(1 - JITTER, 1 + JITTER), "hue": draws.uniform(-HUE, HUE)}
    keys = [draws.uniform() for _ in JITTER_OPS]  # a random permutation of the four ops, as ColorJitter
    order = sorted(range(len(JITTER_OPS)), key=keys.__getitem__)
    jitter = tuple((JITTER_OPS[i], factors[JITTER_OPS[i]]) for i in order)
    return ViewParams(top, left, h, w, flip=draws.uniform() < FLIP_P, grayscale=gray, jitter=jitter)


# torchvision's kernels of the colour ops: what views.jitter.strong_colour computes in one float buffer
# (the hue by views.hue's closed form, to one level), kept as the oracle's reference.
JITTER_FNS = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
              "saturation": F.adjust_saturation, "hue": F.adjust_hue}


def apply_view(image: Tensor, params: ViewParams, resolution: int) -> Tensor:
    """uint8 `3 x H x W` -> uint8 `3 x resolution x resolution`: crop+resize, grayscale, jitter, flip."""
    out = F.resized_crop(image, params.top, params.left, params.height, params.width, [resolution, resolution],
                         interpolation=InterpolationMode.BILINEAR, antialias=True)
    if params.grayscale or params.jitter:
        out = strong_colour(out, params.grayscale, params.jitter)  # torchvision's uint8 ops, one float buffer
    if params.flip:
        out = F.horizontal_flip(out)
    return out


def two_views(image: Tensor, generator: torch.Generator, resolution: int, return_params: bool = False):
    """The weak and strong views of DESIGN.md section 1 of one uint8 `3 x H x W` image.

    Returns (view_q, view_k), each uint8 `3 x resolution x resolution` (not yet normalised), or
    (view_q, view_k, (params_q, params_k)) with `return_params`. All randomness comes from
    `generator`, weak view first: the same generator state gives the same views, bit for bit.
    """
    height, width = image.shape[-2:]
    draws = Draws(generator)
    params_q = sample_weak(draws, height, width)
    params_k = sample_strong(draws, height, width)
    view_q, view_k = apply_view(image, params_q, resolution), apply_view(image, params_k, resolution)
    if return_params:
        return view_q, view_k, (params_q, params_k)
    return view_q, view_k


def eval_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `resize` (the longer side floored, as torchvision)."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def eval_view(image: Tensor, resize: int, crop: int) -> Tensor:
    """The evaluation view: uint8 `3 x H x W` -> uint8 `3 x crop x crop` (normalised later).

    Defined exactly (other backends must match it within a small per-pixel tolerance):
    1. Resize so the shorter side is `resize`: output (h', w') = `eval_size(H, W, resize)`, i.e.
       short -> resize, long -> floor(resize * long / short). Bilinear with antialiasing (a triangle
       filter whose support widens by the downscale factor, like PIL's BILINEAR), pixel centres
       at half-integers (align_corners=False); on uint8 input, rounded to the nearest integer.
       This is `torchvision.transforms.v2.functional.resize(img, [resize], antialias=True)` on a
       uint8 tensor (torchvision's native uint8 kernel on AVX2/AVX512/aarch64 CPUs; elsewhere it
       goes through float and may differ by 1 level).
    2. Centre crop `crop x crop`: top = round((h' - crop) / 2), left = round((w' - crop) / 2), with
       Python's round (halves to even), as `torchvision.transforms.v2.functional.center_crop`.
    3. (In the loader) normalise: (x / 255 - mean) / std with the ImageNet mean/std, in float32.
    """
    if resize < crop:
        raise ValueError(f"eval resize ({resize}) must be at least the crop ({crop})")
    out = F.resize(image, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(out, [crop, crop])
