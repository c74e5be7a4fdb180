"""The Batch contract at the data boundary (DESIGN.md section 3).

Every loader backend (torch, dali, ffcv, nvjpeg) yields exactly these, so the trainer never asks
which backend it has:
- `Batch(view_q, view_k, label, index)` for training: the weak and strong views of DESIGN.md
  section 1, the web labels and the sample indices (position within the split, the `.sid` field);
- `EvalBatch(image, label, index)` for evaluation.
Images are float, normalised with the ImageNet mean/std, on the training device, and channels-last
when asked (the default): `B x 3 x H x W` with strides of a `B x H x W x 3` tensor.

Backends hand over uint8 images and call `finish_images` once per batch: moving uint8 to the
device and normalising there moves 4x fewer bytes through shared memory and over PCIe than
normalising on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, for images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    view_q: Tensor  # B x 3 x H x W float, weak view (query encoder), normalised, on device
    view_k: Tensor  # B x 3 x H x W float, strong view (momentum encoder), normalised, on device
    label: Tensor  # B int64, web labels
    index: Tensor  # B int64, sample index within the split

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.view_q.to(device, non_blocking=non_blocking),
                     self.view_k.to(device, non_blocking=non_blocking),
                     self.label.to(device, non_blocking=non_blocking), self.index.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.label.shape[0]


@dataclass
class EvalBatch:
    image: Tensor  # B x 3 x H x W float, eval view (resize + centre crop), normalised, on device
    label: Tensor  # B int64, labels
    index: Tensor  # B int64, sample index within the split

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EvalBatch":
        return EvalBatch(self.image.to(device, non_blocking=non_blocking),
                         self.label.to(device, non_blocking=non_blocking),
                         self.index.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.label.shape[0]


_NORM_CACHE: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}


def _norm_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(255 * mean, 1 / (255 * std)) as 1 x 3 x 1 x 1 on `device`, built once per device."""
    key = (str(device), dtype)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
        inv_std = 1 / (torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255)
        _NORM_CACHE[key] = (mean.to(dtype).view(1, 3, 1, 1).to(device), inv_std.to(dtype).view(1, 3, 1, 1).to(device))
    return _NORM_CACHE[key]


def normalize_uint8(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 `B x 3 x H x W` in [0, 255] -> `(x / 255 - mean) / std` in `dtype` (memory format kept)."""
    mean, inv_std = _norm_constants(images.device, dtype)
    out = images.to(dtype, copy=True)  # one new tensor (copy=True: never the caller's, even if already `dtype`)
    return out.sub_(mean).mul_(inv_std)  # in place: two fewer batch-sized allocations


def finish_images(images: Tensor, device: torch.device, channels_last: bool = True,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Host uint8 `B x 3 x H x W` -> normalised `dtype` on `device`, channels-last if asked.

    The copy is non-blocking: backends pin the host tensor when the device is CUDA.
    """
    images = images.to(device, non_blocking=True)
    if channels_last:
        # On uint8 (1 byte per value) before the float conversion, which keeps the layout;
        # a no-op when the backend already stacked the batch channels-last.
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize_uint8(images, dtype)


def denormalize_to_uint8_range(images: Tensor) -> Tensor:
    """Inverse of `normalize_uint8` (float, values back in [0, 255]); for tests and plots."""
    mean, inv_std = _norm_constants(images.device, images.dtype)
    return images / inv_std + mean
