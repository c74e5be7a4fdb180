"""`mopro-fast finetune CKPT RECIPE`: fine-tune the whole network on a fraction of ImageNet's labels
(paper arXiv 2009.07995, section 4.3, table 4: 71.2 / 74.8 % top-1 on 1 % / 10 % with the WebVision-V1
ResNet-50; the original code's `finetune_imagenet.py`), by the trainer itself.

The protocol: the query network of the MoPro checkpoint (encoder, and its classifier as the head when the
folder's classes are the checkpoint's, else a fresh head), a seeded random `finetune.fraction` of the ImageNet
train folder (the original shuffles all training images and keeps the first fraction x N), SGD lr 0.005 for
a batch of 256, momentum 0.9, no weight decay, 40 epochs, lr x 0.2 at epochs 20 and 30, plain cross-entropy
(`mopro.enabled: false`), top-1 / top-5 on the val folder (recipes/finetune_in1k_1pct.yaml).

How it reuses the trainer (no second loop): the recipe is a training recipe (typed, strict keys, dotted
overrides; `config.schema`) plus a `finetune` section; the model section is the checkpoint's. Then
1. the subset is drawn once and written to RUN/subset.txt (a header with fraction, seed, folder and the
   number of images, then `<path> <label>` lines); a resumed run reads it back (and refuses a recipe
   whose fraction, seed or folder differ), so the same images are used;
2. the subset and the val folder are converted by `mopro-fast convert`'s own converter into RUN/data
   (shards + manifest; a killed conversion resumes; bad files are counted and skipped as everywhere);
3. the run starts from the checkpoint's weights (`train --init`): all of them when its classifier is kept,
   else from RUN/init.pt, the checkpoint without its classifiers and class prototypes;
4. `mopro_fast.training.train.train` runs it: its loop, logs, checkpoints, `--resume auto`, SIGINT/SIGTERM
   saves, evaluation per epoch; RUN/finetune.json adds the subset and the head to its summary.
Differences from the original: the trainer's weak view (RandomResizedCrop scale 0.2-1, flip) instead of
scale 0.08-1; images stored by the converter with the shorter side at most `finetune.max_side` (256).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from mopro_fast.config.schema import Config, spec
from mopro_fast.errors import MoproError
from mopro_fast.transfer.datasets import Listing, read_image_folder

SUBSET, INIT, DATA, REPORT = "subset.txt", "init.pt", "data", "finetune.json"


class FinetuneError(MoproError, ValueError):
    """finetune cannot run as asked; one line."""


@dataclass
class FinetuneConfig:
    """What only `mopro-fast finetune` reads (the rest of its recipe is a training recipe)."""

    root: str = MISSING
    """ImageNet folder: `train_dir` and `val_dir` under it, one sub-folder per wnid."""
    train_dir: str = "train"
    """Training images, one folder per class."""
    val_dir: str = "val"
    """Evaluation images, one folder per class (a subset of the training classes)."""
    fraction: float = spec(0.01, gt=0, le=1)
    """Share of the training images used (the paper: 0.01 and 0.1), drawn at random with `seed`."""
    seed: int = spec(0, ge=0)
    """Seed of the subset draw."""
    head: str = "auto"
    """auto: keep the checkpoint's classifier when the folder's classes are its training classes (same wnids,
    from the checkpoint's manifest), else a fresh one; keep / fresh: as said (keep needs the same class count)."""
    max_side: int = spec(256, ge=16)
    """The converter's max_side: images are stored with the shorter side at most this (px)."""


@dataclass
class FinetuneRecipe(Config):
    """A training recipe plus the `finetune` section."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def load_recipe(recipe: Path, overrides: list[str], model: dict, fraction: float | None,
                root: Path | None) -> tuple[Config, FinetuneConfig]:
    """The recipe, the checkpoint's model section, `--fraction` / `--root`, then the overrides; checked."""
    from mopro_fast.config.loading import load_config, validate

    values = [({"model": model, "data": {"shards": "(set by finetune)"}}, "from the checkpoint")]
    given = {k: v for k, v in (("fraction", fraction), ("root", None if root is None else str(root))) if v is not None}
    if given:
        values.append(({"finetune": given}, "from the command line"))
    both = load_config(recipe, overrides, root=FinetuneRecipe, values=values)
    ft = both.finetune
    if ft.head not in ("auto", "keep", "fresh"):
        raise FinetuneError(f"finetune.head must be one of auto, keep, fresh, got {ft.head!r}")
    cfg = Config(**{f.name: getattr(both, f.name) for f in dataclasses.fields(Config)})
    cfg.data.shards = str(Path(cfg.run.out) / DATA)
    validate(cfg)
    if cfg.mopro.enabled:
        raise FinetuneError(f"{recipe}: fine-tuning trains with cross-entropy; set mopro.enabled: false")
    return cfg, ft


# ---------------------------------------------------------------------------------------- subset

def draw_subset(train: Listing, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of max(1, floor(fraction x n)) training images, drawn with `seed`."""
    keep = max(1, int(fraction * len(train)))
    return np.sort(np.random.default_rng(seed).permutation(len(train))[:keep])


def _header(ft: FinetuneConfig, train: Listing, keep: int) -> dict:
    return {"fraction": ft.fraction, "seed": ft.seed, "folder": str(Path(train.root).resolve()),
            "images": len(train), "kept": keep}


def write_subset(path: Path, ft: FinetuneConfig, train: Listing, picked: np.ndarray) -> None:
    from mopro_fast.safe_io import atomic_write_text

    lines = [f"# mopro-fast finetune subset {json.dumps(_header(ft, train, len(picked)), sort_keys=True)}\n"]
    lines += [f"{train.paths[i]} {train.labels[i]}\n" for i in picked]
    atomic_write_text(path, "".join(lines))


def read_subset(path: Path, ft: FinetuneConfig, train: Listing) -> np.ndarray:
    """The indices listed in RUN/subset.txt; a file drawn for another fraction, seed or folder is refused."""
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0].split("subset", 1)[1])
    except (IndexError, ValueError):
        raise FinetuneError(f"{path}: not a finetune subset file (bad header); remove it or use another run.out")
    wanted = _header(ft, train, header.get("kept"))
    differ = [f"{k} {header.get(k)} -> {v}" for k, v in wanted.items() if header.get(k) != v]
    if differ:
        raise FinetuneError(f"{path} was drawn for another subset ({', '.join(differ)}); resume with the recipe "
                            f"it was made with, or start a new run in another run.out")
    where = {p: i for i, p in enumerate(train.paths)}
    listed = [line.rsplit(" ", 1)[0] for line in lines[1:] if line]
    missing = [p for p in listed if p not in where]
    if missing:
        raise FinetuneError(f"{path}: {missing[0]} is no longer in {train.root} ({len(missing)} missing)")
    return np.array([where[p] for p in listed], dtype=np.int64)


# ------------------------------------------------------------------------------------- classes

def class_order(ckpt_cfg: Config, folder: Path, head: str, num_classes: int) -> tuple[list[str] | None, bool]:
    """(class order, keep the classifier?): the checkpoint's manifest order when its wnids are the folder's."""
    found = sorted(d.name for d in Path(folder).iterdir() if d.is_dir()) if Path(folder).is_dir() else []
    try:  # the classes the checkpoint was trained on, in class-id order, from its shards' manifest
        listed = json.loads((Path(ckpt_cfg.data.shards) / "manifest.json").read_text()).get("classes") or []
        theirs = [c.get("wnid") for c in sorted(listed, key=lambda c: c.get("id", 0))]
    except (OSError, ValueError, AttributeError):
        theirs = []
    same = bool(found) and sorted(theirs) == found
    if head == "keep" and not same and len(found) != num_classes:
        raise FinetuneError(f"finetune.head=keep: {folder} has {len(found)} classes, the checkpoint's classifier "
                            f"{num_classes}; use head auto or fresh")
    return (theirs if same else None), (head == "keep" or (head == "auto" and same))


def _splits(train: Listing, val: Listing, picked: np.ndarray):
    from data_tools.webvision import Synset, make_split

    synsets = [Synset(c, c) for c in train.classes]
    splits = {"train": make_split("train", train.root, [(train.paths[i], int(train.labels[i]), "imagenet")
                                                        for i in picked]),
              "val": make_split("val", val.root, [(p, int(y), "imagenet") for p, y in zip(val.paths, val.labels)])}
    return splits, synsets


def _init_state(trained, keep_head: bool) -> dict:
    """The checkpoint's weights that start the run: all of them, or all but the classifiers (and the class
    prototypes, which belong to its classes) for a fresh head."""
    drop = () if keep_head else ("query.classifier.", "key.classifier.", "prototypes.")
    model = {k: v for k, v in trained.state["model"].items() if not (drop and k.startswith(drop))}
    return {"model": model, "optimizer": None, "epoch": 0, "step_in_epoch": 0, "global_step": 0,
            "config": trained.state["config"], "finetune_from": str(trained.path)}


def _prepare(trained, cfg: Config, ft: FinetuneConfig, order: list[str] | None, keep_head: bool,
             resume: str | None, overwrite_run: bool, workers: int | None) -> dict:
    """Rank 0's part: check run.out, draw (or reuse) the subset, convert it, write init.pt; returns the
    subset's facts for the report."""
    from data_tools.convert import ConvertSettings, convert
    from mopro_fast.after.trained import torch_bytes
    from mopro_fast.safe_io import atomic_write_bytes
    from mopro_fast.training.runfolder import RunFolder

    run = Path(cfg.run.out)
    folder = RunFolder(run).claim()  # checks run.out before anything is written into it
    try:
        if resume is None and not overwrite_run:
            if (run / SUBSET).exists():
                raise FinetuneError(f"{run} holds a fine-tune run ({SUBSET}); continue it with --resume auto, or "
                                    f"use another run.out or --overwrite-run")
            folder.refuse_new_run_over_old()
    finally:
        folder.release()
    base = Path(ft.root)
    train_list = read_image_folder(base / ft.train_dir, order, name="train")
    val_list = read_image_folder(base / ft.val_dir, train_list.classes, name="val")
    subset = run / SUBSET
    if resume is not None and subset.is_file():
        picked = read_subset(subset, ft, train_list)
        print(f"subset: reusing {subset} ({len(picked)} of {len(train_list)} images)", flush=True)
    else:
        picked = draw_subset(train_list, ft.fraction, ft.seed)
        write_subset(subset, ft, train_list, picked)
        print(f"subset: {len(picked)} of {len(train_list)} images (fraction {ft.fraction}, seed {ft.seed}) -> "
              f"{subset}", flush=True)
    manifest = convert(base, run / DATA, ConvertSettings(max_side=ft.max_side, seed=cfg.run.seed, shard_size=1000),
                       workers=workers, progress=False, listing=lambda: _splits(train_list, val_list, picked))
    if not keep_head:
        atomic_write_bytes(run / INIT, torch_bytes(_init_state(trained, keep_head)))
    return {"subset": str(subset), "train_images": int(len(picked)), "listed_images": len(train_list),
            "classes": len(train_list.classes), "head": "checkpoint's classifier" if keep_head else "fresh",
            "rejected": {s: v.get("num_rejected", 0) for s, v in manifest["splits"].items()}}


def finetune(checkpoint: Path, recipe: Path, overrides: list[str] = (), fraction: float | None = None,
             root: Path | None = None, resume: str | None = None, overwrite_run: bool = False,
             progress: bool = True, workers: int | None = None) -> dict:
    """Draw (or reuse) the subset, convert it, and train from the checkpoint; returns RUN/finetune.json's content.

    Under torchrun, rank 0 prepares (subset, shards, init.pt) while the others wait; a refusal stops every
    rank with the same line; then every rank trains."""
    import torch

    from mopro_fast import dist
    from mopro_fast.after.trained import load_trained
    from mopro_fast.safe_io import atomic_write_text
    from mopro_fast.training.train import train

    trained = load_trained(Path(checkpoint), device=torch.device("cpu"))  # its weights and config only
    cfg, ft = load_recipe(Path(recipe), list(overrides), trained.state["config"]["model"], fraction, root)
    run = Path(cfg.run.out)
    dist.init_from_env()
    facts, error = None, None
    try:  # on every rank (read-only): which classes, which head, so every rank starts from the same weights
        order, keep_head = class_order(trained.cfg, Path(ft.root) / ft.train_dir, ft.head, trained.num_classes)
    except MoproError as exc:
        order, keep_head, error = None, False, exc
    if dist.is_main() and error is None:
        try:
            facts = _prepare(trained, cfg, ft, order, keep_head, resume, overwrite_run, workers)
        except MoproError as exc:
            error = exc
    message = dist.broadcast_error(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise FinetuneError(message)
    init = Path(checkpoint) if keep_head else run / INIT  # all its tensors, or all but the classifiers
    summary = train(cfg, resume=resume, progress=progress, init=str(init), overwrite_run=overwrite_run)
    if "finished" in summary or not dist.is_main():
        return summary
    report = {"command": "finetune", "checkpoint": str(checkpoint), "recipe": str(recipe), "root": ft.root,
              "fraction": ft.fraction, "seed": ft.seed, **facts, "eval": summary.get("eval"),
              "epochs": cfg.schedule.epochs, "seconds": summary.get("seconds"), "run_dir": str(run)}
    atomic_write_text(run / REPORT, json.dumps(report, indent=1) + "\n")
    return report
