"""Noise correction on hand-built cases: every branch and the exact edges (DESIGN.md section 1
step 4). Logits of -inf and 0 give exactly representable probabilities (0, 1/2, 1/4, 1)."""

from __future__ import annotations

import torch

from mopro_fast.core.noise import correct_labels

NEG = float("-inf")
K = 4


def probs_logits(*rows):
    """Logits whose softmax is uniform over the listed classes of each row (exact in float32)."""
    out = torch.full((len(rows), K), NEG)
    for i, classes in enumerate(rows):
        out[i, list(classes)] = 0.0
    return out


def run(class_rows, proto_rows, labels, alpha=0.5, threshold=0.8):
    return correct_labels(
        probs_logits(*class_rows), probs_logits(*proto_rows), torch.tensor(labels), alpha, threshold, K
    )


def test_relabel_when_max_above_threshold():
    # soft = 0.5*e2 + 0.5*e2 = e2: max 1 > 0.8 -> label 2, even though the web label is 0.
    target, kept = run([[2]], [[2]], [0])
    assert target.tolist() == [2] and kept.tolist() == [True]


def test_relabel_wins_over_keep():
    # soft = [0.625, 0.125, 0.125, 0.125] (class one-hot 0, prototypes uniform).
    # threshold 0.6: relabel to 0; with y = 1 the label changes although soft[y] fails anyway;
    # with y = 0 the sample is kept with its (same) label.
    target, kept = run([[0], [0]], [[0, 1, 2, 3], [0, 1, 2, 3]], [1, 0], threshold=0.6)
    assert target.tolist() == [0, 0] and kept.tolist() == [True, True]
    # soft = [0.5, 0.25, 0.25, 0] with threshold 0.45: y = 1 satisfies nothing but is relabelled.
    target, kept = run([[0]], [[1, 2]], [1], threshold=0.45)
    assert target.tolist() == [0] and kept.tolist() == [True]


def test_threshold_is_strict():
    # max(soft) = 0.625 exactly equal to the threshold: no relabel.
    target, kept = run([[0], [0]], [[0, 1, 2, 3], [0, 1, 2, 3]], [0, 1], threshold=0.625)
    assert target.tolist() == [0, 1]
    assert kept.tolist() == [True, False]  # y=0: 0.625 > 1/4 kept; y=1: 0.125 -> OOD


def test_keep_when_label_probability_above_one_over_k():
    # soft = [0.5, 0.25, 0.25, 0]: no relabel at 0.8; y = 0 kept (0.5 > 0.25).
    target, kept = run([[0]], [[1, 2]], [0])
    assert target.tolist() == [0] and kept.tolist() == [True]


def test_one_over_k_edge_is_strict():
    # soft[y] = 0.25 exactly = 1/K -> OOD (y = 1 and y = 2); soft[3] = 0 -> OOD.
    target, kept = run([[0]] * 3, [[1, 2]] * 3, [1, 2, 3])
    assert target.tolist() == [1, 2, 3]  # labels untouched when not relabelled
    assert kept.tolist() == [False, False, False]
    # Uniform soft: every soft[y] = 1/K exactly -> OOD.
    target, kept = run([[0, 1, 2, 3]], [[0, 1, 2, 3]], [2])
    assert kept.tolist() == [False]


def test_just_above_one_over_k_is_kept():
    class_logits = probs_logits([0])
    proto_logits = probs_logits([1, 2])
    proto_logits[0, 1] = 1e-3  # soft[1] slightly above 0.25
    target, kept = correct_labels(class_logits, proto_logits, torch.tensor([1]), 0.5, 0.8, K)
    assert target.tolist() == [1] and kept.tolist() == [True]


def test_alpha_weights_the_two_sources():
    # alpha = 1: only the classifier counts; soft = e3 -> relabel to 3 whatever the prototypes say.
    target, kept = run([[3]], [[0]], [0], alpha=1.0)
    assert target.tolist() == [3] and kept.tolist() == [True]
    # alpha = 0: only the prototypes; soft = [0.5, 0.5, 0, 0], y = 1 kept (0.5 > 0.25).
    target, kept = run([[3]], [[0, 1]], [1], alpha=0.0)
    assert target.tolist() == [1] and kept.tolist() == [True]


def test_batch_of_mixed_cases_and_dtypes():
    class_logits = probs_logits([2], [0], [0], [0]).bfloat16()  # autocast-like dtype
    proto_logits = probs_logits([2], [1, 2], [1, 2], [0, 1, 2, 3]).bfloat16()
    labels = torch.tensor([0, 0, 1, 1])
    target, kept = correct_labels(class_logits, proto_logits, labels, 0.5, 0.8, K)
    assert target.tolist() == [2, 0, 1, 1]  # relabel, keep, OOD, OOD
    assert kept.tolist() == [True, True, False, False]
    assert target.dtype == torch.long and kept.dtype == torch.bool


def test_ood_threshold_replaces_one_over_k():
    # soft[y] = 0.125 for y = 1 (class [0], proto [1, 2] -> [0.5, 0.25, 0.25, 0] ... made 0.125 below).
    class_logits, proto_logits = probs_logits([0]), probs_logits([0, 1, 2, 3])  # soft = [0.625, .125, .125, .125]
    labels = torch.tensor([1])
    assert correct_labels(class_logits, proto_logits, labels, 0.5, 0.8, K)[1].tolist() == [False]  # 0.125 <= 1/4
    assert correct_labels(class_logits, proto_logits, labels, 0.5, 0.8, K, None)[1].tolist() == [False]  # None = 1/K
    assert correct_labels(class_logits, proto_logits, labels, 0.5, 0.8, K, 0.01)[1].tolist() == [True]  # 0.125 > 0.01
    assert correct_labels(class_logits, proto_logits, labels, 0.5, 0.8, K, 0.125)[1].tolist() == [False]  # strict
    # Relabelling does not depend on the bound: max 1 > 0.8 relabels whatever ood_threshold is.
    target, kept = correct_labels(probs_logits([2]), probs_logits([2]), torch.tensor([0]), 0.5, 0.8, K, 0.9)
    assert target.tolist() == [2] and kept.tolist() == [True]
