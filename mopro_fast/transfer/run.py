"""`mopro-fast transfer svm|knn`: the checkpoint's encoder, a random one and an optional reference through
the same protocol (svm.py, knn.py) on the same cached features (features.py); one JSON report in OUT
(default: CKPT's folder / transfer) and a printed table.

OUT holds only what these commands write: `features/*.npz` (the caches) and `svm-<dataset>.json` /
`knn.json`; nothing outside OUT is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mopro_fast.transfer import knn, svm
from mopro_fast.transfer.datasets import (Listing, TransferError, is_voc, read_image_folder, read_places,
                                          read_voc)
from mopro_fast.transfer.features import FeatureCache, checkpoint_encoder, random_encoder, reference_encoder

DATASETS = ("voc07", "places205")


def _setup(checkpoint: Path, out: Path | None, reference: Path | None, overrides: list[str]):
    from mopro_fast.safe_io import output_dir

    encoder, trained = checkpoint_encoder(Path(checkpoint), overrides)
    out = output_dir(Path(out) if out is not None else Path(checkpoint).parent / "transfer", "--out")
    encoders = [encoder, random_encoder(trained.cfg, trained.device)]
    if reference is not None:
        encoders.append(reference_encoder(Path(reference), trained.cfg, trained.device))
    return trained, out, encoders


def _view(cfg) -> dict:
    return {"resize": cfg.loader.eval_resize, "crop": cfg.loader.eval_resolution, "precision": cfg.run.precision}


def _write(out: Path, name: str, report: dict) -> Path:
    from mopro_fast.safe_io import atomic_write_text

    path = out / name
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    return path


def run_svm(checkpoint: Path, dataset: str, root: Path, out: Path | None = None, shots=svm.SHOTS,
            draws: int = svm.DRAWS, reference: Path | None = None, overrides: list[str] = (), batch_size: int = 128,
            workers: int = 4, seed: int = 0) -> dict:
    """The low-shot SVM protocol on VOC07 (trainval -> test) or Places205 (train -> val); returns the report."""
    if dataset not in DATASETS:
        raise TransferError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    svm.linear_svc()  # one line before anything else when scikit-learn is missing
    start = time.perf_counter()
    if dataset == "voc07":
        train, test = read_voc(root, "trainval"), read_voc(root, "test")
    else:
        train, test = read_places(root, "train"), read_places(root, "val")
    trained, out, encoders = _setup(checkpoint, out, reference, overrides)
    cache = lambda e, listing: FeatureCache(out / "features", e, listing, trained.cfg, trained.device,  # noqa: E731
                                            batch_size, workers)
    results = {e.name: {"source": e.source, **svm.evaluate(train, test, cache(e, train), cache(e, test), shots,
                                                           draws, seed)} for e in encoders}
    report = {"command": "transfer svm", "dataset": dataset, "root": str(root), "checkpoint": str(checkpoint),
              "metric": svm.PUBLISHED[dataset]["metric"], "shots": list(shots), "draws": draws, "seed": seed,
              "classes": len(train.classes), "images": {"train": len(train), "test": len(test)},
              "view": _view(trained.cfg), "cost": svm.COST, "encoders": results,
              "published": {"shots": list(svm.SHOTS), **svm.PUBLISHED[dataset]},
              "seconds": round(time.perf_counter() - start, 2)}
    report["report"] = str(_write(out, f"svm-{dataset}.json", report))
    return report


def _knn_pair(train_dir: Path, val_dir: Path) -> tuple[Listing, Listing]:
    if is_voc(train_dir):
        return read_voc(train_dir, "trainval"), read_voc(val_dir, "test")
    train = read_image_folder(train_dir, name=f"folder-{Path(train_dir).name}")
    return train, read_image_folder(val_dir, train.classes, name=f"folder-{Path(val_dir).name}")


def run_knn(checkpoint: Path, train_dir: Path, val_dir: Path, out: Path | None = None, k: int = knn.K,
            temperature: float = knn.TEMPERATURE, reference: Path | None = None, overrides: list[str] = (),
            batch_size: int = 128, workers: int = 4) -> dict:
    """Weighted cosine kNN from the --train folder to the --val folder (ImageFolder, or VOC trainval -> test)."""
    start = time.perf_counter()
    train, val = _knn_pair(Path(train_dir), Path(val_dir))
    trained, out, encoders = _setup(checkpoint, out, reference, overrides)
    results = {}
    for e in encoders:
        caches = [FeatureCache(out / "features", e, s, trained.cfg, trained.device, batch_size, workers)
                  for s in (train, val)]
        (train_x, train_ok), (val_x, val_ok) = (c.get(np.arange(len(s))) for c, s in zip(caches, (train, val)))
        if not train_ok.any() or not val_ok.any():
            raise TransferError(f"no readable image in {train.root if not train_ok.any() else val.root}")
        scores = knn.knn_scores(train_x, train.labels[train_ok], val_x, len(train.classes), k, temperature)
        results[e.name] = {"source": e.source, **knn.knn_metrics(scores, val.labels[val_ok]),
                           "bad_files": {"train": caches[0].bad_paths(), "val": caches[1].bad_paths()}}
    report = {"command": "transfer knn", "train": str(train_dir), "val": str(val_dir), "checkpoint": str(checkpoint),
              "k": k, "temperature": temperature, "classes": len(train.classes),
              "images": {"train": len(train), "val": len(val)}, "view": _view(trained.cfg), "encoders": results,
              "seconds": round(time.perf_counter() - start, 2)}
    report["report"] = str(_write(out, "knn.json", report))
    return report


def svm_table(report: dict) -> str:
    """k rows, one column per encoder (mean +- std over the draws), and the published figures."""
    names = list(report["encoders"])
    published = dict(zip(report["published"]["shots"], report["published"]["mopro_webvision_v1_rn50"]))
    head = f"{report['dataset']} {report['metric']} (%)"
    lines = [f"{head:<22}" + "".join(f"{n:>16}" for n in names) + f"{'paper (RN-50)':>16}"]
    for k in report["shots"]:
        runs = [report["encoders"][n]["per_k"][str(k)] for n in names]
        cells = "".join(f"{r['mean']:>9.1f} +-{r['std']:>4.1f}" for r in runs)
        lines.append(f"{'k = ' + str(k):<22}{cells}{published.get(k, float('nan')):>16.1f}")
    return "\n".join(lines)


def knn_table(report: dict) -> str:
    metrics = [m for m in ("top1", "top5", "mAP") if m in next(iter(report["encoders"].values()))]
    lines = [f"{'kNN k=' + str(report['k']):<14}" + "".join(f"{m:>10}" for m in metrics)]
    for name, r in report["encoders"].items():
        lines.append(f"{name:<14}" + "".join(f"{r[m]:>10.1f}" for m in metrics))
    return "\n".join(lines)
