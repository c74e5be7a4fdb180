"""Classifier re-training, cRT (DESIGN.md section 1, "After training"; paper arXiv 2009.07995,
section 4.1; the original code's classifier_retrain.py), settings in recipes/crt.yaml.

The encoder is frozen and stays in eval mode, so BatchNorm uses (and keeps) its running
statistics; only the classifier is trained, on the labels of `mopro-fast clean` (OOD samples
left out), by SGD with step decay and no weight decay. Sampling is class-balanced: every epoch
draws as many samples as the cleaned set holds, with replacement, a sample of class c with weight
n_c^-0.5 (`crt.balance_power`), which is what the original's per-epoch `repeat()` approximates.

A frozen encoder in eval mode makes the pooled feature h a pure function of the image view, so
the features are computed once, in the evaluation view (resize + centre crop), and the epochs run
over that cache: cRT costs one forward pass over the data instead of one per epoch. The original
instead draws a fresh random crop + flip per epoch; that augmentation is the one difference.
The features live on the training device in the autocast dtype (WebVision 1.0, ResNet-50, bf16:
2.4 M x 2048 x 2 bytes = 9.8 GB).

Single process: retrain refuses to start under torchrun with more than one rank.
Outputs in OUT (default RUN/crt): `crt.pt` (the input checkpoint with the new classifier, all
else bit-identical; `eval`, `clean` and `export` take it), `metrics.jsonl` (per-epoch loss,
accuracy, lr; top-1/top-5 before and after) and `summary.json`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mopro_fast.errors import MoproError
from mopro_fast.config import CrtConfig
from mopro_fast.after.trained import Trained

CKPT_NAME = "crt.pt"


class CrtError(MoproError, ValueError):
    """retrain cannot run on this input; one line."""


class _Head(nn.Module):
    """A classifier on cached features, shaped like the networks `evaluate` expects."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier(features.float()), features  # b x K, b x F


