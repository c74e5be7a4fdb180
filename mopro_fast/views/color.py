"""The strong view's colour ops (DESIGN.md section 1) on whole batches, on the device.

RandomGrayscale(p = 0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) with the four ops in a random
order per sample (MoCo v1's order, as `views.two_views`): brightness, contrast and saturation
factors U(0.6, 1.4), hue shift U(-0.4, 0.4) of the hue circle. The formulas are torchvision's
(`adjust_*` on tensors: blends with black, the grayscale mean, the grayscale image; hue through
HSV), computed in float (on [0, 1], scaled back to [0, 255]) with a clamp after each op, without torchvision's
rounding to uint8 between ops.

Batched: the parameters are drawn on the host from a seeded `torch.Generator` (so they are known
without a device sync and tests can read them); the ops themselves are `views.augment`'s batched
grayscale and jitter (seven batched stages give each sample its own op order; no per-sample Python
loop). Used by the `ffcv` backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mopro_fast.views.augment import color_jitter, random_grayscale
from mopro_fast.views.cpu import GRAY_P, HUE, JITTER, JITTER_OPS


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


def apply_strong_color(x: Tensor, params: StrongColorParams) -> Tensor:
    """b x 3 x H x W float in [0, 255] on any device -> the same after grayscale and jitter (new tensor).

    The ops are `views.augment`'s (the nvjpeg backend's, oracle-tested against torchvision), on [0, 1].
    """
    device = x.device
    gray = params.gray.to(device, non_blocking=True)  # b
    factors = params.factors.to(device, non_blocking=True)  # b x 4
    order = params.order.to(device, non_blocking=True)  # b x 4
    return color_jitter(random_grayscale(x / 255, gray), factors, order).mul_(255)
