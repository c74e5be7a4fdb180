"""The views of DESIGN.md section 1 for a whole decoded batch at once, on any device.

The `nvjpeg` backend decodes a batch of JPEGs (images of different sizes) and calls
`two_views_batch` / `eval_view_batch` here. No per-sample Python loop touches pixels:

1. Pad. The decoded images go into one `B x 3 x Hmax x Wmax` tensor (a nested tensor turned
   padded: one call); the padding is never read (zero weights, step 2).
2. Crop + resize + flip as two matrix products. Antialiased bilinear resizing is separable: output
   row i is a weighted sum of source rows, with the triangle-filter taps torchvision uses
   (`antialias=True`, PIL's BILINEAR: support widened by the downscale factor, taps clipped to the
   crop and renormalised, pixel centres at half-integers). Per sample and view we build the tap
   matrices `Wy` (`res x Hmax`) and `Wx` (`res x Wmax`), zero outside the crop box, so
   `view = Wy @ image @ Wx^T` is `F.resized_crop(image, top, left, h, w, res, antialias=True)`
   up to float rounding; a horizontal flip is `Wx` with its rows reversed. Both views share
   the first product (one batched GEMM for `B x 3Hmax x Wmax @ B x Wmax x 2res`), then one
   batched GEMM per view. We chose this over `torchvision.ops.roi_align`: roi_align averages an
   adaptive grid of bilinear samples (a box filter, not the triangle filter), reads the zero
   padding at the right and bottom edges of smaller images, and cannot flip; the GEMMs
   reproduce torchvision's filter exactly, handle padding and flips through their weights, and
   run on tensor cores (fp16 on CUDA: pixel values are exact integers there, weights carry about
   3 decimal digits, accumulation is fp32).
3. Colour (strong view only): `views.augment` (grayscale p = 0.2, ColorJitter in a per-sample
   random order), in float on [0, 1].

Parameters are drawn for the whole batch from one `torch.Generator` on the device (one `rand`
call): the crop follows torchvision's RandomResizedCrop rule exactly (up to 10 tries of area
fraction U(0.2, 1) and log aspect U(log 3/4, log 4/3), else the largest centred box of an allowed
aspect ratio), vectorised over samples and tries; `sample_crops` given the same uniforms returns
what `views.sample_crop` returns (tests/test_gpu_augment.py checks it).

The eval view is `views.eval_view` (resize the shorter side, centre crop) as one more box:
the crop window of the resized image pulled back to source pixels, so the same tap matrices give
it directly without the intermediate resized image.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from mopro_fast.views.augment import color_jitter, constant, random_grayscale
from mopro_fast.views.cpu import CROP_RATIO, CROP_SCALE, FLIP_P, GRAY_P, HUE, JITTER, eval_size

_TRIES = 10  # torchvision's RandomResizedCrop tries before the centre-crop fallback
# Uniforms per sample: weak = crop (2 per try + top, left) + flip; strong = crop + gray + 4 factors
# + 4 order keys + flip.
_CROP_U = 2 * _TRIES + 2
_WEAK_U = _CROP_U + 1
_STRONG_U = _CROP_U + 1 + 4 + 4 + 1
UNIFORMS_PER_SAMPLE = _WEAK_U + _STRONG_U

warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*", category=UserWarning)


@dataclass
class Crops:
    """Crop boxes in source pixels, one per sample: each a B int64 tensor."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass
class ViewBatchParams:
    """Everything random about one view of each sample of a batch (B tensors on the device)."""

    crops: Crops
    flip: Tensor  # B bool
    gray: Tensor | None = None  # B bool (strong view)
    factors: Tensor | None = None  # B x 4: brightness, contrast, saturation factors, hue shift (strong view)
    order: Tensor | None = None  # B x 4 int64: jitter op codes in the order applied (strong view)