@torch.no_grad()
def extract_features(trained: Trained, split: str, progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features h of every sample of `split` in the eval view: (n x F, labels n, indices n)."""
    from mopro_fast.training import runtime
    from mopro_fast.data import backend_options, build_eval_loader, loader_spec

    cfg = trained.cfg
    loader = build_eval_loader(cfg.loader.backend, loader_spec(cfg, 0, 1, trained.device), split=split,
                               resolution=cfg.loader.eval_resolution, resize=cfg.loader.eval_resize,
                               options=backend_options(cfg, cfg.loader.backend))
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=f"features {split}", unit="batch", leave=False, dynamic_ncols=True)
    feats, labels, indices = [], [], []
    for batch in batches:
        with runtime.autocast(trained.device, cfg.run.precision):
            feats.append(trained.net.features(batch.image))  # b x F
        labels.append(batch.label)
        indices.append(batch.index)
    if not feats:
        raise CrtError(f"split {split!r} of {cfg.data.shards} has no samples")
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def targets_by_index(records: list[dict], num_listed: int, num_classes: int, source: str) -> Tensor:
    """Cleaned label by sample index (num_listed,), -1 where excluded (OOD or not in the file)."""
    target = torch.full((num_listed,), -1, dtype=torch.long)
    for r in records:
        index, label = r["index"], r["label"]
        if not 0 <= index < num_listed:
            raise CrtError(f"{source}: sample index {index} is outside the training split ({num_listed} listed): "
                           f"the labels belong to other shards")
        if label is not None:
            if not 0 <= label < num_classes:
                raise CrtError(f"{source}: label {label} of sample {index} is not one of the model's {num_classes} classes")
            target[index] = label
    return target


def balanced_weights(labels: Tensor, num_classes: int, power: float) -> Tensor:
    """Per-sample draw weight n_c^-power for the class c of each sample (n,) -> (n,)."""
    counts = torch.bincount(labels, minlength=num_classes).double()  # K
    return counts.clamp_min(1).pow(-power)[labels]  # n


def lr_at_epoch(c: CrtConfig, epoch: int) -> float:
    """Step schedule: lr (scaled to the batch) x gamma per milestone passed (0-based epochs)."""
    return c.lr * c.batch_size / c.base_batch * c.gamma ** sum(epoch >= m for m in c.milestones)


def train_classifier(classifier: nn.Linear, feats: Tensor, labels: Tensor, c: CrtConfig, log=None,
                     progress: bool = True) -> list[dict]:
    """cRT epochs over cached features (n x F) and labels (n); returns per-epoch records."""
    weights = balanced_weights(labels, classifier.out_features, c.balance_power).to(feats.device)  # n
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr_at_epoch(c, 0), momentum=c.momentum,
                                weight_decay=c.weight_decay)
    generator = torch.Generator(device=feats.device)
    n, history = labels.shape[0], []
    epochs = range(c.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="cRT", unit="epoch", leave=False, dynamic_ncols=True)
    for epoch in epochs:
        lr = lr_at_epoch(c, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator.manual_seed(c.seed * 1_000_003 + epoch)
        draws = torch.multinomial(weights, n, replacement=True, generator=generator)  # n sample positions
        sums = torch.zeros(3, dtype=torch.float64, device=feats.device)  # loss sum, correct, count
        for start in range(0, n, c.batch_size):
            pick = draws[start:start + c.batch_size]  # b
            logits = classifier(feats.index_select(0, pick).float())  # b x K
            target = labels.index_select(0, pick)  # b
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach().double() * pick.shape[0], (logits.argmax(1) == target).sum().double(),
                                 torch.tensor(pick.shape[0], dtype=torch.float64, device=feats.device)])
        loss_sum, correct, count = sums.tolist()  # one sync per epoch
        record = {"loss": loss_sum / count, "acc": 100.0 * correct / count, "lr": lr}
        history.append(record)
        if log is not None:
            log.write("crt", epoch, epoch, record)
    return history


def before_and_after(trained: Trained, classifier: nn.Linear, splits: list[str], progress: bool) -> dict:
    """Top-1/top-5 per split with the checkpoint's classifier and with the re-trained one (same features)."""
    from mopro_fast.data.batch import EvalBatch
    from mopro_fast.training.evaluate import evaluate

    results = {}
    for split in splits:
        feats, labels, index = extract_features(trained, split, progress)
        batches = [EvalBatch(feats[i:i + 1024], labels[i:i + 1024], index[i:i + 1024])
                   for i in range(0, labels.shape[0], 1024)]
        results[split] = {"before": evaluate(_Head(trained.net.classifier), batches),
                          "after": evaluate(_Head(classifier), batches)}
    return results


def retrain(checkpoint: Path, labels_path: Path, recipe_path: Path, out: Path | None = None,
            overrides: list[str] = (), progress: bool = True) -> dict:
    """cRT of a checkpoint's classifier on a clean output; writes OUT/crt.pt and returns the summary.

    Overrides `crt.key=value` change the cRT recipe; any other `section.key=value` changes the
    checkpoint's stored config (data.shards, loader.batch_size, run.device, ...), as in `eval`.
    """
    from mopro_fast.after.clean import read_labels, shards_fingerprint
    from mopro_fast.config import load_crt_config
    from mopro_fast.data.manifest import read_manifest
    from mopro_fast.safe_io import output_dir
    from mopro_fast.after.trained import load_trained, torch_bytes, write_outputs

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CrtError("retrain runs in one process (the features of the whole training set stay on one device); "
                       "start it without torchrun")
    start_time = time.perf_counter()
    recipe = load_crt_config(recipe_path, [o for o in overrides if o.startswith("crt.")])
    trained = load_trained(Path(checkpoint), [o for o in overrides if not o.startswith("crt.")])
    c, cfg, K = recipe.crt, trained.cfg, trained.num_classes
    shards, split = Path(cfg.data.shards), cfg.data.train_split
    manifest = read_manifest(shards)
    records, clean_summary = read_labels(Path(labels_path))
    if clean_summary is not None:
        if clean_summary.get("fingerprint") != shards_fingerprint(shards, split):
            raise CrtError(f"{labels_path}: these labels were made from other shards than {shards} "
                           f"(clean summary fingerprint differs); run clean on these shards or set data.shards=...")
        if clean_summary.get("num_classes") != K:
            raise CrtError(f"{labels_path}: labels for {clean_summary.get('num_classes')} classes, "
                           f"the checkpoint has {K}")
    target = targets_by_index(records, int(manifest.split(split)["num_listed"]), K, str(labels_path))
    out = output_dir(Path(out) if out is not None else Path(checkpoint).parent / "crt", "retrain --out")

    feats, _, index = extract_features(trained, split, progress)  # n x F, n
    covered = torch.zeros_like(target, dtype=torch.bool)
    covered[index.cpu()] = True
    stray = [r["index"] for r in records if not covered[r["index"]]]
    if stray:
        raise CrtError(f"{labels_path}: {len(stray)} labelled samples (e.g. index {stray[0]}) are not in split "
                       f"{split!r} of {shards}: the labels belong to other shards")
    labels = target.to(feats.device)[index]  # n, -1 = excluded
    use = labels >= 0
    feats, labels = feats[use], labels[use]  # m x F, m
    if labels.numel() == 0:
        raise CrtError(f"{labels_path}: no sample keeps a label (all OOD or none listed)")

    classifier = copy.deepcopy(trained.net.classifier).float()
    if c.init == "random":
        generator = torch.Generator().manual_seed(c.seed)
        with torch.no_grad():
            classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * 0.01)
            classifier.bias.zero_()
    classifier.requires_grad_(True).train()
    log = _Lines()  # metrics.jsonl, written with the other outputs at the end (a rerun starts a fresh log)
    history = train_classifier(classifier, feats, labels, c, log, progress)
    results = before_and_after(trained, classifier, [s for s in cfg.data.eval_splits if s in manifest.splits],
                               progress)
    log.write("eval", c.epochs, c.epochs - 1, {f"{s}/{when}/{k}": v for s, r in results.items()
                                              for when, m in r.items() for k, v in m.items() if k != "samples"})

    state = dict(trained.state)
    state["model"] = dict(state["model"])
    for name in ("weight", "bias"):
        old = state["model"][f"query.classifier.{name}"]
        state["model"][f"query.classifier.{name}"] = getattr(classifier, name).detach().to(old.device, old.dtype).clone()
    counts = torch.bincount(labels.cpu(), minlength=K).tolist()
    summary = {"checkpoint": str(checkpoint), "labels": str(labels_path), "out": str(out / CKPT_NAME),
               "samples": int(labels.numel()), "excluded": int((~use).sum()), "class_counts": counts,
               "recipe": recipe.to_dict()["crt"], "epochs": history, "eval": results,
               "seconds": time.perf_counter() - start_time}
    state["crt"] = {k: summary[k] for k in ("labels", "samples", "recipe", "eval")}
    write_outputs(out, {CKPT_NAME: torch_bytes(state), "metrics.jsonl": log.text().encode(),
                        "summary.json": (json.dumps(summary, indent=1) + "\n").encode()})
    return summary


class _Lines:
    """metrics.jsonl records in memory (RunLog's format), written atomically with the other outputs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, kind: str, step: int, epoch: int, values: dict) -> None:
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.lines.append(json.dumps({"kind": kind, "epoch": epoch, "step": step, **clean}))

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)
