"""Readers of the transfer data sets' layouts: image paths and labels, no image opened.

- VOC2007 (`read_voc`): ROOT holds `JPEGImages/` and `ImageSets/Main/` (or ROOT/VOCdevkit/VOC2007 does);
  the classes are the `<class>_trainval.txt` files there (sorted: the 20 VOC classes in the original's
  order), each line `<image id> <1|0|-1>`; the images of a split are those of `<class>_<split>.txt`.
  Labels are kept as 1 / 0 / -1 (n x C); 0 (difficult) is a negative for the SVMs and the AP, as in the
  original code (see ap.py).
- Places205 (`read_places`): `ROOT/trainvalsplit_places205/{train,val}_places205.csv` with
  `<relative path> <label>` lines, images under `ROOT/data/vision/torralba/deeplearning/images256/`
  (the original code's layout); the class count is the largest label + 1 (205 for Places205).
- ImageFolder (`read_image_folder`): one sub-folder per class (ImageNet train and val: one per wnid).

A missing folder or list, or a malformed line, is a `TransferError` (one line: where, what, what to do).
Unreadable images are found when the features are computed (features.py): counted and skipped there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mopro_fast.errors import MoproError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
PLACES_LISTS = "trainvalsplit_places205"
PLACES_IMAGES = Path("data/vision/torralba/deeplearning/images256")


class TransferError(MoproError, ValueError):
    """A transfer evaluation cannot run on this input; one line."""


@dataclass
class Listing:
    """The images of one split: `root / paths[i]` with label `labels[i]` (n,) or label row (n x C)."""

    name: str  # e.g. "voc07/trainval"
    root: Path
    paths: list[str]
    labels: np.ndarray  # n int64 class ids, or n x C int8 in {1, 0, -1} (multi-label)
    classes: list[str]

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.paths)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise TransferError(f"{path}: not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TransferError(f"{path}: cannot read it as text ({exc})") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def voc_base(root: Path) -> Path:
    """The folder that holds JPEGImages/ and ImageSets/Main/ (ROOT or ROOT/VOCdevkit/VOC2007)."""
    for base in (Path(root), Path(root) / "VOCdevkit" / "VOC2007"):
        if (base / "JPEGImages").is_dir() and (base / "ImageSets" / "Main").is_dir():
            return base
    raise TransferError(f"{root}: not a VOC2007 folder (no JPEGImages/ and ImageSets/Main/ in it or in "
                        f"VOCdevkit/VOC2007/); pass the folder that holds them")


def read_voc(root: Path, split: str) -> Listing:
    """A VOC2007 split (`trainval` or `test`): image paths and their n x C label rows in {1, 0, -1}."""
    base = voc_base(root)
    main = base / "ImageSets" / "Main"
    classes = sorted(p.name[: -len("_trainval.txt")] for p in main.glob("*_trainval.txt"))
    if not classes:
        raise TransferError(f"{main}: no <class>_trainval.txt files; is this VOC2007 with its ImageSets?")
    rows: dict[str, np.ndarray] = {}
    for c, name in enumerate(classes):
        path = main / f"{name}_{split}.txt"
        for lineno, parts in _lines(path):
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise TransferError(f"{path}:{lineno}: expected '<image id> <1|0|-1>', got {' '.join(parts)!r}")
            row = rows.setdefault(parts[0], np.full(len(classes), -1, dtype=np.int8))
            row[c] = int(parts[1])
    if not rows:
        raise TransferError(f"{main}: split {split!r} lists no image")
    ids = sorted(rows)
    return Listing(f"voc07/{split}", base / "JPEGImages", [f"{i}.jpg" for i in ids],
                   np.stack([rows[i] for i in ids]), classes)


def read_places(root: Path, split: str) -> Listing:
    """A Places205 split (`train` or `val`) from its list file."""
    root = Path(root)
    path = root / PLACES_LISTS / f"{split}_places205.csv"
    if not path.is_file():
        raise TransferError(f"{path}: not found; pass the Places205 root (holding {PLACES_LISTS}/ and "
                            f"{PLACES_IMAGES.parts[0]}/)")
    paths, labels = [], []
    for lineno, parts in _lines(path):
        if len(parts) != 2 or not parts[1].isdigit():
            raise TransferError(f"{path}:{lineno}: expected '<relative path> <label>', got {' '.join(parts)!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise TransferError(f"{path}: lists no image")
    k = max(labels) + 1
    return Listing(f"places205/{split}", root / PLACES_IMAGES, paths, np.array(labels, dtype=np.int64),
                   [str(c) for c in range(k)])


def read_image_folder(folder: Path, classes: list[str] | None = None, name: str | None = None) -> Listing:
    """One sub-folder per class; `classes` fixes the class order (and must hold every sub-folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TransferError(f"{folder}: no such folder; pass a folder with one sub-folder per class")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        raise TransferError(f"{folder}: no class sub-folders (expected one folder per class, e.g. train/<wnid>/)")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TransferError(f"{folder}: class folder {unknown[0]!r} is not a class of the training folder "
                            f"({len(unknown)} unknown)")
    by_name = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        files = sorted(f.name for f in (folder / c).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        paths += [f"{c}/{f}" for f in files]
        labels += [by_name[c]] * len(files)
    if not paths:
        raise TransferError(f"{folder}: its class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return Listing(name or folder.name, folder, paths, np.array(labels, dtype=np.int64), classes)


def is_voc(folder: Path) -> bool:
    try:
        voc_base(folder)
        return True
    except TransferError:
        return False