def sample_crops(u: Tensor, heights: Tensor, widths: Tensor) -> Crops:
    """RandomResizedCrop boxes from uniforms, vectorised over samples and tries.

    u: `B x (2 * 10 + 2)` float64 in [0, 1): per try (area, log-ratio) draws, then (top, left);
    heights, widths: B source sizes. The rule of `views.sample_crop`, draw for draw.
    """
    H, W = heights.to(torch.float64)[:, None], widths.to(torch.float64)[:, None]  # B x 1
    tries = u[:, :2 * _TRIES].view(-1, _TRIES, 2)  # B x 10 x 2
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    target = H * W * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * tries[..., 0])  # B x 10
    ratio = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = torch.round(torch.sqrt(target * ratio))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # B x 10
    first = fits.long().argmax(dim=1, keepdim=True)  # first try that fits (0 if none)
    found = fits.any(dim=1)  # B
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # B
    H, W = H[:, 0], W[:, 0]
    top = torch.minimum(torch.floor(u[:, 2 * _TRIES] * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(u[:, 2 * _TRIES + 1] * (W - w + 1)), W - w)
    # Fallback: the largest centred box whose aspect ratio is within CROP_RATIO.
    aspect = W / H
    fw = torch.where(aspect > CROP_RATIO[1], torch.round(H * CROP_RATIO[1]), W)
    fh = torch.where(aspect < CROP_RATIO[0], torch.round(W / CROP_RATIO[0]), H)
    ftop, fleft = torch.floor((H - fh) / 2), torch.floor((W - fw) / 2)
    pick = lambda a, b: torch.where(found, a, b).long()  # noqa: E731
    return Crops(pick(top, ftop), pick(left, fleft), pick(h, fh), pick(w, fw))


def sample_params(generator: torch.Generator, heights: Tensor,
                  widths: Tensor) -> tuple[ViewBatchParams, ViewBatchParams]:
    """(weak, strong) view parameters of a batch; all draws are one `rand` call on `generator`'s device."""
    B = heights.shape[0]
    u = torch.rand(B, UNIFORMS_PER_SAMPLE, generator=generator, dtype=torch.float64, device=heights.device)
    uq, uk = u[:, :_WEAK_U], u[:, _WEAK_U:]
    weak = ViewBatchParams(sample_crops(uq[:, :_CROP_U], heights, widths), flip=uq[:, _CROP_U] < FLIP_P)
    rest = uk[:, _CROP_U:]  # gray, 4 factors, 4 order keys, flip
    lo = constant((1 - JITTER,) * 3 + (-HUE,), torch.float64, u.device)
    hi = constant((1 + JITTER,) * 3 + (HUE,), torch.float64, u.device)
    strong = ViewBatchParams(sample_crops(uk[:, :_CROP_U], heights, widths), flip=rest[:, 9] < FLIP_P,
                             gray=rest[:, 0] < GRAY_P, factors=lo + (hi - lo) * rest[:, 1:5],
                             order=rest[:, 5:9].argsort(dim=1))  # a random permutation, as ColorJitter
    return weak, strong


def resize_taps(out_size: int, offset: Tensor, start: Tensor, length: Tensor, scale: Tensor, padded: int,
                dtype: torch.dtype) -> Tensor:
    """Antialiased bilinear taps: `B x out_size x padded`, row i = source weights of output i.

    Output pixel i of sample b is pixel `offset[b] + i` of `length[b]` source pixels starting at
    `start[b]` resized by the factor `scale[b]` (source / output). Taps outside the source range
    are zero; each row sums to 1 (torchvision's antialiased kernel, float weights).
    """
    f64 = torch.float32  # enough: a tap on a boundary tie has weight 0 either way
    dev = scale.device
    i = torch.arange(out_size, device=dev, dtype=f64)[None, :, None]  # 1 x n x 1
    pos = torch.arange(padded, device=dev, dtype=f64)[None, None, :] - start.to(f64)[:, None, None]  # B x 1 x P
    scale = scale.to(f64)[:, None, None]  # B x 1 x 1
    support = scale.clamp(min=1.0)  # triangle filter radius in source pixels
    centre = scale * (offset.to(f64)[:, None, None] + i + 0.5)  # B x n x 1
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support + 0.5), length.to(f64)[:, None, None])
    taps = (1 - (pos - centre + 0.5).abs() / support).clamp(min=0) * ((pos >= lo) & (pos < hi))  # B x n x P
    return (taps / taps.sum(dim=2, keepdim=True)).to(dtype)


