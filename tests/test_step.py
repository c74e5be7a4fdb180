"""One MoPro step on a CPU: finite losses, state updates, bf16 autocast, checkpoint resume, and the
order of updates (DESIGN.md section 1 steps 1-6)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from dist_worker import TinyNet  # tests/ helper: a BN-free network with MoPro's interface
from mopro_fast.core.losses import instance_loss, masked_cross_entropy, prototype_logits
from mopro_fast.core.model import MoProNet
from mopro_fast.core.mopro import MoPro
from mopro_fast.core.step import mopro_step, noise_detection

CLASSES = 10


def resnet_mopro(dim=128, queue_length=256, proj_hidden=2048, seed=0) -> MoPro:
    torch.manual_seed(seed)
    net = MoProNet(CLASSES, "resnet18", dim=dim, proj_hidden=proj_hidden, small_stem=True)
    return MoPro(net, CLASSES, dim=dim, queue_length=queue_length)


def batch(size, pixels, seed):
    gen = torch.Generator().manual_seed(seed)
    view_q = torch.randn(size, 3, pixels, pixels, generator=gen)
    view_k = view_q + 0.2 * torch.randn(size, 3, pixels, pixels, generator=gen)
    labels = torch.randint(0, CLASSES, (size,), generator=gen)
    return view_q, view_k, labels


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_resnet18_step_batch32_32px(dtype):
    mopro = resnet_mopro()
    view_q, view_k, labels = batch(32, 32, seed=1)
    truth = labels.clone()
    truth[:4] = -1  # four OOD samples
    truth[4:8] = (labels[4:8] + 1) % CLASSES  # four flipped labels
    queue_before = mopro.queue.keys.clone()
    key_before = copy.deepcopy(mopro.key)
    opt = torch.optim.SGD(mopro.query.parameters(), lr=0.1, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        loss, metrics = mopro_step(mopro, view_q, view_k, labels, use_proto_loss=True, clean=True,
                                   truth=truth)
    loss.backward()
    opt.step()
    mopro.momentum_update()

    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    expected_keys = {"loss", "loss_cls", "loss_proto", "loss_inst", "acc_inst", "acc_cls",
                     "acc_proto", "frac_relabelled", "frac_ood", "noise_precision", "noise_recall"}
    assert set(metrics) == expected_keys
    assert all(v.dim() == 0 for v in metrics.values())
    assert metrics["loss_inst"] > 0 and metrics["loss_cls"] > 0
    assert int(mopro.queue.ptr) == 32
    assert not torch.equal(mopro.queue.keys[:32], queue_before[:32])
    assert torch.equal(mopro.queue.keys[32:], queue_before[32:])
    assert mopro.prototypes.weight.abs().sum() > 0  # were all zero
    assert torch.allclose(mopro.prototypes.weight.norm(dim=1)[mopro.prototypes.weight.norm(dim=1) > 0],
                          torch.ones(1), atol=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip(mopro.key.parameters(), key_before.parameters())]
    assert all(moved)  # EMA after the optimiser step moved every key parameter
    assert all(p.grad is None for p in mopro.key.parameters())


def test_epoch0_and_before_cleaning():
    mopro = resnet_mopro(dim=16, queue_length=20, proj_hidden=32)
    view_q, view_k, labels = batch(8, 16, seed=2)
    loss, metrics = mopro_step(mopro, view_q, view_k, labels, use_proto_loss=False, clean=False)
    assert float(metrics["loss_proto"]) == 0.0
    assert float(metrics["frac_ood"]) == 0.0 and float(metrics["frac_relabelled"]) == 0.0
    assert torch.allclose(loss, metrics["loss_cls"] + metrics["loss_inst"])
    assert "noise_precision" not in metrics


def tiny_mopro(seed=0, **kwargs) -> MoPro:
    torch.manual_seed(seed)
    return MoPro(TinyNet(), 5, dim=8, queue_length=12, **kwargs)


def test_step_matches_hand_computation():
    """Losses use the queue and prototypes of before the step; the prototypes are then updated
    with the corrected labels over the kept samples; the keys are enqueued."""
    mopro = tiny_mopro(threshold=0.3)
    # Give the prototypes some content first.
    for seed in range(3):
        view_q, view_k, _ = batch(8, 8, seed)
        mopro_step(mopro, view_q, view_k, torch.arange(8) % 5, use_proto_loss=True, clean=False)
    queue, protos = mopro.queue.keys.clone(), mopro.prototypes.weight.clone()
    view_q, view_k, labels = batch(8, 8, seed=10)
    labels = labels % 5
    loss, metrics = mopro_step(mopro, view_q, view_k, labels, use_proto_loss=True, clean=True)
    with torch.no_grad():
        class_logits, z = mopro.query(view_q)
        _, k = mopro.key(view_k)
        expected_inst, _, _ = instance_loss(z, k, queue, mopro.temperature)
        s_logits = prototype_logits(z, protos, mopro.temperature)
    assert torch.allclose(metrics["loss_inst"], expected_inst, atol=1e-6)
    soft = 0.5 * F.softmax(class_logits, 1) + 0.5 * F.softmax(s_logits, 1)
    relabel = soft.max(1).values > 0.3
    kept = relabel | (soft.gather(1, labels[:, None]).squeeze(1) > 1 / 5)
    target = torch.where(relabel, soft.argmax(1), labels)
    expected_proto = masked_cross_entropy(s_logits, target, kept)
    assert torch.allclose(metrics["loss_proto"], expected_proto, atol=1e-6)
    assert torch.allclose(metrics["frac_ood"], (~kept).float().mean())
    assert 0 < int(kept.sum()) and bool((target != labels).any())  # both cases occur
    expected_protos = protos.clone()
    for i in range(8):  # DESIGN.md step 6, literally
        if bool(kept[i]):
            c = int(target[i])
            expected_protos[c] = 0.999 * expected_protos[c] + 0.001 * z[i]
    expected_protos = F.normalize(expected_protos, dim=1)
    assert torch.allclose(mopro.prototypes.weight, expected_protos, atol=1e-6)
    assert torch.allclose(mopro.queue.keys[(torch.arange(8) + 24) % 12], k, atol=1e-6)


def test_state_dict_round_trip_resumes_bit_for_bit():
    def make():
        mopro = resnet_mopro(dim=16, queue_length=20, proj_hidden=32, seed=0)
        return mopro, torch.optim.SGD(mopro.query.parameters(), lr=0.05, momentum=0.9,
                                      weight_decay=1e-4)

    def train(mopro, opt, seeds, clean):
        losses = []
        for seed in seeds:
            view_q, view_k, labels = batch(8, 16, seed)
            loss, _ = mopro_step(mopro, view_q, view_k, labels, use_proto_loss=True, clean=clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mopro.momentum_update()
            losses.append(loss.detach())
        return torch.stack(losses)

    mopro, opt = make()
    train(mopro, opt, range(3), clean=False)
    buffer = io.BytesIO()
    torch.save({"mopro": mopro.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert {"queue.keys", "queue.ptr", "prototypes.weight"} <= set(saved["mopro"])
    assert any(k.startswith("key.") for k in saved["mopro"])
    assert any(k.startswith("query.") for k in saved["mopro"])

    torch.manual_seed(123)  # a fresh instance with other weights and another random queue
    resumed = MoPro(MoProNet(CLASSES, "resnet18", dim=16, proj_hidden=32, small_stem=True),
                    CLASSES, dim=16, queue_length=20)
    resumed_opt = torch.optim.SGD(resumed.query.parameters(), lr=0.05, momentum=0.9,
                                  weight_decay=1e-4)
    resumed.load_state_dict(saved["mopro"])
    resumed_opt.load_state_dict(saved["optim"])

    losses_a = train(mopro, opt, range(3, 6), clean=True)
    losses_b = train(resumed, resumed_opt, range(3, 6), clean=True)
    assert torch.equal(losses_a, losses_b)
    state_a, state_b = mopro.state_dict(), resumed.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert int(mopro.queue.ptr) == (6 * 8) % 20


def test_noise_detection_precision_recall():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    truth = torch.tensor([0, -1, 2, 0, 4, 1])  # noisy: 1 (OOD), 3, 5
    detected = torch.tensor([False, True, True, True, False, False])  # hits: 1, 3; false: 2
    out = noise_detection(labels, detected, truth)
    assert torch.allclose(out["noise_precision"], torch.tensor(2 / 3))
    assert torch.allclose(out["noise_recall"], torch.tensor(2 / 3))
    none = noise_detection(labels, torch.zeros(6, dtype=torch.bool), labels)
    assert float(none["noise_precision"]) == 0.0 and float(none["noise_recall"]) == 0.0


def test_masked_cross_entropy_with_nothing_kept_is_zero_and_finite():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()
    kept = torch.tensor([True, False, True, False])
    targets = torch.tensor([0, 1, 2, 0])
    expected = F.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(masked_cross_entropy(logits, targets, kept), expected)
