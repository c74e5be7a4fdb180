"""Average precision as the original MoPro code computes it for VOC07 (`lowshot_svm.py`,
`get_precision_recall` + `calculate_ap`): the PASCAL VOC "all points" rule (the VOC2010+ devkit's VOCap).

Rank the images by score, highest first; at each rank r, precision P_r = TP_r / r and recall
R_r = TP_r / n_pos. Pad recall with 0 in front and 1 at the end, precision with 0 at both ends, replace
each precision by the maximum precision at any later rank (the interpolated, monotone envelope), and sum
(R_i - R_{i-1}) x P_i over the ranks i where recall changes.

Labels are VOC's 1 / 0 / -1: only 1 counts as positive; 0 ("difficult") counts as a negative, as in the
original code (the official VOC devkit would leave difficult images out instead). This is not VOC 2007's
official 11-point AP (mean of the envelope at recall 0, 0.1, ..., 1), which the original does not use.

Against `sklearn.metrics.average_precision_score` (sum of (R_n - R_{n-1}) P_n, no envelope, tied scores
as one threshold): the two agree when no precision is exceeded by a later one (the envelope changes nothing)
and no two scores tie. Otherwise this AP is >= sklearn's (the envelope only raises precision), and tied
scores are ranked in input order here (a stable sort) where sklearn takes them as one step.
"""

from __future__ import annotations

import numpy as np


def voc_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of `scores` (n,) for `targets` (n,) (> 0 positive); nan when there is no positive."""
    positive = np.asarray(targets) > 0  # n
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")  # highest first, ties in input order
    hits = positive[order]  # n
    n_pos = int(hits.sum())
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(hits)  # n
    precision = tp / np.arange(1, hits.size + 1)  # n
    recall = np.concatenate([[0.0], tp / n_pos, [1.0]])  # n + 2
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]  # n + 2
    step = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[step] - recall[step - 1]) * envelope[step]))


def mean_ap(targets: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """mAP over the classes (columns) of `targets` and `scores` (n x C); classes without a positive are
    left out of the mean (their AP is nan in the list)."""
    aps = [voc_ap(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]
    finite = [a for a in aps if not np.isnan(a)]
    return (float(np.mean(finite)) if finite else float("nan")), aps
