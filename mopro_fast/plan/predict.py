"""The time model of `mopro-fast plan`: a recipe's schedule and measured throughput -> wall time.

Training epoch e trains at side r = `resolution_at(cfg.loader, e)` (config/schedules.py) on
`steps_per_epoch x global batch` images (config/derive.py: the last partial batch is dropped);
the epochs of one side form a phase, timed at

    img/s over all GPUs = img/s per GPU at r (throughput.py) x gpus x scaling efficiency.

Evaluation follows every `run.eval_every`-th epoch and the last, as the trainer's loop does,
over the eval splits' images at `loader.eval_resolution`, at `eval_factor` x the training img/s
per GPU at that side (forward only, one view, no optimiser), over the same GPUs and efficiency.
A checkpoint costs `ckpt_seconds`: one at every epoch's end, plus the saves inside an epoch that
`run.ckpt_every_steps` or `run.ckpt_every_minutes` ask for (whichever asks for more; the trainer
resets the minute timer at every save, so this is close, not exact). Not counted: process
launch, loader start-up, cudnn autotuning, `torch.compile`, a cold page cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mopro_fast.config import Config, derive, resolution_at
from mopro_fast.plan.throughput import Figures, PlanError

WEBVISION_TRAIN = 2_439_574  # WebVision 1.0 training images (Google + Flickr; Li et al. 2017, arXiv 1708.02862)
SPLIT_IMAGES = {"val": 50_000,  # WebVision 1.0 validation: 50 per class
                "imagenet-val": 50_000}  # ILSVRC 2012 validation: 50 per class


@dataclass(frozen=True)
class Setup:
    """What the recipe does not say: the machine and the costs outside the training step."""

    gpus: int
    scaling: float | None = None  # efficiency of the data-parallel run; None: 0.9 with several GPUs, 1 with one
    train_images: int | None = None  # None: WEBVISION_TRAIN
    val_images: int | None = None  # per evaluation, all splits; None: SPLIT_IMAGES of data.eval_splits
    eval_factor: float = 3.0  # evaluation img/s per GPU / training img/s per GPU at the same side
    ckpt_seconds: float = 10.0  # seconds one checkpoint save takes

    @property
    def efficiency(self) -> float:
        return self.scaling if self.scaling is not None else (0.9 if self.gpus > 1 else 1.0)

    def check(self) -> None:
        """PlanError naming the `mopro-fast plan` option of the first impossible value."""
        problems = [
            ("--gpus", self.gpus, self.gpus >= 1, "an integer >= 1"),
            ("--scaling", self.scaling, self.scaling is None or 0 < self.scaling <= 1, "in (0, 1]"),
            ("--train-images", self.train_images, self.train_images is None or self.train_images >= 1,
             "an integer >= 1"),
            ("--val-images", self.val_images, self.val_images is None or self.val_images >= 0, "an integer >= 0"),
            ("--eval-factor", self.eval_factor, math.isfinite(self.eval_factor) and self.eval_factor > 0, "> 0"),
            ("--ckpt-seconds", self.ckpt_seconds, math.isfinite(self.ckpt_seconds) and self.ckpt_seconds >= 0,
             ">= 0"),
        ]
        for option, value, ok, want in problems:
            if not ok:
                raise PlanError(f"{option} {value}: must be {want}")


@dataclass(frozen=True)
class Phase:
    """One row of the plan."""

    kind: str  # "train" | "eval" | "checkpoints"
    label: str  # "train 160 px, epochs 0-26", "evaluation at 224 px", "checkpoints"
    count: int  # epochs (train), evaluations (eval), saves (checkpoints)
    images: int  # images processed (0 for checkpoints)
    img_s: float | None  # over all GPUs (None for checkpoints)
    seconds: float
    res: int | None = None  # crop side (train, eval)
    epochs: tuple[int, int] | None = None  # first and last epoch (train)


@dataclass(frozen=True)
class Plan:
    recipe: str
    gpus: int
    phases: tuple[Phase, ...]
    assumptions: tuple[str, ...] = field(default=())

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`mopro-fast plan --json`)."""
        phases = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()} for p in self.phases]
        for p in phases:
            p["minutes"] = round(p["seconds"] / 60, 2)
        return {"recipe": self.recipe, "gpus": self.gpus, "phases": phases,
                "total_seconds": round(self.total_seconds, 1), "total_minutes": round(self.total_seconds / 60, 2),
                "total_hours": round(self.total_seconds / 3600, 3), "assumptions": list(self.assumptions)}

    def table(self) -> str:
        """The breakdown as text: one row per phase, the total, then the assumptions."""
        head = ("phase", "count", "images", f"img/s ({self.gpus} GPU{'s' if self.gpus > 1 else ''})", "seconds",
                "minutes")
        unit = {"train": "epochs", "eval": "evals", "checkpoints": "saves"}
        rows = [(p.label, f"{p.count} {unit[p.kind]}", f"{p.images:,}" if p.images else "-",
                 f"{p.img_s:,.0f}" if p.img_s else "-", f"{p.seconds:,.0f}", f"{p.seconds / 60:.1f}")
                for p in self.phases]
        total = self.total_seconds
        rows.append(("total", "", "", "", f"{total:,.0f}", f"{total / 60:.1f}"))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows]]
        return "\n".join([f"plan: {self.recipe} on {self.gpus} GPU{'s' if self.gpus > 1 else ''}: "
                          f"{total / 60:.1f} min ({total / 3600:.2f} h)", "", *lines, "", "assumptions:",
                          *(f"  - {a}" for a in self.assumptions)])


