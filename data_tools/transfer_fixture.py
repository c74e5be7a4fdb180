"""Small synthetic transfer-evaluation data sets with the built-in training data's class cues.

`mopro-fast transfer svm|knn` and `mopro-fast finetune` read three layouts (mopro_fast/transfer/datasets.py);
this module writes each of them, with the objects of data_tools/fixture.py (class c = shape c mod 9, hue
c mod 8, pattern c mod 5, edge c mod 7), so that an encoder trained on the built-in WebVision-shaped fixture
with the same `classes` and `hue_coded` has learned exactly the cues these images carry:

- ``voc07``: a PASCAL VOC 2007-shaped multi-label folder: ``JPEGImages/<id>.jpg`` and
  ``ImageSets/Main/{trainval,test}.txt`` plus ``ImageSets/Main/<class>_{trainval,test}.txt`` with one
  ``<id> <1|0|-1>`` line per image (1 positive, -1 negative, 0 "difficult", as in VOC). Each image shows one
  object of its main class and, with probability ``second``, a second object of another class (positive, or
  difficult with probability ``difficult``), on the fixture's backgrounds. Class names are
  `fixture.class_name(c)`.
- ``places205``: the Places205 layout of the original code: ``trainvalsplit_places205/{train,val}_places205.csv``
  (``<relative path> <label>`` lines) and the images under ``data/vision/torralba/deeplearning/images256/``.
- ``imagenet``: an ImageNet-shaped folder, ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/<wnid>/*.JPEG``, with the
  fixture's wnids (`fixture.wnid(c)`), so a checkpoint trained on the built-in data keeps its classifier.

``corrupt=True`` plants, in the training split, one truncated JPEG and one empty file (listed like any other):
the readers count and skip them. Every image draws from its own ``numpy.random.default_rng([seed, kind,
split, index])``, so the same spec gives the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.fixture import MAX_CLASSES, MAX_CLASSES_NO_HUE, _draw_object, class_name, render, wnid

KINDS = ("voc07", "places205", "imagenet")
VOC_SPLITS = ("trainval", "test")
PLACES_LISTS = "trainvalsplit_places205"
PLACES_IMAGES = "data/vision/torralba/deeplearning/images256"


@dataclass(frozen=True)
class TransferSpec:
    """What to write: `per_class` images per class in each split (VOC: images whose main class it is)."""

    classes: int = 6
    per_class: int = 16  # train / trainval split
    test_per_class: int = 10  # test / val split
    image_size: int = 40
    seed: int = 0
    hue_coded: bool = True  # as data_tools.fixture.FixtureSpec.hue_coded: match the training data's
    second: float = 0.5  # voc07: share of images with a second object (another class)
    difficult: float = 0.25  # voc07: share of second objects marked difficult (0)
    corrupt: bool = False

    def validate(self) -> None:
        limit = MAX_CLASSES if self.hue_coded else MAX_CLASSES_NO_HUE
        for ok, msg in [(2 <= self.classes <= limit, f"classes must be in 2..{limit}, got {self.classes}"),
                        (self.per_class >= 1 and self.test_per_class >= 1, "per-class counts must be >= 1"),
                        (self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}"),
                        (0 <= self.second <= 1 and 0 <= self.difficult <= 1, "second, difficult must be in [0, 1]")]:
            if not ok:
                raise ValueError(msg)


def _jpeg(im, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def _image(spec: TransferSpec, key: list[int], classes: list[int]) -> bytes:
    """One JPEG showing an object of each of `classes` (the first one drawn by `render`)."""
    rng = np.random.default_rng([spec.seed, *key])
    im = render(rng, classes[0], spec.image_size, hue_coded=spec.hue_coded)
    for c in classes[1:]:
        _draw_object(im, rng, c, spec.hue_coded)
    return _jpeg(im, rng)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _plant(path: Path, data: bytes, broken: str) -> None:
    """A broken file in place of a good one: the first half of the JPEG, or zero bytes."""
    _write(path, data[: len(data) // 2] if broken == "truncated" else b"")


def _voc(root: Path, spec: TransferSpec) -> None:
    K = spec.classes
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    number = 0
    for s, split in enumerate(VOC_SPLITS):
        n = K * (spec.per_class if split == "trainval" else spec.test_per_class)
        g = np.random.default_rng([spec.seed, 0, s])
        labels = np.full((n, K), -1, dtype=np.int8)  # n x K
        ids = []
        for i in range(n):
            number += 1
            ids.append(f"{number:06d}")
            first = i % K
            objects = [first]
            labels[i, first] = 1
            if g.random() < spec.second:
                other = int((first + g.integers(1, K)) % K)
                objects.append(other)
                labels[i, other] = 0 if g.random() < spec.difficult else 1
            data = _image(spec, [0, s, i], objects)
            if spec.corrupt and split == "trainval" and i in (0, 1):
                _plant(root / "JPEGImages" / f"{ids[-1]}.jpg", data, ("truncated", "empty")[i])
            else:
                _write(root / "JPEGImages" / f"{ids[-1]}.jpg", data)
        (main / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
        for c in range(K):
            (main / f"{class_name(c)}_{split}.txt").write_text("".join(f"{x} {labels[i, c]:2d}\n"
                                                                       for i, x in enumerate(ids)))


def _places(root: Path, spec: TransferSpec) -> None:
    (root / PLACES_LISTS).mkdir(parents=True)
    for s, split in enumerate(("train", "val")):
        n = spec.classes * (spec.per_class if split == "train" else spec.test_per_class)
        lines = []
        for i in range(n):
            c = i % spec.classes
            name = class_name(c)
            rel = f"{name[0]}/{name}/{split}_{i:06d}.jpg"
            data = _image(spec, [1, s, i], [c])
            if spec.corrupt and split == "train" and i in (0, 1):
                _plant(root / PLACES_IMAGES / rel, data, ("truncated", "empty")[i])
            else:
                _write(root / PLACES_IMAGES / rel, data)
            lines.append(f"{rel} {c}\n")
        (root / PLACES_LISTS / f"{split}_places205.csv").write_text("".join(lines))


def _imagenet(root: Path, spec: TransferSpec) -> None:
    for s, split in enumerate(("train", "val")):
        n = spec.classes * (spec.per_class if split == "train" else spec.test_per_class)
        for i in range(n):
            c = i % spec.classes
            name = f"{wnid(c)}_{i:06d}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            data = _image(spec, [2, s, i], [c])
            if spec.corrupt and split == "train" and i in (0, 1):
                _plant(root / split / wnid(c) / name, data, ("truncated", "empty")[i])
            else:
                _write(root / split / wnid(c) / name, data)


def make_transfer_fixture(out: Path, kind: str, spec: TransferSpec = TransferSpec()) -> Path:
    """Write the `kind` data set (one of KINDS) into `out` (must not exist or be empty); returns `out`."""
    if kind not in KINDS:
        raise ValueError(f"unknown transfer fixture {kind!r}; choose one of {', '.join(KINDS)}")
    spec.validate()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty")
    root.mkdir(parents=True, exist_ok=True)
    {"voc07": _voc, "places205": _places, "imagenet": _imagenet}[kind](root, spec)
    (root / "README.txt").write_text(f"Synthetic {kind}-shaped transfer data written by mopro-fast "
                                     f"(data_tools/transfer_fixture.py).\nspec: {spec}\n")
    return root
