"""`mopro-fast bench proto` and `mopro-fast bench ema`: the fused MoPro state updates against the
literal loops of the original code, on the same inputs in the same run (DESIGN.md section 1
step 6 and the momentum encoder; issue "MoPro core").

Each command warms both paths up, then times them in interleaved rounds (`mopro_fast.bench.kit`:
CUDA events on a GPU, perf_counter on a CPU) and reports the medians, their ratio, each path's
spread under `timings`, and the largest absolute difference between the two results computed from
the same starting state. torch is imported inside the commands so that `mopro-fast --help` stays
fast.
"""

from __future__ import annotations

from typing import Any

import click

from mopro_fast.bench.kit import (arch_option, device_option, emit, environment, interleaved, json_option,
                                  resolve_device, timings)


@click.command("proto")
@click.option("--batch", default=2048, show_default=True,
              help="Gathered samples per step (global batch; 2048 = 8 GPUs x 256).")
@click.option("--classes", default=1000, show_default=True, help="Number of classes K.")
@click.option("--dim", default=128, show_default=True, help="Embedding width d.")
@click.option("--kept", "kept_frac", default=0.9, show_default=True,
              help="Fraction of samples kept; the rest are dropped as out-of-distribution.")
@click.option("--momentum", default=0.999, show_default=True, help="Prototype momentum m_p.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Prototype and embedding dtype.")
@click.option("--rounds", default=7, show_default=True,
              help="Timed rounds; each times the per-sample loop once, then the fused update.")
@click.option("--fused-per-round", default=10, show_default=True,
              help="Timed runs of the fused update per round (it is far faster than the loop).")
@click.option("--warmup", default=2, show_default=True, help="Untimed rounds first.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@device_option()
@json_option
def proto_bench(
    batch: int, classes: int, dim: int, kept_frac: float, momentum: float, dtype: str,
    rounds: int, fused_per_round: int, warmup: int, seed: int, device: str, as_json: bool,
) -> None:
    """Prototype update: fused closed form vs the original per-sample loop (same inputs)."""
    emit(run_proto_bench(batch, classes, dim, kept_frac, momentum, dtype, rounds, fused_per_round, warmup, seed,
                         device), as_json)


def run_proto_bench(batch: int = 2048, classes: int = 1000, dim: int = 128, kept_frac: float = 0.9,
                    momentum: float = 0.999, dtype: str = "float32", rounds: int = 7, fused_per_round: int = 10,
                    warmup: int = 2, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """The `bench proto` result as a dict (see the command's options)."""
    import torch
    import torch.nn.functional as F

    from mopro_fast.core.prototypes import prototype_update, prototype_update_reference

    dev = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch_dtype), dim=1).to(dev)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(dev)
    kept = (torch.rand(batch, generator=gen) < kept_frac).to(dev)
    # Mid-training state: unit rows, with a tenth of the classes still unseen (zero rows).
    start = F.normalize(torch.randn(classes, dim, generator=gen, dtype=torch_dtype), dim=1)
    start[torch.rand(classes, generator=gen) < 0.1] = 0
    start = start.to(dev)
    protos = start.clone()

    def reset() -> None:
        protos.copy_(start)

    loop, fused_t = interleaved(
        [lambda: prototype_update_reference(protos, z, labels, kept, momentum),
         lambda: prototype_update(protos, z, labels, kept, momentum)],
        dev, rounds, warmup, per_round=[1, fused_per_round], setup=reset,
    )
    loop_ms, fused_ms = loop.median_ms, fused_t.median_ms
    reference = prototype_update_reference(start.clone(), z, labels, kept, momentum)
    fused = prototype_update(start.clone(), z, labels, kept, momentum)
    return {
        "bench": "proto",
        "loop_ms": round(loop_ms, 4),
        "fused_ms": round(fused_ms, 4),
        "ratio": round(loop_ms / fused_ms, 2),
        "max_abs_err": float((fused - reference).abs().max()),
        "settings": {"batch": batch, "classes": classes, "dim": dim, "kept": kept_frac,
                     "kept_samples": int(kept.sum()), "momentum": momentum, "dtype": dtype,
                     "rounds": rounds, "fused_per_round": fused_per_round, "warmup": warmup,
                     "seed": seed},
        "timings": timings(loop=loop, fused=fused_t),
        "env": environment(dev),
    }


