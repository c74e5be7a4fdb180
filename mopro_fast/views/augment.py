"""Batched colour augmentation of the strong view (DESIGN.md section 1), per-sample parameters.

The `nvjpeg` backend makes the views of a whole batch at once on the device; this module is its
colour part: RandomGrayscale(p=0.2) and ColorJitter(0.4, 0.4, 0.4, 0.4) as tensor ops over a
`B x 3 x H x W` float batch in [0, 1], each sample with its own factors and its own random order
of the four jitter ops. Every op is the float definition of `torchvision.transforms.v2.functional`
(`rgb_to_grayscale`, `adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`):
given the same parameters the output matches a per-sample loop over those functions within float
rounding (tests/test_gpu_augment.py is that oracle). The torch backend (views.py) runs the same
ops on uint8 and rounds after each one; here nothing is rounded between ops.

Random order without a per-sample branch. A sample's order is a permutation of (brightness,
contrast, saturation, hue). Brightness, contrast and saturation are all one blend,
`clamp(f * x + (1 - f) * other, 0, 1)` with `other` = 0, the mean grey level, or the grey image,
so one "blend stage" applies whichever of the three each sample needs (f = 1 is the identity).
The hue shift, the costly op (RGB -> HSV -> RGB), runs once for the whole batch: the ops a sample
puts before the hue shift go into three blend stages before it, the ops after into three stages
after it, unused stages being the identity. Seven batched stages give every sample its own order.
"""

from __future__ import annotations

import torch
from torch import Tensor

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # op codes, in views.JITTER_OPS order
IDENTITY = 4
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale
_CONSTANTS: dict[tuple, Tensor] = {}


def constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor on `device`, copied there once (a host-to-device copy per batch would
    make the host wait for the stream)."""
    key = (values, dtype, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def grayscale(x: Tensor) -> Tensor:
    """`B x 3 x H x W` -> `B x 1 x H x W` luma."""
    return x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2]


def random_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Samples with `mask` (B bool) become grey on all three channels; the others are unchanged."""
    return torch.where(mask[:, None, None, None], grayscale(x).expand_as(x), x)


def blend_stage(x: Tensor, op: Tensor, factors: Tensor) -> Tensor:
    """One blend stage: sample b gets brightness, contrast or saturation (`op[b]`) with its factor.

    x: `B x 3 x H x W` in [0, 1]; op: B int64 in {BRIGHTNESS, CONTRAST, SATURATION, IDENTITY};
    factors: `B x 4` (brightness, contrast, saturation, hue). Output clamped to [0, 1].
    """
    gray = grayscale(x)  # B x 1 x H x W
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # B x 1 x 1 x 1 (torchvision: mean of the grey image)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    other = torch.where((op == SATURATION)[:, None, None, None], gray,
                        torch.where((op == CONTRAST)[:, None, None, None], mean, zero))  # B x 1 x H x W
    chosen = factors.gather(1, op.clamp(max=SATURATION)[:, None])[:, 0]  # B
    f = torch.where(op == IDENTITY, torch.ones_like(chosen), chosen).to(x.dtype)[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """`B x 3 x H x W` RGB in [0, 1] -> HSV, hue as a fraction of the circle in [0, 1)."""
    r, g, b = x.unbind(1)  # each B x H x W
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`: `B x 3 x H x W` HSV -> RGB in [0, 1].

    Closed form without sector branches: channel n (R: 5, G: 3, B: 1) is
    `v - v * s * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 h) mod 6`.
    """
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]  # each B x 1 x H x W
    n = constant((5.0, 3.0, 1.0), hsv.dtype, hsv.device).view(1, 3, 1, 1)
    k = (n + h * 6) % 6  # B x 3 x H x W
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of sample b by `shift[b]` (fraction of the circle, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.to(x.dtype)[:, None, None]) % 1.0  # B x H x W
    return hsv_to_rgb(torch.cat((hue[:, None], hsv[:, 1:]), dim=1))


def stage_ops(order: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample op codes of the three blend stages before and the three after the hue shift.

    order: `B x 4` int64, a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) per sample.
    Returns (before, after), each `B x 3`, unused stages IDENTITY.
    """
    hue_at = (order == HUE).long().argmax(dim=1, keepdim=True)  # B x 1
    j = torch.arange(3, device=order.device)[None]  # 1 x 3
    ident = torch.full_like(order[:, :3], IDENTITY)
    before = torch.where(j < hue_at, order[:, :3], ident)
    after_pos = hue_at + 1 + j  # B x 3, positions after the hue op
    after = torch.where(after_pos < 4, order.gather(1, after_pos.clamp(max=3)), ident)
    return before, after


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter with per-sample factors and order, batched.

    x: `B x 3 x H x W` float in [0, 1]; factors: `B x 4` (brightness, contrast, saturation factors,
    hue shift); order: `B x 4` permutation of the op codes. Same result as applying, per sample,
    torchvision's four adjust_* functions in that order.
    """
    before, after = stage_ops(order)
    for k in range(3):
        x = blend_stage(x, before[:, k], factors)
    x = adjust_hue(x, factors[:, HUE])
    for k in range(3):
        x = blend_stage(x, after[:, k], factors)
    return x