def _val_images(cfg: Config, setup: Setup) -> tuple[int, str]:
    """(images per evaluation, where the number comes from)."""
    splits = cfg.data.eval_splits
    if setup.val_images is not None:
        return setup.val_images, f"{setup.val_images:,} images (--val-images)"
    unknown = [s for s in splits if s not in SPLIT_IMAGES]
    if unknown:
        raise PlanError(f"data.eval_splits: the size of split {unknown[0]!r} is not known here; give --val-images N "
                        f"(images per evaluation, all splits together)")
    known = {"val": "WebVision 1.0 val", "imagenet-val": "ILSVRC 2012 val"}
    parts = " + ".join(f"{s} {SPLIT_IMAGES[s]:,} ({known[s]})" for s in splits)
    total = sum(SPLIT_IMAGES[s] for s in splits)
    return total, f"{total:,} images" + (f" = {parts}" if len(splits) > 1 else f" ({parts})")


def _mid_epoch_saves(cfg: Config, steps_per_epoch: int, epoch: int, epoch_seconds: float) -> int:
    """Checkpoints inside `epoch`, before its end (module docstring)."""
    every, by_steps = cfg.run.ckpt_every_steps, 0
    if every:
        first, last = epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch - 1  # the epoch's end saves anyway
        by_steps = max(0, last // every - (first - 1) // every)
    period = cfg.run.ckpt_every_minutes * 60
    by_time = max(0, math.ceil(epoch_seconds / period) - 1) if period > 0 else 0
    return max(by_steps, by_time)


def _figures_line(figures: Figures) -> str:
    """Which figures the plan uses, and how it fills in the other sides."""
    measured = ", ".join(f"{f.img_s:,.1f} at {f.res} px ({f.source})" for f in figures.items)
    line = f"training img/s per GPU: {measured}"
    if figures.origin.startswith("--"):
        line += ", given at the recipe's loader.resolution"
    else:
        line += f", from {figures.origin}"
    return line + "; other sides from the nearest measured one scaled by pixels, img/s x (measured / side)^2"


def _measured_line(figures: Figures, cfg: Config) -> str | None:
    """What the report's figures were measured with, next to what the recipe trains with."""
    batches = sorted({f.batch for f in figures.items if f.batch})
    precisions = sorted({f.precision for f in figures.items if f.precision})
    if not batches and not precisions:
        return None
    width = f", width {cfg.model.width} (figures: 64)" if cfg.model.width != 64 else ""
    return (f"figures measured with batch {'/'.join(map(str, batches)) or '?'} per GPU, "
            f"{'/'.join(precisions) or '?'}; the recipe trains {cfg.model.arch}{width} with batch "
            f"{cfg.loader.batch_size} per GPU, {cfg.run.precision} (throughput depends on both)")


def predict(cfg: Config, figures: Figures, setup: Setup, recipe: str = "recipe") -> Plan:
    """The plan of training `cfg` on `setup.gpus` GPUs at the throughput of `figures` (module docstring)."""
    setup.check()
    eff, gpus = setup.efficiency, setup.gpus
    train_images = setup.train_images if setup.train_images is not None else WEBVISION_TRAIN
    d = derive(cfg, world_size=gpus, num_train=train_images)
    per_epoch = d.steps_per_epoch * d.global_batch
    sides = [resolution_at(cfg.loader, e) for e in range(d.epochs)]  # non-decreasing in the epoch
    phases: list[Phase] = []
    saves = 0
    for res in sorted(set(sides)):
        epochs = [e for e, s in enumerate(sides) if s == res]
        rate = figures.at(res) * gpus * eff
        epoch_seconds = per_epoch / rate
        saves += sum(1 + _mid_epoch_saves(cfg, d.steps_per_epoch, e, epoch_seconds) for e in epochs)
        phases.append(Phase("train", f"train {res} px, epochs {epochs[0]}-{epochs[-1]}", len(epochs),
                            len(epochs) * per_epoch, rate, len(epochs) * epoch_seconds, res, (epochs[0], epochs[-1])))
    val, val_source = _val_images(cfg, setup)
    every = cfg.run.eval_every
    evals = sum(1 for e in range(d.epochs) if (e + 1) % every == 0 or e + 1 == d.epochs) if cfg.data.eval_splits else 0
    eval_res = cfg.loader.eval_resolution
    eval_rate = figures.at(eval_res) * setup.eval_factor * gpus * eff
    if evals and val:
        phases.append(Phase("eval", f"evaluation at {eval_res} px", evals, evals * val, eval_rate,
                            evals * val / eval_rate, eval_res))
    phases.append(Phase("checkpoints", "checkpoints", saves, 0, None, saves * setup.ckpt_seconds))
    dropped = "capped by run.max_steps_per_epoch" if d.capped else "the last partial batch is dropped"
    source = "--train-images" if setup.train_images is not None else "WebVision 1.0 train, the default"
    assumptions = [
        _figures_line(figures),
        _measured_line(figures, cfg),
        f"{gpus} GPU{'s' if gpus > 1 else ''} at scaling efficiency {eff:g}"
        f"{'' if setup.scaling is not None else ' (the default for ' + ('several GPUs' if gpus > 1 else 'one') + ')'}:"
        f" img/s over all GPUs = per GPU x {gpus} x {eff:g}",
        f"training images: {train_images:,} ({source}) -> {d.steps_per_epoch:,} steps of {d.global_batch:,} = "
        f"{per_epoch:,} images per epoch ({dropped}), {d.epochs} epochs",
        f"evaluation: {val_source}, after {'every epoch' if every == 1 else f'every {every} epochs and the last'}, "
        f"at {setup.eval_factor:g}x the training img/s per GPU at {eval_res} px (forward only; --eval-factor)"
        if cfg.data.eval_splits else "evaluation: none (data.eval_splits is empty)",
        f"checkpoints: {setup.ckpt_seconds:g} s each (--ckpt-seconds), one per epoch"
        + (" plus those run.ckpt_every_steps / run.ckpt_every_minutes add inside epochs"
           if saves > d.epochs else ""),
        "not counted: process launch, loader start-up, cudnn autotuning, torch.compile, a cold page cache",
    ]
    return Plan(recipe, gpus, tuple(phases), tuple(a for a in assumptions if a))
