"""Fused prototype update vs the literal per-sample loop (DESIGN.md section 1 step 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mopro_fast.core.noise import correct_labels
from mopro_fast.core.prototypes import Prototypes, prototype_update, prototype_update_reference


def literal_loop(protos, z, labels, kept, m):
    """The rule as written in DESIGN.md: sample by sample in batch order, then normalise rows."""
    protos = protos.clone()
    for i in range(labels.shape[0]):
        if bool(kept[i]):
            c = int(labels[i])
            protos[c] = m * protos[c] + (1 - m) * z[i]
    norms = protos.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, protos / norms.clamp_min(1e-30), protos)


def random_inputs(batch, classes, dim, dtype, seed, kept_frac=0.8, zero_start=False):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    kept = torch.rand(batch, generator=gen) < kept_frac
    if zero_start:
        protos = torch.zeros(classes, dim, dtype=dtype)
    else:
        protos = F.normalize(torch.randn(classes, dim, generator=gen, dtype=dtype), dim=1)
        protos[torch.rand(classes, generator=gen) < 0.2] = 0  # some classes not seen yet
    return protos, z, labels, kept


@pytest.mark.parametrize("m", [0.999, 0.9, 0.5])
@pytest.mark.parametrize("zero_start", [True, False])
def test_float64_matches_loop_with_many_repeats(m, zero_start):
    # 600 samples over 7 classes: ~70 per class, so m^(n-i) spans many powers.
    protos, z, labels, kept = random_inputs(600, 7, 16, torch.float64, seed=1, zero_start=zero_start)
    expected = literal_loop(protos, z, labels, kept, m)
    fused = prototype_update(protos.clone(), z, labels, kept, m)
    assert (fused - expected).abs().max() <= 1e-10
    assert not torch.equal(fused, F.normalize(protos, dim=1))  # the update did something


def test_float32_matches_loop_at_paper_scale():
    protos, z, labels, kept = random_inputs(2048, 50, 128, torch.float32, seed=2)
    expected = literal_loop(protos.double(), z.double(), labels, kept, 0.999)
    fused = prototype_update(protos.clone(), z, labels, kept, 0.999)
    assert (fused.double() - expected).abs().max() <= 1e-5
    same_dtype_loop = literal_loop(protos, z, labels, kept, 0.999)
    assert (fused - same_dtype_loop).abs().max() <= 1e-5


def test_several_consecutive_steps_match_loop():
    protos = torch.zeros(5, 8, dtype=torch.float64)
    expected = protos.clone()
    for step in range(6):
        _, z, labels, kept = random_inputs(64, 5, 8, torch.float64, seed=10 + step)
        expected = literal_loop(expected, z, labels, kept, 0.9)
        prototype_update(protos, z, labels, kept, 0.9)
    assert (protos - expected).abs().max() <= 1e-10


def test_relabelled_and_ood_samples_follow_corrected_labels():
    gen = torch.Generator().manual_seed(3)
    batch, classes, dim = 512, 10, 32
    z = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    web = torch.randint(0, classes, (batch,), generator=gen)
    class_logits = 3 * torch.randn(batch, classes, generator=gen)
    proto_logits = 3 * torch.randn(batch, classes, generator=gen)
    target, kept = correct_labels(class_logits, proto_logits, web, 0.5, 0.6, classes)
    assert ((target != web) & kept).sum() > 20  # relabelled samples present
    assert (~kept).sum() > 20  # OOD samples present
    protos = torch.zeros(classes, dim, dtype=torch.float64)
    expected = literal_loop(protos, z, target, kept, 0.95)
    fused = prototype_update(protos.clone(), z, target, kept, 0.95)
    assert (fused - expected).abs().max() <= 1e-10
    # Updating with the web labels instead would give something else: the labels matter.
    assert (literal_loop(protos, z, web, kept, 0.95) - fused).abs().max() > 1e-3


def test_dropped_and_unseen_classes_stay_zero():
    protos = torch.zeros(4, 3, dtype=torch.float64)
    z = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 2, 2, 3, 1])
    kept = torch.tensor([True, True, False, False, True, False])  # classes 1 and 2 only dropped
    fused = prototype_update(protos.clone(), z, labels, kept, 0.9)
    assert torch.equal(fused[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(fused[2], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(fused[[0, 3]].norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert (fused - literal_loop(protos, z, labels, kept, 0.9)).abs().max() <= 1e-12


def test_nothing_kept_only_normalises():
    protos, z, labels, _ = random_inputs(32, 4, 8, torch.float64, seed=4)
    kept = torch.zeros(32, dtype=torch.bool)
    fused = prototype_update(protos.clone(), z, labels, kept, 0.9)
    assert (fused - literal_loop(protos, z, labels, kept, 0.9)).abs().max() <= 1e-12
    assert torch.isfinite(fused).all()


def test_one_class_takes_the_whole_batch():
    protos, z, _, _ = random_inputs(2048, 3, 8, torch.float64, seed=5)
    labels = torch.full((2048,), 1)
    kept = torch.ones(2048, dtype=torch.bool)
    fused = prototype_update(protos.clone(), z, labels, kept, 0.999)
    assert (fused - literal_loop(protos, z, labels, kept, 0.999)).abs().max() <= 1e-10


def test_reference_function_is_the_loop_and_module_uses_fused():
    protos, z, labels, kept = random_inputs(300, 6, 8, torch.float64, seed=6)
    expected = literal_loop(protos, z, labels, kept, 0.99)
    assert (prototype_update_reference(protos.clone(), z, labels, kept, 0.99) - expected).abs().max() <= 1e-12
    module = Prototypes(6, 8).double()
    assert torch.equal(module.weight, torch.zeros(6, 8, dtype=torch.float64))  # zero at start
    module.update(z, labels, kept, 0.99)
    zero_start = literal_loop(torch.zeros(6, 8, dtype=torch.float64), z, labels, kept, 0.99)
    assert (module.weight - zero_start).abs().max() <= 1e-10


def test_low_precision_embeddings_are_accumulated_in_buffer_dtype():
    protos, z, labels, kept = random_inputs(256, 8, 16, torch.float32, seed=7)
    fused = prototype_update(protos.clone(), z.bfloat16(), labels, kept, 0.99)
    assert fused.dtype == torch.float32
    expected = literal_loop(protos.double(), z.bfloat16().double(), labels, kept, 0.99)
    assert (fused.double() - expected).abs().max() <= 1e-5


def test_bench_proto_command_prints_json():
    import json

    from click.testing import CliRunner

    from mopro_fast.bench.core import proto_bench

    args = ["--batch", "64", "--classes", "10", "--dim", "8", "--rounds", "1", "--warmup", "0",
            "--fused-per-round", "2", "--device", "cpu", "--json"]
    result = CliRunner().invoke(proto_bench, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {"loop_ms", "fused_ms", "ratio", "max_abs_err", "settings", "env"} <= set(out)
    assert out["env"]["device"] == "cpu" and out["env"]["torch"]  # environment under "env", as every bench
    assert out["max_abs_err"] <= 1e-5 and out["loop_ms"] > 0 and out["fused_ms"] > 0