def pad_batch(images: list[Tensor], dtype: torch.dtype) -> Tensor:
    """uint8 `3 x H_b x W_b` images -> one `B x 3 x Hmax x Wmax` tensor of `dtype` (zero padded)."""
    nested = torch.nested.as_nested_tensor(images).to(dtype)  # one buffer, one conversion
    return torch.nested.to_padded_tensor(nested, 0.0)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`; on CUDA through pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _matmul_dtype(device: torch.device) -> torch.dtype:
    # fp16 tensor cores on CUDA: 0..255 are exact in fp16, fp32 accumulation; fp32 elsewhere.
    return torch.float16 if device.type == "cuda" else torch.float32


def resized_crops(padded: Tensor, boxes: list[tuple[Crops, Tensor]], res: int) -> list[Tensor]:
    """Crop + resize (+ flip) of every sample for each (crops, flip) view: a list of float32
    `B x 3 x res x res` in [0, 255]. padded: `B x 3 x Hmax x Wmax` in the matmul dtype."""
    B, C, P_h, P_w = padded.shape
    zero = torch.zeros(B, dtype=torch.long, device=padded.device)
    wx, wy = [], []
    for crops, flip in boxes:
        taps_x = resize_taps(res, zero, crops.left, crops.width, crops.width / res, P_w, padded.dtype)  # B x res x Pw
        wx.append(torch.where(flip[:, None, None], taps_x.flip(1), taps_x))  # reversed rows = mirrored output
        wy.append(resize_taps(res, zero, crops.top, crops.height, crops.height / res, P_h, padded.dtype))
    # First product, all views at once: B x 3Hmax x Wmax @ B x Wmax x (V res) -> B x 3Hmax x (V res)
    cols = torch.bmm(padded.reshape(B, C * P_h, P_w), torch.cat(wx, dim=1).transpose(1, 2))
    out = []
    for v, taps_y in enumerate(wy):
        part = cols[:, :, v * res:(v + 1) * res].reshape(B, C, P_h, res)  # B x 3 x Hmax x res
        out.append(torch.matmul(taps_y[:, None], part).float().clamp_(0, 255))  # B x 3 x res x res
    return out


def two_views_batch(images: list[Tensor], generator: torch.Generator, res: int
                    ) -> tuple[Tensor, Tensor, tuple[ViewBatchParams, ViewBatchParams]]:
    """Weak and strong views of decoded uint8 `3 x H x W` images (all on one device).

    Returns (view_q, view_k, (weak, strong)): float32 `B x 3 x res x res` in [0, 1], not yet
    normalised, and the sampled parameters.
    """
    device = images[0].device
    sizes = to_device(torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.long), device)  # B x 2
    weak, strong = sample_params(generator, sizes[:, 0], sizes[:, 1])
    padded = pad_batch(images, _matmul_dtype(device))  # B x 3 x Hmax x Wmax
    view_q, view_k = resized_crops(padded, [(weak.crops, weak.flip), (strong.crops, strong.flip)], res)
    view_q, view_k = view_q.div_(255), view_k.div_(255)
    view_k = color_jitter(random_grayscale(view_k, strong.gray), strong.factors, strong.order)
    return view_q, view_k, (weak, strong)


def eval_view_batch(images: list[Tensor], resize: int, crop: int) -> Tensor:
    """`views.eval_view` of each decoded uint8 image: float32 `B x 3 x crop x crop` in [0, 1].

    Resize-then-centre-crop is one box per sample: output pixel i is pixel `top + i` of the image
    resized to `eval_size(H, W, resize)`, so the taps use offset `top` and scale `H / h'`.
    """
    if resize < crop:
        raise ValueError(f"eval resize ({resize}) must be at least the crop ({crop})")
    device = images[0].device
    shapes = [tuple(im.shape[-2:]) for im in images]  # host metadata, no sync
    resized = [eval_size(h, w, resize) for h, w in shapes]
    # Centre crop offsets with Python's round (halves to even), as torchvision's center_crop.
    geometry = to_device(torch.tensor([(h, w, rh, rw, round((rh - crop) / 2), round((rw - crop) / 2))
                                       for (h, w), (rh, rw) in zip(shapes, resized)], dtype=torch.float64), device)
    H, W, rh, rw, top, left = geometry.unbind(1)  # each B
    padded = pad_batch(images, _matmul_dtype(device))
    B, C, P_h, P_w = padded.shape
    zero = torch.zeros_like(H)
    taps_y = resize_taps(crop, top, zero, H, H / rh, P_h, padded.dtype)  # B x crop x Hmax
    taps_x = resize_taps(crop, left, zero, W, W / rw, P_w, padded.dtype)  # B x crop x Wmax
    cols = torch.bmm(padded.reshape(B, C * P_h, P_w), taps_x.transpose(1, 2)).reshape(B, C, P_h, crop)
    return torch.matmul(taps_y[:, None], cols).float().clamp_(0, 255).div_(255)
