"""Momentum encoder update vs the per-parameter loop of the original code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mopro_fast.core.ema import (
    FlatParameters,
    cosine_momentum,
    ema_update,
    ema_update_flat,
    ema_update_reference,
)
from mopro_fast.core.model import MoProNet
from mopro_fast.core.mopro import MoPro


def small_net(dtype=torch.float32) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return net.to(dtype)


def query_key_pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    query = small_net(dtype)
    key = copy.deepcopy(query).requires_grad_(False)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
        query[1].running_mean.add_(1.0)  # query BN statistics differ from the key's
    return query, key


def literal_loop(key, query, m):
    """k <- m k + (1 - m) q over parameters only, one parameter at a time."""
    with torch.no_grad():
        for pk, pq in zip(key.parameters(), query.parameters()):
            pk.copy_(pk * m + pq * (1 - m))


@pytest.mark.parametrize("m", [0.999, 0.9, 0.0, 1.0])
def test_foreach_update_matches_loop(m):
    query, key = query_key_pair(torch.float64)
    expected = copy.deepcopy(key)
    literal_loop(expected, query, m)
    ema_update(key, query, m)
    for a, b in zip(key.parameters(), expected.parameters()):
        assert (a - b).abs().max() <= 1e-14
    if m == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(key.parameters(), query.parameters()))


def test_float32_and_several_steps():
    query, key = query_key_pair(torch.float32)
    expected = copy.deepcopy(key)
    for _ in range(5):
        literal_loop(expected, query, 0.99)
        ema_update(key, query, 0.99)
    diffs = [(a - b).abs().max() for a, b in zip(key.parameters(), expected.parameters())]
    assert max(diffs) <= 1e-6
    assert max((a - b).abs().max() for a, b in zip(key.parameters(), query.parameters())) > 0.1


def test_buffers_are_not_copied():
    query, key = query_key_pair()
    before = {n: b.clone() for n, b in key.named_buffers()}
    ema_update(key, query, 0.5)
    for n, b in key.named_buffers():
        assert torch.equal(b, before[n]), n


def test_reference_function_is_the_loop():
    query, key = query_key_pair(torch.float64)
    expected = copy.deepcopy(key)
    literal_loop(expected, query, 0.9)
    ema_update_reference(key, query, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(key.parameters(), expected.parameters()))


def test_flat_buffers_keep_values_and_match_loop():
    query, key = query_key_pair(torch.float64)
    values = [p.detach().clone() for p in key.parameters()]
    expected = copy.deepcopy(key)
    flat_q, flat_k = FlatParameters.of(query), FlatParameters.of(key)
    assert flat_q is not None and flat_k is not None and flat_q.layout == flat_k.layout
    assert all(torch.equal(p, v) for p, v in zip(key.parameters(), values))  # values kept
    literal_loop(expected, query, 0.9)
    ema_update_flat(flat_k, flat_q, 0.9)
    for a, b in zip(key.parameters(), expected.parameters()):
        assert (a - b).abs().max() <= 1e-14
    assert flat_k.is_intact() and flat_k.is_intact(full=True)
    ema_update_reference(key, query, 0.9)  # re-points .data: no longer in the buffer
    assert not flat_k.is_intact() and not flat_k.is_intact(full=True)


def test_mopro_momentum_update_flat_and_after_moves():
    torch.manual_seed(0)
    mopro = MoPro(MoProNet(4, "resnet18", dim=8, proj_hidden=16, small_stem=True), 4, dim=8,
                  queue_length=16, momentum=0.9)
    with torch.no_grad():
        for p in mopro.query.parameters():
            p.add_(0.1)
    mopro.to(memory_format=torch.channels_last)  # new storage: MoPro must re-flatten
    assert mopro._flat_key.is_intact() and mopro._flat_query.is_intact()
    before = copy.deepcopy(mopro.key)
    expected = copy.deepcopy(mopro.key)
    literal_loop(expected, mopro.query, 0.9)
    mopro.momentum_update()
    diffs = [(a - b).abs().max() for a, b in zip(mopro.key.parameters(), expected.parameters())]
    assert max(diffs) <= 1e-6
    # The key moved by (1 - m) * 0.1 = 0.01 towards the query.
    moved = mopro.key.classifier.bias - before.classifier.bias
    assert torch.allclose(moved, torch.full_like(moved, 0.01), atol=1e-6)
    # Fallback when the flat buffers were broken: same result through foreach.
    ema_update_reference(mopro.key, mopro.key, 1.0)  # re-points key .data, values unchanged
    literal_loop(expected, mopro.query, 0.9)
    mopro.momentum_update()
    diffs = [(a - b).abs().max() for a, b in zip(mopro.key.parameters(), expected.parameters())]
    assert max(diffs) <= 1e-6


def test_cosine_momentum_schedule():
    schedule = cosine_momentum(0.99, total_steps=100)
    values = [schedule(t) for t in range(0, 101, 10)]
    assert values[0] == pytest.approx(0.99) and values[-1] == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert schedule(1000) == pytest.approx(1.0)


def test_bench_ema_command_prints_json():
    import json

    from click.testing import CliRunner

    from mopro_fast.bench.core import ema_bench

    args = ["--arch", "resnet18", "--classes", "10", "--rounds", "1", "--warmup", "0",
            "--device", "cpu", "--json"]
    result = CliRunner().invoke(ema_bench, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {"loop_ms", "fused_ms", "ratio", "max_abs_err", "settings", "env"} <= set(out)
    assert out["env"]["device"] == "cpu" and out["env"]["torch"]  # environment under "env", as every bench
    assert out["max_abs_err"] <= 1e-6 and out["foreach_max_abs_err"] <= 1e-6