@click.command("ema")
@arch_option(help="Encoder trunk; classifier and projection heads as in MoPro.")
@click.option("--classes", default=1000, show_default=True, help="Classifier width K.")
@click.option("--dim", default=128, show_default=True, help="Projection width d.")
@click.option("--momentum", default=0.999, show_default=True, help="Key encoder momentum m.")
@click.option("--rounds", default=20, show_default=True,
              help="Timed rounds; each times the per-parameter loop, the foreach update and the "
                   "flat fused update once.")
@click.option("--warmup", default=3, show_default=True, help="Untimed rounds first.")
@click.option("--seed", default=0, show_default=True, help="Seed of the network weights.")
@device_option()
@json_option
def ema_bench(
    arch: str, classes: int, dim: int, momentum: float, rounds: int, warmup: int, seed: int,
    device: str, as_json: bool,
) -> None:
    """Momentum encoder update: fused lerp vs the original per-parameter loop.

    `fused_ms` is the path `MoPro.momentum_update` takes: one lerp over flat parameter buffers;
    `foreach_ms` is the general `torch._foreach_lerp_` over the parameter lists. The baseline
    updates separately allocated parameters, as in the original code.
    """
    emit(run_ema_bench(arch, classes, dim, momentum, rounds, warmup, seed, device), as_json)


def run_ema_bench(arch: str = "resnet50", classes: int = 1000, dim: int = 128, momentum: float = 0.999,
                  rounds: int = 20, warmup: int = 3, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """The `bench ema` result as a dict (see the command's options)."""
    import copy

    import torch

    from mopro_fast.core.ema import FlatParameters, ema_update, ema_update_flat, ema_update_reference
    from mopro_fast.core.model import MoProNet

    dev = resolve_device(device)
    torch.manual_seed(seed)
    query = MoProNet(classes, arch=arch, dim=dim).to(dev)
    key_start = copy.deepcopy(query).requires_grad_(False)
    with torch.no_grad():  # as after some training: query and key differ
        for p in query.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    key_loop, key_foreach, key_flat = (copy.deepcopy(key_start) for _ in range(3))
    flat_k, flat_q = FlatParameters.of(key_flat), FlatParameters.of(copy.deepcopy(query))
    assert flat_k is not None and flat_q is not None and flat_k.layout == flat_q.layout

    # One update of each from the same state, compared before any timing.
    ema_update_reference(key_loop, query, momentum)
    ema_update(key_foreach, query, momentum)
    ema_update_flat(flat_k, flat_q, momentum)

    def max_err(net: torch.nn.Module) -> float:
        pairs = zip(net.parameters(), key_loop.parameters())
        return max(float((a - b).abs().max()) for a, b in pairs)

    errors = {"max_abs_err": max_err(key_flat), "foreach_max_abs_err": max_err(key_foreach)}
    loop, foreach, fused_t = interleaved(
        [lambda: ema_update_reference(key_loop, query, momentum),
         lambda: ema_update(key_foreach, query, momentum),
         lambda: ema_update_flat(flat_k, flat_q, momentum)],
        dev, rounds, warmup,
    )
    loop_ms, foreach_ms, fused_ms = loop.median_ms, foreach.median_ms, fused_t.median_ms
    params = list(query.parameters())
    return {
        "bench": "ema",
        "loop_ms": round(loop_ms, 4),
        "fused_ms": round(fused_ms, 4),
        "ratio": round(loop_ms / fused_ms, 2),
        "foreach_ms": round(foreach_ms, 4),
        "foreach_ratio": round(loop_ms / foreach_ms, 2),
        **errors,
        "settings": {"arch": arch, "classes": classes, "dim": dim, "momentum": momentum,
                     "tensors": len(params), "parameters": sum(p.numel() for p in params),
                     "rounds": rounds, "warmup": warmup, "seed": seed},
        "timings": timings(loop=loop, foreach=foreach, fused=fused_t),
        "env": environment(dev),
    }
