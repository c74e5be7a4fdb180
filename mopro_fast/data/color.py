"""The strong view's colour ops (DESIGN.md section 1) on whole batches, on the device.

RandomGrayscale(p = 0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) with the four ops in a random
order per sample (MoCo v1's order, as `views.two_views`): brightness, contrast and saturation
factors U(0.6, 1.4), hue shift U(-0.4, 0.4) of the hue circle. The formulas are torchvision's
(`adjust_*` on tensors: blends with black, the grayscale mean, the grayscale image; hue through
HSV), computed in float on [0, 255] values with a clamp after each op, without torchvision's
rounding to uint8 between ops.

Batched: the parameters are drawn on the host from a seeded `torch.Generator` (so they are known
without a device sync and tests can read them); each of the 4 steps applies, for each op, that op
to the samples whose op at this step it is, gathered by host-known indices. So every sample gets
each op once, and no per-sample Python loop runs. Used by the `ffcv` backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mopro_fast.data.views import GRAY_P, HUE, JITTER, JITTER_OPS

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class StrongColorParams:
    gray: Tensor  # B bool: grayscale before the jitter
    factors: Tensor  # B x 4 float: brightness, contrast, saturation factor, hue shift (JITTER_OPS order)
    order: Tensor  # B x 4 int64: order[i, t] = index into JITTER_OPS of the op applied at step t


def sample_strong_color(batch: int, generator: torch.Generator) -> StrongColorParams:
    """The random colour parameters of `batch` strong views (on the CPU)."""
    u = torch.rand(batch, 6, generator=generator, dtype=torch.float64)
    factors = torch.empty(batch, 4, dtype=torch.float32)
    factors[:, :3] = (1 - JITTER + 2 * JITTER * u[:, 1:4]).float()
    factors[:, 3] = (-HUE + 2 * HUE * u[:, 4]).float()
    order = torch.rand(batch, len(JITTER_OPS), generator=generator).argsort(dim=1)  # a random permutation each
    return StrongColorParams(u[:, 0] < GRAY_P, factors, order)


def grayscale(x: Tensor) -> Tensor:
    """b x 3 x H x W float -> b x 1 x H x W luma."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, ref: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * ref).clamp_(0, 255)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 255)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x), f)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by `shift` (fraction of the circle) per sample: torchvision's HSV round trip."""
    rgb = x / 255
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.remainder((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # sector i -> (r, g, b) picks among (v, q, p, t): torchvision's lookup, as a gather
    choices = torch.stack((v, q, p, t), dim=1)  # b x 4 x H x W
    table = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]], device=x.device)
    pick = table[:, i].permute(1, 0, 2, 3)  # b x 3 x H x W
    return (torch.gather(choices, 1, pick) * 255).clamp_(0, 255)


_OPS = {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}


def apply_strong_color(x: Tensor, params: StrongColorParams) -> Tensor:
    """b x 3 x H x W float in [0, 255] on any device -> the same after grayscale and jitter (new tensor)."""
    device = x.device
    x = x.clone()
    gray = params.gray.nonzero().flatten()  # host tensor: no device sync
    if len(gray):
        idx = gray.to(device, non_blocking=True)
        x.index_copy_(0, idx, grayscale(x.index_select(0, idx)).expand(-1, 3, -1, -1))
    factors = params.factors.to(device, non_blocking=True)
    for step in range(len(JITTER_OPS)):
        for k, name in enumerate(JITTER_OPS):
            rows = (params.order[:, step] == k).nonzero().flatten()  # host
            if not len(rows):
                continue
            idx = rows.to(device, non_blocking=True)
            x.index_copy_(0, idx, _OPS[name](x.index_select(0, idx), factors.index_select(0, idx)[:, k]))
    return x
