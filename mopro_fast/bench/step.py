"""`mopro-fast bench step`: full MoPro training steps on synthetic data, mopro-fast vs original style.

Both paths are built by the trainer's own `mopro_fast.training.train.build_model` and stepped by its own
`mopro_fast.training.train.train_step` (both views, shuffle-BN, instance/prototype/classification losses,
noise correction, GradScaler, backward, SGD, queue and prototype updates, key-network EMA), on the
same synthetic batch in the same process. They differ only in the recipe switches and the two
reference updates that stand for the original code:

| | mopro-fast | original style |
|---|---|---|
| precision (`run.precision`) | `--precision` (bf16 autocast by default on CUDA) | fp32 |
| memory format (`run.channels_last`) | channels-last (NCHW with `--nchw`: faster on CPUs) | NCHW |
| SGD (`optim.impl`) | fused (CUDA) / foreach | for-loop |
| `torch.compile` (`run.compile`) | with `--compile` | no |
| key EMA | one fused lerp over a flat buffer | per-parameter loop, 3 temporaries each |
| prototype update | closed form, a few kernels | per-sample Python loop |

Timed in interleaved rounds by `mopro_fast.bench.kit` (CUDA events on a GPU, perf_counter on a
CPU), medians.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mopro_fast.bench.kit import (arch_option, default_precision, emit, environment, interleaved, json_option,
                                  resolve_device, timings, training_options)


def training_config(arch: str, small_stem: bool, precision: str, channels_last: bool, compiled: bool,
                    sgd_impl: str = "auto") -> Any:
    """A recipe at its defaults (the paper's MoPro: queue 8192, 128-d projection, ...) with the
    benchmark's switches; what `build_model` reads."""
    from mopro_fast.config import Config

    cfg = Config()
    cfg.model.arch, cfg.model.small_stem = arch, small_stem
    cfg.run.precision, cfg.run.channels_last, cfg.run.compile = precision, channels_last, compiled
    cfg.optim.impl = sgd_impl
    return cfg


def build(cfg: Any, classes: int, device: Any, seed: int = 0, lr: float = 0.1) -> Any:
    """`build_model` of `cfg` with `classes` classes on one process, seeded: a `train.Training`."""
    import torch

    from mopro_fast.training.train import build_model

    torch.manual_seed(seed)
    return build_model(cfg, classes, lr, device, world=1)


def use_reference_updates(mopro: Any) -> None:
    """Swap the fused key-EMA and prototype updates of `mopro` for the original per-parameter and
    per-sample loops (what `train_step` then calls)."""
    from mopro_fast.core.ema import ema_update_reference
    from mopro_fast.core.prototypes import prototype_update_reference

    mopro.momentum_update = lambda: ema_update_reference(mopro.key, mopro.query, mopro.momentum)
    weight = mopro.prototypes.weight
    mopro.prototypes.update = lambda z, y, kept, m: prototype_update_reference(weight, z, y, kept, m)


def stepper(t: Any) -> Callable[[Any], object]:
    """One full MoPro training step of `t` (a `train.Training`) on a `Batch`, as the trainer takes
    it with both switches on (prototype loss and noise cleaning)."""
    from mopro_fast.training.train import train_step

    return lambda batch: train_step(True, t.step_fn, t.mopro, t.query, t.optimizer, t.scaler, t.autocast, batch,
                                    use_proto=True, clean=True, truth=None)


def synthetic_batch(batch: int, classes: int, res: int, device: Any, channels_last: bool, seed: int = 0) -> Any:
    """Two random B x 3 x res x res views and labels as a `Batch` on `device`."""
    import torch

    from mopro_fast.data import Batch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    views = [torch.randn(batch, 3, res, res, generator=gen).to(device) for _ in range(2)]
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return Batch(views[0], views[1], labels, torch.arange(batch, device=device))


def run_step_bench(arch: str, res: int, batch: int, classes: int, device_name: str, precision: str,
                   compiled: bool, small_stem: bool, rounds: int, warmup: int, channels_last: bool = True) -> dict:
    from mopro_fast.training import runtime

    device = resolve_device(device_name)
    runtime.configure_backends(device, cudnn_benchmark=True, tf32=True, deterministic=False)
    fast_cfg = training_config(arch, small_stem, precision, channels_last, compiled)
    fast_step, fast_batch = stepper(build(fast_cfg, classes, device)), synthetic_batch(batch, classes, res, device,
                                                                                      channels_last)
    original = build(training_config(arch, small_stem, "fp32", False, False, sgd_impl="for_loop"), classes, device)
    use_reference_updates(original.mopro)
    original_step, original_batch = stepper(original), synthetic_batch(batch, classes, res, device, False)
    fast, orig = interleaved([lambda: fast_step(fast_batch), lambda: original_step(original_batch)], device, rounds,
                             warmup)
    fast_ms, original_ms = fast.median_ms, orig.median_ms
    return {
        "bench": "step",
        "fast_img_s": round(batch / fast_ms * 1e3, 1),
        "original_img_s": round(batch / original_ms * 1e3, 1),
        "ratio": round(original_ms / fast_ms, 2),
        "fast_ms": round(fast_ms, 2),
        "original_ms": round(original_ms, 2),
        "settings": {"arch": arch, "res": res, "batch": batch, "classes": classes, "precision": precision,
                     "channels_last": channels_last, "compile": compiled, "small_stem": small_stem, "rounds": rounds,
                     "warmup": warmup, "queue": fast_cfg.mopro.queue_size},
        "timings": timings(fast=fast, original=orig),
        "env": environment(device),
    }


@click.command("step")
@arch_option()
@click.option("--res", default=224, show_default=True, help="Square input resolution in pixels.")
@click.option("--batch", default=64, show_default=True, help="Batch size per step.")
@click.option("--classes", default=1000, show_default=True, help="Classes K (classifier and prototypes).")
@training_options
@click.option("--rounds", default=5, show_default=True, help="Timed rounds; medians are reported.")
@click.option("--warmup", default=2, show_default=True, help="Untimed rounds first (cudnn autotune, compile).")
@click.option("--quick", is_flag=True, help="CI size: resnet18, small stem, 32 px, batch 32, 3 rounds.")
@json_option
def step_bench(arch: str, res: int, batch: int, classes: int, device: str, precision: str | None, compiled: bool,
               small_stem: bool, nchw: bool, rounds: int, warmup: int, quick: bool, as_json: bool) -> None:
    """Full MoPro training steps/s on synthetic data: mopro-fast vs the original implementation's style."""
    if quick:
        arch, res, batch, classes, small_stem, rounds, warmup = "resnet18", 32, 32, 100, True, 3, 1
    emit(run_step_bench(arch, res, batch, classes, device, default_precision(device, precision), compiled, small_stem,
                        rounds, warmup, channels_last=not nchw), as_json)
