"""MoPro losses as pure functions (DESIGN.md section 1 steps 2, 3 and 5; paper arXiv 2009.07995,
sections 3.1-3.2, equations of L_ins, L_pro and L_ce).

    L = CE(p_logits, y_hat) + w_proto * CE(s_logits, y_hat) + w_inst * L_inst

The two cross-entropies average over the kept (non-OOD) samples of the local batch; when no
sample is kept they are 0 (no NaN), and the count stays on the device (no sync). Losses are
computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def instance_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE logits: column 0 the positive q.k, then q against each queued key (step 2).

    q: B x d (query embeddings), k: B x d (momentum embeddings of the other view, no grad),
    queue: L x d (negatives). Returns B x (1 + L), divided by the temperature T.
    """
    positive = (q * k).sum(dim=1, keepdim=True)  # B x 1
    negative = q @ queue.t()  # B x L
    return torch.cat([positive, negative], dim=1) / temperature  # B x (1 + L)


def instance_loss(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Instance contrastive loss (InfoNCE, target = column 0); returns (loss, logits, accuracy)."""
    logits = instance_logits(q, k, queue, temperature).float()  # B x (1 + L)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # B
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return loss, logits, accuracy


def prototype_logits(z: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """s_logits = z @ C.T / T (step 3); z: B x d, prototypes: K x d -> B x K."""
    return z @ prototypes.t() / temperature


def masked_cross_entropy(logits: Tensor, target: Tensor, kept: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the kept samples; 0 when none is kept.

    logits: B x K, target: B (long), kept: B (bool). Dropped samples are masked with `where`
    (not boolean indexing, whose output size would need a host sync). `label_smoothing` eps: the
    target is (1 - eps) one-hot + eps / K uniform (Szegedy et al. 2016, "Rethinking the Inception
    Architecture", section 7; `F.cross_entropy`'s own); 0 = the plain loss, bit for bit.
    """
    per_sample = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)  # B
    per_sample = torch.where(kept, per_sample, torch.zeros_like(per_sample))  # B
    return per_sample.sum() / kept.sum().clamp_min(1)


def masked_accuracy(logits: Tensor, target: Tensor, kept: Tensor) -> Tensor:
    """Top-1 accuracy over the kept samples (0 when none is kept); B x K, B, B -> scalar."""
    hit = (logits.argmax(dim=1) == target) & kept  # B
    return hit.sum() / kept.sum().clamp_min(1)
