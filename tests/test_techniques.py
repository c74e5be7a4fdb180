"""Time-to-accuracy switches of issue 15 that live in the losses and the optimiser: label smoothing
(`optim.label_smoothing`) and no weight decay on BN and biases (`optim.no_bn_weight_decay`). Each is
off by default, and off leaves the step as it was."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dist_worker import TinyNet  # tests/ helper: a BN-free network with MoPro's interface
from mopro_fast.core.losses import masked_cross_entropy, prototype_logits
from mopro_fast.core.mopro import MoPro
from mopro_fast.core.noise import correct_labels
from mopro_fast.core.step import mopro_step
from mopro_fast.training.train import ce_step

K = 5


def tiny_mopro(seed: int = 0) -> MoPro:
    torch.manual_seed(seed)
    return MoPro(TinyNet(), K, dim=8, queue_length=12, threshold=0.3)


def batch(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    view_q = torch.randn(size, 3, 8, 8, generator=gen)
    view_k = view_q + 0.2 * torch.randn(size, 3, 8, 8, generator=gen)
    return view_q, view_k, torch.randint(0, K, (size,), generator=gen)


def warmed_up() -> MoPro:
    """A MoPro whose prototypes have content, so that cleaning relabels and drops."""
    mopro = tiny_mopro()
    for seed in range(3):
        view_q, view_k, _ = batch(seed)
        mopro_step(mopro, view_q, view_k, torch.arange(8) % K, use_proto_loss=True, clean=False)
    return mopro


# ---- label smoothing ---------------------------------------------------------------------------

def test_masked_cross_entropy_without_smoothing_is_the_plain_loss_bit_for_bit():
    logits = torch.randn(6, K)  # B x K
    target, kept = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([True, False, True, True, False, True])
    before = F.cross_entropy(logits, target, reduction="none")  # the loss as it was before the switch
    before = torch.where(kept, before, torch.zeros_like(before)).sum() / kept.sum().clamp_min(1)
    assert torch.equal(masked_cross_entropy(logits, target, kept), before)
    assert torch.equal(masked_cross_entropy(logits, target, kept, 0.0), before)
    smoothed = masked_cross_entropy(logits, target, kept, 0.1)
    assert torch.allclose(smoothed, F.cross_entropy(logits[kept], target[kept], label_smoothing=0.1), atol=1e-6)
    assert not torch.allclose(smoothed, before)  # the switch does something


def test_smoothing_changes_only_the_classification_loss():
    """eps = 0.1: loss_cls = smoothed CE over the kept samples; the prototype and instance losses, the
    corrected labels and the prototype update are those of eps = 0."""
    plain = warmed_up()
    smooth = copy.deepcopy(plain)
    smooth.label_smoothing = 0.1
    queue, protos = plain.queue.keys.clone(), plain.prototypes.weight.clone()
    view_q, view_k, labels = batch(seed=10)
    _, m0 = mopro_step(plain, view_q, view_k, labels, use_proto_loss=True, clean=True)
    loss, m1 = mopro_step(smooth, view_q, view_k, labels, use_proto_loss=True, clean=True)

    with torch.no_grad():
        class_logits, z = plain.query(view_q)  # b x K, b x d (the query net did not change)
        s_logits = prototype_logits(z, protos, plain.temperature)  # b x K
        target, kept = correct_labels(class_logits, s_logits, labels, 0.5, 0.3, K, None)  # b, b
    assert 0 < int(kept.sum()) < 8 and bool(((target != labels) & kept).any())  # relabelled and dropped occur
    expected = F.cross_entropy(class_logits[kept], target[kept], label_smoothing=0.1)
    assert torch.allclose(m1["loss_cls"], expected, atol=1e-6)
    assert not torch.allclose(m1["loss_cls"], m0["loss_cls"])
    for name in ("loss_proto", "loss_inst", "frac_ood", "frac_relabelled", "acc_cls", "acc_proto"):
        assert torch.equal(m1[name], m0[name]), name
    assert torch.allclose(loss, m1["loss_cls"] + m1["loss_proto"] + m1["loss_inst"])
    assert torch.equal(smooth.prototypes.weight, plain.prototypes.weight)
    assert not torch.equal(smooth.prototypes.weight, protos)  # the update ran
    assert torch.equal(smooth.queue.keys, plain.queue.keys) and not torch.equal(plain.queue.keys, queue)


def test_ce_baseline_smoothing():
    torch.manual_seed(0)
    net = TinyNet()
    view_q, _, labels = batch(seed=4)
    logits, _ = net(view_q)
    loss0, _ = ce_step(net, view_q, labels)
    assert torch.equal(loss0, F.cross_entropy(logits, labels))
    loss1, metrics = ce_step(net, view_q, labels, 0.1)
    assert torch.equal(loss1, F.cross_entropy(logits, labels, label_smoothing=0.1)) and loss1 != loss0
    assert torch.equal(metrics["loss_cls"], loss1.detach())


# ---- no weight decay on BN and biases ----------------------------------------------------------

def built(tmp_path, *overrides: str):
    from conftest import TINY
    from mopro_fast.config import load_config
    from mopro_fast.training.train import build_model

    cfg = load_config(TINY, ["data.shards=s", f"run.out={tmp_path}", "model.width=8", *overrides])
    return build_model(cfg, 10, 0.1, torch.device("cpu"))


def test_default_is_one_group_with_decay_on_everything(tmp_path):
    training = built(tmp_path)
    (group,) = training.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in training.mopro.query.parameters()]
    assert group["weight_decay"] == 5e-4 and group["lr"] == 0.1  # tiny_test.yaml's
    assert training.mopro.label_smoothing == 0.0


def test_no_bn_weight_decay_puts_every_1d_parameter_and_only_those_in_a_no_decay_group(tmp_path):
    training = built(tmp_path, "optim.no_bn_weight_decay=true", "optim.label_smoothing=0.1")
    decay, no_decay = training.optimizer.param_groups
    query = training.mopro.query
    named = {id(p): name for name, p in query.named_parameters()}
    one_d = {name for name, p in query.named_parameters() if p.ndim == 1}
    assert {named[id(p)] for p in no_decay["params"]} == one_d
    assert {named[id(p)] for p in decay["params"]} == set(named.values()) - one_d
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    bn = {f"{name}.{w}" for name, m in query.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
          for w in ("weight", "bias")}
    assert bn and bn <= one_d and {"classifier.bias", "projection.0.bias", "projection.2.bias"} <= one_d
    assert all(name.endswith("bias") or name in bn for name in one_d)
    assert {"classifier.weight", "encoder.conv1.weight"} <= set(named.values()) - one_d
    assert training.mopro.label_smoothing == 0.1  # optim.label_smoothing reaches the step


def test_no_bn_weight_decay_leaves_1d_parameters_undecayed_in_a_step(tmp_path):
    """With zero gradients, SGD moves a parameter only by its weight decay: BN and biases stay put."""
    training = built(tmp_path, "optim.no_bn_weight_decay=true", "optim.impl=for_loop", "optim.weight_decay=0.1")
    query = training.mopro.query
    before = {name: p.detach().clone() for name, p in query.named_parameters()}
    for p in query.parameters():
        p.grad = torch.zeros_like(p)
    training.optimizer.step()
    for name, p in query.named_parameters():
        assert torch.equal(p, before[name]) == (p.ndim == 1 or not before[name].any()), name


def test_resume_across_a_change_of_the_switch_is_one_line(tmp_path):
    import pytest

    from mopro_fast.training.checkpoint import CheckpointError
    from mopro_fast.training.resume import apply_resume

    one, two = built(tmp_path), built(tmp_path, "optim.no_bn_weight_decay=true")
    state = {"model": one.mopro.state_dict(), "optimizer": one.optimizer.state_dict(), "scaler": None, "rng": None}
    with pytest.raises(CheckpointError, match=r"^ckpt.pt: its optimiser state does not fit .*no_bn_weight_decay"):
        apply_resume("ckpt.pt", state, None, two.mopro, two.optimizer, two.scaler)


# ---- MoPro's momenta from Derived ----------------------------------------------------------------

def test_build_model_takes_the_derived_momenta(tmp_path):
    from conftest import TINY
    from mopro_fast.config import derive, load_config
    from mopro_fast.training.train import build_model

    cfg = load_config(TINY, ["data.shards=s", f"run.out={tmp_path}", "model.width=8", "mopro.momentum_batch=8"])
    assert (built(tmp_path).mopro.momentum, built(tmp_path).mopro.proto_momentum) == \
        (cfg.mopro.momentum, cfg.mopro.proto_momentum)  # none given: the recipe's values as they are
    d = derive(cfg, world_size=1, num_train=96)  # global batch 32 = 4 x momentum_batch
    mopro = build_model(cfg, 10, 0.1, torch.device("cpu"), momenta=(d.key_momentum, d.proto_momentum)).mopro
    assert mopro.momentum == cfg.mopro.momentum ** 4 and mopro.proto_momentum == cfg.mopro.proto_momentum
