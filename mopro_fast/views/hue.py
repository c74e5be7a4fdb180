"""The strong view's hue shift (DESIGN.md section 1, ColorJitter's hue) on one uint8 image, fast.

`torchvision.transforms.v2.functional.adjust_hue` on a uint8 `3 x H x W` image converts to float,
goes RGB -> HSV -> RGB through about thirty whole-image tensor ops (a 4-way stack and a gather at
the end), and converts back: 1.6 ms of the 2.7 ms that both views of a 224 px sample cost on one
core here, the largest single cost of the `torch` backend (py-spy, `mopro-fast bench loader`).

Here the same hexcone rotation is one closed form on the pixel values, in float32 on [0, 255]:
    M = max(r, g, b), C = M - min(r, g, b)                       (value and chroma)
    h6 = hue in sextants [0, 6): (g - b) / C where M = r, 2 + (b - r) / C where M = g, else 4 + (r - g) / C
    h6' = (h6 + 6 * shift) mod 6
    out_c = M - C * clamp(min(k_c, 4 - k_c), 0, 1),  k_c = (n_c + h6') mod 6,  n = (5, 3, 1) for (r, g, b)
which is torchvision's HSV round trip with v = M / 255 and s = C / M substituted (`views.augment.hsv_to_rgb`
is the same closed form on HSV). The result goes back to uint8 as torchvision does it
(`x * 255.999 / 255`, truncated), so the two agree to float rounding: the oracle test
(tests/test_views_fast.py) finds every pixel within one level of torchvision's, almost all equal.
Grey pixels (C = 0) are returned unchanged, as torchvision's (its hue is 0 there, the rotation a no-op).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SEXTANT_OFFSET = torch.tensor((5.0, 3.0, 1.0)).view(3, 1, 1)  # n_c for (r, g, b)
_TO_UINT8 = 255.999 / 255.0  # torchvision's float -> uint8 scale (to_dtype_image, eps = 1e-3), on [0, 255]


def rotate_hue(x: Tensor, shift: float) -> Tensor:
    """The rotation on float `3 x H x W` values on [0, 255] (whole numbers: a uint8 image's values);
    returns a new float tensor, not yet converted back (see `adjust_hue_uint8`).

    Branch-free: the three cases of h6 are blended with 0/1 masks, and `mod 6` is `x - 6 floor(x / 6)`
    (on this CPU `torch.where` and `remainder` cost 10-40x an add on a 224 px plane).
    """
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift ({shift}) is not in [-0.5, 0.5]")
    r, g, b = x.unbind(0)  # each H x W
    top = x.amax(dim=0)  # H x W, M
    chroma = top - x.amin(dim=0)  # H x W, C: a whole number, 0 for grey pixels
    inv = chroma.clamp(min=0.5).reciprocal_()  # H x W, 1 / C (any finite value where C = 0: the ramp is unused)
    is_r = (top == r).float()  # H x W, 1 where M = r
    is_g = (top == g).float().mul_(1.0 - is_r)  # M = g (and not r)
    is_b = 1.0 - is_r - is_g  # M = b only
    h6 = ((g - b) * is_r + (b - r) * is_g + (r - g) * is_b) * inv  # H x W, in [-1, 1]
    h6 += 2.0 * is_g + 4.0 * is_b + (6.0 * shift + 6.0)  # sextant offsets, shifted, kept positive
    k = h6 + _SEXTANT_OFFSET.to(x.dtype)  # 3 x H x W
    k -= 6.0 * torch.floor(k * (1.0 / 6.0))  # mod 6 -> [0, 6)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)  # 3 x H x W
    return top - chroma * ramp  # 3 x H x W on [0, 255]


def adjust_hue_uint8(image: Tensor, shift: float) -> Tensor:
    """uint8 `3 x H x W` -> uint8 `3 x H x W` with the hue rotated by `shift` (fraction of the circle,
    in [-0.5, 0.5]), as `torchvision.transforms.v2.functional.adjust_hue` to one level."""
    return rotate_hue(image.float(), shift).mul_(_TO_UINT8).to(torch.uint8)
