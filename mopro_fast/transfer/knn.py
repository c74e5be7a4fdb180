"""Weighted cosine kNN on frozen features (not in the original MoPro code; the protocol of Wu et al. 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", section 3.4, used by MoCo,
DINO and others as a cheap check of a representation).

Features are L2-normalised (features.py), so the dot product is the cosine similarity s. For each test
image, its k = 20 most similar training images vote with weight exp(s / T), T = 0.07; a class's score is the
sum of the weights of the neighbours of that class. Single-label data: top-1 / top-5 of the scores.
Multi-label data (VOC-style, labels 1 / 0 / -1): a class's score sums the weights of the neighbours positive
for it, and the scores are ranked per class by the AP of ap.py (mAP).
"""

from __future__ import annotations

import numpy as np
import torch

from mopro_fast.transfer.ap import mean_ap

K, TEMPERATURE = 20, 0.07


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, k: int = K,
               temperature: float = TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """Class scores (m x C) of the test features (m x F) from the training features (n x F) and labels:
    (n,) class ids, or n x C rows where > 0 marks a positive."""
    train = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))  # n x F
    if train_y.ndim == 1:
        votes = torch.nn.functional.one_hot(torch.from_numpy(train_y.astype(np.int64)), num_classes).float()  # n x C
    else:
        votes = torch.from_numpy((train_y > 0).astype(np.float32))  # n x C
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_x.shape[0], chunk):
        test = torch.from_numpy(np.ascontiguousarray(test_x[start:start + chunk], dtype=np.float32))  # b x F
        sim, idx = (test @ train.T).topk(k, dim=1)  # b x k
        weight = (sim / temperature).exp()  # b x k
        out.append(torch.einsum("bk,bkc->bc", weight, votes[idx]).numpy())  # b x C
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_metrics(scores: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    """top-1 / top-5 (%) for class ids (m,), mAP (%) for label rows (m x C)."""
    if test_y.ndim == 2:
        return {"mAP": 100.0 * mean_ap(test_y, scores)[0]}
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # m x 5
    hit = top == test_y[:, None]
    return {"top1": float(100.0 * hit[:, 0].mean()), "top5": float(100.0 * hit.any(axis=1).mean())}
