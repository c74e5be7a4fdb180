"""Low-shot linear SVMs on frozen features (paper arXiv 2009.07995, section 4.3, table 3; the original
code's `lowshot_svm.py`).

For k in `shots` (1, 2, 4, 8, 16) and `draws` (5) random draws each: k readable images per class from the
train(val) split (VOC: an image drawn for one class counts with its whole label row, for every class it is
positive for, and may be drawn again for another class, as the original's `convert_low_shot`), then
- VOC07: one binary `LinearSVC` per class (C = 0.5, class_weight {1: 2, -1: 1}, squared hinge, l2,
  tol 1e-4, dual, max_iter 2000, random_state 0; labels 0 "difficult" -> -1 as the original), its
  decision values on the whole test split scored with the "all points" AP (ap.py), mAP over the classes;
- Places205: one multiclass `LinearSVC` (C = 0.5, tol 1e-4, dual, max_iter 2000, random_state 0),
  top-1 accuracy on the whole val split;
mean and std (numpy's, over the draws) per k. Draw d of k uses `numpy.random.default_rng([seed, k, d])`, so
every draw is reproducible on its own (the original draws them in sequence from one seeded stream). A class
whose draw has no negative (every drawn image positive for it) gets a constant score (AP = the base rate).
LinearSVC's "did not converge" warnings at max_iter are silenced, as the protocol keeps max_iter = 2000.
"""

from __future__ import annotations

import warnings

import numpy as np

from mopro_fast.transfer.ap import mean_ap
from mopro_fast.transfer.datasets import Listing, TransferError
from mopro_fast.transfer.features import FeatureCache

SHOTS = (1, 2, 4, 8, 16)
DRAWS = 5
COST = 0.5
INSTALL = "pip install 'mopro-fast[transfer]'"

# The original's figures for its WebVision-V1 ResNet-50 (paper table 3), k = 1, 2, 4, 8, 16.
PUBLISHED = {"voc07": {"metric": "mAP", "mopro_webvision_v1_rn50": [59.5, 71.3, 76.5, 81.4, 83.7]},
             "places205": {"metric": "top-1", "mopro_webvision_v1_rn50": [16.9, 23.2, 29.2, 34.5, 38.7]}}


def linear_svc(**kwargs):
    """scikit-learn's LinearSVC, or one line saying what to install."""
    try:
        from sklearn.svm import LinearSVC
    except ImportError:
        raise TransferError(f"transfer svm needs scikit-learn, which is not installed: {INSTALL}") from None
    return LinearSVC(**kwargs)


def _classes_of(labels: np.ndarray, c: int) -> np.ndarray:
    """Indices of the images positive for class c (n,) or (n x C)."""
    return np.flatnonzero(labels[:, c] > 0 if labels.ndim == 2 else labels == c)


def draw(listing: Listing, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, the images positive for it in a random order (a draw takes the first k readable ones)."""
    return [rng.permutation(_classes_of(listing.labels, c)) for c in range(len(listing.classes))]


def lowshot_sample(cache: FeatureCache, k: int, order: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """k readable images per class from a draw's `order` (fewer where a class has fewer): (indices m, their
    features m x F). Bad files are found while computing features; they are replaced by the next candidates
    of the same draw, so a bad file never costs a class one of its k."""
    while True:
        bad = set(int(i) for i in cache.bad)
        picked = np.concatenate([o[[int(i) not in bad for i in o]][:k] for o in order])
        feats, ok = cache.get(picked)
        if ok.all():
            return picked, feats


def _voc_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, cost: float) -> np.ndarray:
    """Decision values (n_test x C) of one binary SVM per class; train_y n x C in {1, 0, -1}."""
    scores = np.zeros((test_x.shape[0], train_y.shape[1]))
    for c in range(train_y.shape[1]):
        y = np.where(train_y[:, c] > 0, 1, -1)
        if (y > 0).all() or (y < 0).all():
            continue  # one class only: a constant score
        clf = linear_svc(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                         loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0)
        clf.fit(train_x, y)
        scores[:, c] = clf.decision_function(test_x)
    return scores


def _places_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 cost: float) -> float:
    clf = linear_svc(C=cost, tol=1e-4, dual=True, max_iter=2000, random_state=0)
    clf.fit(train_x, train_y)
    return float(100.0 * (clf.predict(test_x) == test_y).mean())


def evaluate(train: Listing, test: Listing, train_cache: FeatureCache, test_cache: FeatureCache,
             shots=SHOTS, draws: int = DRAWS, seed: int = 0, cost: float = COST) -> dict:
    """The low-shot protocol for one encoder: {"per_k": {k: {"mean", "std", "runs"}}, "images": ...}."""
    linear_svc()  # fail before any feature is computed when scikit-learn is missing
    test_x, ok = test_cache.get(np.arange(len(test)))
    test_y = test.labels[ok]
    if test_x.shape[0] == 0:
        raise TransferError(f"{test.name}: no readable image in {test.root}")
    orders = {(k, d): draw(train, np.random.default_rng([seed, k, d])) for k in shots for d in range(draws)}
    # every draw's first k per class in one pass (full batches), before the draws replace any bad file
    train_cache.get(np.unique(np.concatenate([o[:k] for (k, _), order in orders.items() for o in order])))
    per_k = {}
    for k in shots:
        runs = []
        for d in range(draws):
            picked, train_x = lowshot_sample(train_cache, k, orders[k, d])
            train_y = train.labels[picked]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*converge.*")
                if train.multilabel:
                    runs.append(100.0 * mean_ap(test_y, _voc_scores(train_x, train_y, test_x, cost))[0])
                else:
                    runs.append(_places_top1(train_x, train_y, test_x, test_y, cost))
        per_k[str(k)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs}
    return {"per_k": per_k, "images": {"train_used": int(train_cache.index.size), "test": int(test_x.shape[0])},
            "bad_files": {"train": train_cache.bad_paths(), "test": test_cache.bad_paths()}}
