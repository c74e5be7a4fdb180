"""Noise correction (DESIGN.md section 1 step 4; paper arXiv 2009.07995, section 3.3).

From `start_clean_epoch` on, each sample's web label y is checked against a soft target that
mixes the classifier and the prototypes:
    soft = alpha * softmax(p_logits) + (1 - alpha) * softmax(s_logits)        # B x K
- if max(soft) > threshold:  the label becomes argmax(soft)              (relabelled);
- else if soft[y] > 1/K:     the label stays y                           (kept);
                             (1/K is the paper's bound; `ood_threshold` replaces it)
- else:                      out-of-distribution, dropped from the classification and prototype
                             losses and from the prototype update        (kept = False).
Both tests are strict inequalities, and relabelling wins when both hold. The comparison
constants are cast to the dtype of `soft` (float32), so an exact tie, e.g. soft[y] equal to
float32(1/K), is not "greater".

Why a small K needs another bound (`mopro.ood_threshold`, off by default). With WebVision's
K = 1000, soft[y] <= 1/K = 0.001 means the model all but rules y out; with K = 10 the same rule
drops every sample to which an unsure model gives less than 10 %, which early in training is a
large share of the clean ones: on the noise matrix (`mopro-fast bench noise`) about half of each
batch, at chance precision, and what is dropped is never learned. A fixed bound such as 0.01
keeps the paper's meaning ("ruled out") whatever K is.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def correct_labels(
    class_logits: Tensor,
    proto_logits: Tensor,
    labels: Tensor,
    alpha: float,
    threshold: float,
    num_classes: int,
    ood_threshold: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (corrected labels B (long), kept B (bool)); inputs B x K, B x K, B.

    `ood_threshold`: the bound soft[y] must exceed to be kept; None = 1/K (paper).

    A pure function of its inputs; computed in float32 whatever the autocast dtype of the logits.
    """
    soft = alpha * torch.softmax(class_logits.float(), dim=1)  # B x K
    soft.add_(torch.softmax(proto_logits.float(), dim=1), alpha=1.0 - alpha)
    top_prob, top_class = soft.max(dim=1)  # B, B
    relabel = top_prob > threshold  # B
    prob_of_label = soft.gather(1, labels.unsqueeze(1)).squeeze(1)  # B, soft[y] with the web y
    bound = 1.0 / num_classes if ood_threshold is None else ood_threshold
    kept = relabel | (prob_of_label > bound)  # B
    corrected = torch.where(relabel, top_class, labels)  # B
    return corrected, kept
