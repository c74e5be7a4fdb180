"""Instance queue: a ring buffer of momentum embeddings (DESIGN.md section 1 step 2; paper
arXiv 2009.07995, section 3.1, following MoCo).

Keys are stored L x d (one contiguous row per key, so an enqueue writes whole rows). The write
pointer is a 0-d long tensor on the same device: the slot indices are computed on the device,
`(ptr + arange(B)) % L`, and written with `index_copy_`, so there is no host-device
synchronisation per step. Unlike the original code, L need not be a multiple of the batch: the
write wraps around, and a batch larger than L keeps its most recent L keys (exactly what pushing
the keys one by one would leave).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InstanceQueue(nn.Module):
    """Ring buffer `keys` (L x d, unit rows) with write pointer `ptr` (0-d long tensor)."""

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, length: int) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"queue length must be >= 1, got {length}")
        # Random unit vectors until real keys arrive (as in MoCo): they act as negatives that
        # are uncorrelated with every query.
        self.register_buffer("keys", F.normalize(torch.randn(length, dim), dim=1))  # L x d
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write

    @property
    def length(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Push `keys` (B x d, oldest first) into the ring buffer, wrapping around."""
        batch, length = keys.shape[0], self.length  # Python ints from shapes: no sync
        skip = max(batch - length, 0)  # keys older than the last L would be overwritten anyway
        kept = keys[skip:]  # n x d, n = min(B, L)
        slots = (self.ptr + skip + torch.arange(kept.shape[0], device=self.ptr.device)) % length  # n
        self.keys.index_copy_(0, slots, kept.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + batch) % length)
