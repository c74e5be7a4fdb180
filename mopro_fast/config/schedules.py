"""Schedules: pure functions of the step or the epoch, computed from the config.

    lr = lr_at(d, step)                            # per-iteration lr (STYLE.md point 10); d = derive(...)
    use_proto, clean = mopro_switches(d, epoch)    # MoPro's losses and cleaning by epoch
    side = resolution_at(cfg.loader, epoch)        # training crop side (progressive resizing)

Epochs are numbered from 0, steps too.
"""

from __future__ import annotations

import math

from mopro_fast.config.derive import Derived
from mopro_fast.config.schema import LoaderConfig


def lr_at(d: Derived, step: int) -> float:
    """Learning rate at global step `step` (0-based), set every iteration: linear warm-up to the
    peak over `warmup_steps` ((step + 1) / warmup_steps), times step decay (gamma per milestone
    passed), a half cosine, or a straight line (FFCV rn50's step-free "triangular" schedule) from
    the end of warm-up to 0 at `total_steps`; so the last step, total_steps - 1, of a linear
    schedule has peak / (total_steps - warmup_steps)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if d.schedule in ("cosine", "linear"):
        t = min(max(step - d.warmup_steps, 0) / max(1, d.total_steps - d.warmup_steps), 1.0)
        lr = d.lr * 0.5 * (1.0 + math.cos(math.pi * t)) if d.schedule == "cosine" else d.lr * (1.0 - t)
    else:
        lr = d.lr * d.gamma ** sum(step >= m for m in d.milestone_steps)
    if step < d.warmup_steps:
        lr *= (step + 1) / d.warmup_steps
    return lr


def mopro_switches(d: Derived, epoch: int) -> tuple[bool, bool]:
    """(use the prototype loss, correct noisy labels) in 0-based `epoch` (DESIGN.md section 1,
    steps 4 and 5), from the start epochs `derive` resolved (mopro.*_epoch or *_fraction); both
    false when MoPro is disabled."""
    proto, clean = d.proto_start_epoch, d.clean_start_epoch
    return proto is not None and epoch >= proto, clean is not None and epoch >= clean


def resolution_at(loader: LoaderConfig, epoch: int) -> int:
    """Side (px) of the training crops in 0-based `epoch`: `loader.resolution` throughout, or with
    `loader.min_resolution` set, progressive resizing as in ffcv-imagenet's `get_resolution`:
    min_resolution up to `ramp_start_epoch`, then linear in the epoch to `resolution` at
    `ramp_end_epoch` and after, rounded (half up) to a multiple of `resolution_step` and kept
    within [min_resolution, resolution]. Non-decreasing in the epoch."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    low, high = loader.min_resolution, loader.resolution
    if low is None or epoch >= loader.ramp_end_epoch:
        return high
    if epoch <= loader.ramp_start_epoch:
        return low
    t = (epoch - loader.ramp_start_epoch) / (loader.ramp_end_epoch - loader.ramp_start_epoch)
    step = loader.resolution_step
    side = math.floor((low + t * (high - low)) / step + 0.5) * step
    return min(max(side, low), high)
