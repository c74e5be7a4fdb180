"""Values derived once from a training config, the world size and the data set size.

    d = derive(cfg, world_size=8, num_train=2_400_000)   # global batch, scaled lr, steps, ...
    print(d.describe())

The per-step and per-epoch schedules that read `Derived` are in config/schedules.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mopro_fast.config.loading import ConfigError, validate
from mopro_fast.config.schema import Config, MoproConfig


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config, the world size and the data set size."""

    world_size: int  # ranks
    num_train: int  # training samples in the shards
    num_classes: int | None  # K: data.num_classes or the manifest's
    global_batch: int  # images per step over all ranks
    lr: float  # peak lr, scaled to the global batch
    steps_per_epoch: int  # the same on every rank
    epochs: int
    total_steps: int
    warmup_steps: int
    schedule: str  # "step" | "cosine" | "linear"
    milestone_steps: tuple[int, ...]  # step decay points, in steps
    gamma: float
    proto_start_epoch: int | None  # None: MoPro disabled; from mopro.proto_start_fraction when set
    clean_start_epoch: int | None  # None: MoPro disabled; from mopro.clean_start_fraction when set
    capped: bool  # steps_per_epoch limited by run.max_steps_per_epoch
    key_momentum: float  # key-encoder EMA factor per step (mopro.momentum, rescaled by momentum_batch)
    proto_momentum: float  # prototype EMA factor per sample (mopro.proto_momentum as it is)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One paragraph, printed once at the start of a run."""
        decay = (f"step decay x{self.gamma} at steps {', '.join(map(str, self.milestone_steps)) or 'none'}"
                 if self.schedule == "step" else f"{self.schedule} decay to 0")
        mopro = ("MoPro off: plain cross-entropy on the web labels" if self.proto_start_epoch is None else
                 f"MoPro: prototype loss from epoch {self.proto_start_epoch}, noise cleaning from epoch "
                 f"{self.clean_start_epoch} (epochs count from 0), key-encoder momentum {self.key_momentum:.6g} "
                 f"per step, prototype momentum {self.proto_momentum:g} per sample")
        return (f"{self.world_size} rank(s) x {self.global_batch // self.world_size} = global batch "
                f"{self.global_batch}; {self.num_train} training samples, {self.num_classes or '?'} classes -> "
                f"{self.steps_per_epoch} steps per epoch{' (capped)' if self.capped else ''} x {self.epochs} epochs "
                f"= {self.total_steps} steps; peak lr {self.lr:g} with {self.warmup_steps} warm-up steps, "
                f"{decay}. {mopro}.")


def derive(cfg: Config, world_size: int, num_train: int, *, manifest_classes: int | None = None) -> Derived:
    """Global batch, scaled lr, steps per epoch (num_train // global batch, at least 1, capped by
    run.max_steps_per_epoch), total and warm-up steps, MoPro start epochs and momenta, resolved num_classes."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    validate(cfg)
    global_batch = cfg.loader.batch_size * world_size
    if num_train < global_batch:
        raise ConfigError(f"loader.batch_size: global batch {global_batch} ({cfg.loader.batch_size} x "
                          f"{world_size} ranks) is more than the {num_train} training samples")
    classes = cfg.data.num_classes
    if classes is not None and manifest_classes is not None and classes != manifest_classes:
        raise ConfigError(f"data.num_classes: {classes}, but the shards have {manifest_classes} classes")
    natural = max(1, num_train // global_batch)
    cap = cfg.run.max_steps_per_epoch
    spe = min(natural, cap) if cap > 0 else natural
    s, m = cfg.schedule, cfg.mopro
    return Derived(
        world_size=world_size, num_train=num_train,
        num_classes=classes if classes is not None else manifest_classes,
        global_batch=global_batch, lr=cfg.optim.lr * global_batch / cfg.optim.base_batch,
        steps_per_epoch=spe, epochs=s.epochs, total_steps=spe * s.epochs,
        warmup_steps=round(s.warmup_epochs * spe), schedule=s.kind,
        milestone_steps=tuple(e * spe for e in s.milestones) if s.kind == "step" else (), gamma=s.gamma,
        proto_start_epoch=start_epoch(m.proto_start_epoch, m.proto_start_fraction, s.epochs) if m.enabled else None,
        clean_start_epoch=start_epoch(m.start_clean_epoch, m.clean_start_fraction, s.epochs) if m.enabled else None,
        capped=spe < natural, key_momentum=key_momentum(m, global_batch), proto_momentum=m.proto_momentum)


def start_epoch(epoch: int, fraction: float | None, epochs: int) -> int:
    """A MoPro start epoch: `fraction` of the run's `epochs`, rounded half up, when set (it wins), else
    `epoch`. Paper: 1/90 (prototype loss) and 11/90 (cleaning) of 90 epochs = epochs 1 and 11."""
    return epoch if fraction is None else math.floor(fraction * epochs + 0.5)


def key_momentum(m: MoproConfig, global_batch: int) -> float:
    """The key encoder's EMA factor per step: `m.momentum`, or with `m.momentum_batch` set
    momentum ** (global_batch / momentum_batch): a step over k times the images decays the old
    weights as much as k steps of momentum_batch would (MoCo's m = 0.999 is given for 256 images).
    The prototypes need no such rescaling: their m_p is applied once per sample (core/prototypes.py)."""
    return m.momentum if m.momentum_batch is None else m.momentum ** (global_batch / m.momentum_batch)
