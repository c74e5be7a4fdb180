"""Momentum class prototypes (DESIGN.md section 1 steps 3 and 6; paper arXiv 2009.07995,
section 3.2, "momentum prototypes").

C is a K x d buffer, all zero at start. Each step, over the gathered samples in batch order and
skipping the out-of-distribution ones, the reference applies per sample
    C[y_i] <- m_p * C[y_i] + (1 - m_p) * z_i
and then L2-normalises every row of C once. Unrolled per class, with n kept samples of that
class in this step, in order i = 1..n:
    C[c] <- m_p^n * C[c] + sum_i (1 - m_p) * m_p^(n - i) * z_i.
`prototype_update` evaluates this closed form with a fixed number of kernels for any batch:
1. dropped samples get the extra class K (a "trash" bag), so every tensor keeps its shape
   (boolean indexing would need the count on the host: a sync on GPU);
2. a stable sort by class puts each class's samples in a contiguous block, in batch order;
3. per-class counts n_c (scatter-add of ones; `bincount` would sync on GPU) and their cumulative
   sum give each block's end, so the exponent n - i of a sample is `end[c] - position - 1`;
4. one `embedding_bag(mode="sum", per_sample_weights=...)` computes every class's weighted sum
   sum_i (1 - m_p) m_p^(n - i) z_i straight from z: no B x d copy, and its forward sums each bag
   in order without atomics, so every rank computes identical bits (a scatter-add with atomics
   would let the ranks' prototypes drift apart in the last bits);
5. C <- m_p^n_c * C + sums (unseen classes: factor 1, sum 0), then one row normalisation.
`prototype_update_reference` is the literal loop of the original code (oracle and baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-12  # a zero row (class not seen yet) stays zero instead of becoming NaN


@torch.no_grad()
def normalize_rows_(protos: Tensor, eps: float = NORM_EPS) -> Tensor:
    """In place: every row divided by max(||row||, eps)."""
    return protos.div_(torch.linalg.vector_norm(protos, dim=1, keepdim=True).clamp_min_(eps))


@torch.no_grad()
def prototype_update(protos: Tensor, z: Tensor, labels: Tensor, kept: Tensor, m: float) -> Tensor:
    """Fused, exact form of the sequential per-sample update, then row normalisation (in place).

    protos: K x d (updated in place and returned); z: B x d (query embeddings, any float dtype);
    labels: B (long, corrected labels); kept: B (bool, False = OOD, skipped); m: m_p.
    """
    num_classes, dtype = protos.shape[0], protos.dtype
    batch = labels.shape[0]
    cls = torch.where(kept, labels, num_classes)  # B, dropped samples -> trash class K
    cls_sorted, order = torch.sort(cls, stable=True)  # B, B: classes in blocks, batch order kept
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=protos.device)
    counts.index_add_(0, cls, torch.ones_like(cls))  # K+1: n_c
    block_end = counts.cumsum(0)  # K+1: one past the last sorted position of each class
    position = torch.arange(1, batch + 1, device=protos.device)  # B: sorted position + 1
    later = block_end.index_select(0, cls_sorted).sub_(position)  # B: n - i, same-class samples after
    weight = torch.pow(m, later.to(dtype)).mul_(1.0 - m)  # B: (1 - m) m^(n - i)
    # (K+1) x d: bag c = sorted block c, the weighted sum of its z rows. The trash bag is summed
    # and dropped rather than cut off with include_last_offset=True, whose CPU float64 path in
    # torch 2.14 mis-sums the trailing indices.
    sums = F.embedding_bag(
        order, z.to(dtype), block_end - counts, mode="sum", per_sample_weights=weight
    )
    decay = torch.pow(m, counts[:num_classes].to(dtype))  # K: m^n_c (1 for classes not in the batch)
    protos.mul_(decay.unsqueeze(1)).add_(sums[:num_classes])  # the trash bag K is dropped
    return normalize_rows_(protos)


@torch.no_grad()
def prototype_update_reference(
    protos: Tensor, z: Tensor, labels: Tensor, kept: Tensor, m: float
) -> Tensor:
    """The original per-sample Python loop over the kept samples, then normalisation (in place)."""
    for feat, label in zip(z[kept], labels[kept]):
        protos[label] = protos[label] * m + (1 - m) * feat
    return normalize_rows_(protos)


class Prototypes(nn.Module):
    """The K x d prototype matrix C as a buffer (zero at start), with its momentum update."""

    weight: Tensor

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, dim))  # K x d

    @torch.no_grad()
    def update(self, z: Tensor, labels: Tensor, kept: Tensor, m: float) -> None:
        """DESIGN.md section 1 step 6 over gathered z (B x d), labels (B), kept (B)."""
        prototype_update(self.weight, z, labels, kept, m)
