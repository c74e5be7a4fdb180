"""Listing of a WebVision 1.0 root and of ImageNet val (DESIGN.md section 2).

A listing turns the data set's text files into `Record`s: one per listed image, with a stable
key, the path relative to the image root, the web label, the source and the query id. Nothing
here opens an image: what is on disk is judged by the converter, which accounts for every record.

Layout read (paths relative to the WebVision root):
    info/synsets.txt                  "<wnid> <name>", line i = class i
    info/train_filelist_google.txt    "google/q0001/000001.jpg <label>"
    info/train_filelist_flickr.txt    "flickr/q0001/000001.jpg <label>"
    info/val_filelist.txt             "<file name> <label>", files under val_images_256/
ImageNet val: one folder per wnid, or a flat folder plus a labels file ("<file> <label|wnid>").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from mopro_fast.errors import MoproError

SOURCES = ("google", "flickr")
SUBSETS = ("webvision", "mini")
MINI_CLASSES = 50  # mini-WebVision: the Google half, classes 0-49
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


class ListingError(MoproError):
    """A listing problem the user must fix; the message is one line: where, what, what to do."""


@dataclass(frozen=True)
class Record:
    """One listed image. `path` is relative to `root`; `index` is its position in its split."""

    key: str
    root: str
    path: str
    label: int
    source: str
    index: int
    query: int | None = None

    def file(self) -> Path:
        return Path(self.root) / self.path

    def to_json(self) -> dict:
        out = {"key": self.key, "path": self.path, "label": self.label, "source": self.source,
               "index": self.index}
        if self.query is not None:
            out["query"] = self.query
        return out


@dataclass
class Split:
    """The records of one split in listing order, and the listed lines refused before decoding."""

    name: str
    records: list[Record]
    duplicates: list[Record] = field(default_factory=list)  # same path listed again

    @property
    def num_listed(self) -> int:
        return len(self.records) + len(self.duplicates)


@dataclass(frozen=True)
class Synset:
    wnid: str
    name: str


def read_synsets(root: Path) -> list[Synset]:
    path = Path(root) / "info" / "synsets.txt"
    if not path.is_file():
        raise ListingError(f"{path}: not found; is {root} a WebVision 1.0 root (it needs info/synsets.txt)?")
    synsets = []
    for lineno, line in _lines(path):
        parts = line.split(maxsplit=1)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", parts[0]):
            raise ListingError(f"{path}:{lineno}: expected '<wnid> <name>', got {line!r}")
        synsets.append(Synset(parts[0], parts[1] if len(parts) > 1 else parts[0]))
    if not synsets:
        raise ListingError(f"{path}: no classes listed")
    return synsets


def list_webvision(
    root: Path,
    subset: str = "webvision",
    classes: int | None = None,
    sources: Sequence[str] | None = None,
    val_dir: str = "val_images_256",
) -> dict[str, Split]:
    """List the `train` and `val` splits of a WebVision 1.0 root.

    `subset="mini"` is mini-WebVision: Google only, classes 0-49. `classes=N` keeps labels < N and
    `sources` keeps the named sources; both narrow the subset further.
    """
    root = Path(root)
    if not root.is_dir():
        raise ListingError(f"{root}: no such directory; pass the WebVision root (the folder holding info/)")
    if subset not in SUBSETS:
        raise ListingError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    synsets = read_synsets(root)
    num_classes = len(synsets)
    limit = effective_classes(subset, classes, num_classes)
    wanted = list(SOURCES if sources is None else sources)
    if subset == "mini":
        if sources is not None and "google" not in wanted:
            raise ListingError("subset 'mini' is Google-only; drop --sources or include google")
        wanted = ["google"]
    for source in wanted:
        if source not in SOURCES:
            raise ListingError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if limit < 1:
        raise ListingError(f"--classes must be at least 1, got {limit}")

    train_lines: list[tuple[str, int, str]] = []
    for source in wanted:
        path = root / "info" / f"train_filelist_{source}.txt"
        if not path.is_file():
            raise ListingError(f"{path}: not found; list it or leave {source} out with --sources")
        train_lines += [(p, y, source) for p, y in _label_lines(path, num_classes) if y < limit]
    train = _make_split("train", root, train_lines)

    val_list = root / "info" / "val_filelist.txt"
    splits = {"train": train}
    if val_list.is_file():
        val_lines = [(f"{val_dir}/{p}", y, "val") for p, y in _label_lines(val_list, num_classes) if y < limit]
        splits["val"] = _make_split("val", root, val_lines)
    if not train.records:
        raise ListingError(f"{root}: no training records selected (subset={subset}, classes={limit}, "
                           f"sources={','.join(wanted)}); check the filters")
    return splits


def list_imagenet_val(
    path: Path,
    synsets: Sequence[Synset],
    labels_file: Path | None = None,
    classes: int | None = None,
) -> Split:
    """ImageNet val for evaluation: one folder per wnid, or a flat folder plus a labels file.

    Folder layout maps each wnid through `synsets` (class i = line i of synsets.txt); a labels file
    holds "<file name> <label>" lines where label is a class id or a wnid.
    """
    path = Path(path)
    if not path.is_dir():
        raise ListingError(f"{path}: no such directory; pass the ImageNet val folder")
    limit = len(synsets) if classes is None else classes
    by_wnid = {s.wnid: i for i, s in enumerate(synsets)}
    lines: list[tuple[str, int]] = []
    if labels_file is not None:
        labels_file = Path(labels_file)
        if not labels_file.is_file():
            raise ListingError(f"{labels_file}: labels file not found")
        for lineno, line in _lines(labels_file):
            parts = line.split()
            if len(parts) != 2:
                raise ListingError(f"{labels_file}:{lineno}: expected '<file> <label or wnid>', got {line!r}")
            name, tag = parts
            label = by_wnid.get(tag)
            if label is None:
                label = _parse_label(tag, labels_file, lineno, len(synsets))
            lines.append((name, label))
    else:
        folders = sorted(d.name for d in path.iterdir() if d.is_dir())
        unknown = [d for d in folders if d not in by_wnid]
        if not folders:
            raise ListingError(f"{path}: no class folders; give one folder per wnid or a labels file")
        if unknown:
            raise ListingError(f"{path}: folder {unknown[0]!r} is not a wnid of synsets.txt "
                               f"({len(unknown)} unknown); remove it or pass a labels file")
        for wnid in sorted(folders, key=by_wnid.__getitem__):
            files = sorted(f.name for f in (path / wnid).iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            lines += [(f"{wnid}/{f}", by_wnid[wnid]) for f in files]
    return _make_split("imagenet-val", path, [(p, y, "imagenet") for p, y in lines if y < limit])


def effective_classes(subset: str, classes: int | None, num_synsets: int) -> int:
    """How many classes (0..N-1) a subset and a `--classes` filter keep."""
    limit = num_synsets if classes is None else min(classes, num_synsets)
    return min(limit, MINI_CLASSES) if subset == "mini" else limit


def make_key(path: str) -> str:
    """A WebDataset-safe key from a relative path: extension dropped, no dots or slashes.

    WebDataset (and DALI's reader) split a member name at the first dot of its base name, so a
    key must hold no '.', and '/' would make it a directory.
    """
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "x"


def make_split(name: str, root: Path, lines: Iterable[tuple[str, int, str]]) -> Split:
    """A Split of `(path relative to root, label, source)` lines, with the keys every listing makes."""
    return _make_split(name, root, lines)


def _make_split(name: str, root: Path, lines: Iterable[tuple[str, int, str]]) -> Split:
    records: list[Record] = []
    duplicates: list[Record] = []
    seen_paths: set[str] = set()
    seen_keys: set[str] = set()
    for index, (path, label, source) in enumerate(lines):
        key = make_key(path)
        duplicate = path in seen_paths
        if key in seen_keys and not duplicate:
            # Two different paths that sanitise alike: a path hash keeps keys unique and stable.
            key = f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"
        record = Record(key=key if not duplicate else f"{key}-dup{index}", root=str(root), path=path,
                        label=label, source=source, index=index, query=_query_from_path(path))
        (duplicates if duplicate else records).append(record)
        seen_paths.add(path)
        seen_keys.add(record.key)
    return Split(name, records, duplicates)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is not part of line 1
    except UnicodeDecodeError as exc:
        raise ListingError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ListingError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__}); "
                           f"check that it is a readable text file") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def _label_lines(path: Path, num_classes: int) -> Iterable[tuple[str, int]]:
    for lineno, line in _lines(path):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ListingError(f"{path}:{lineno}: expected '<relative path> <label>', got {line!r}; fix or delete the line")
        name, tag = parts
        if name.startswith("/") or ".." in Path(name).parts:
            raise ListingError(f"{path}:{lineno}: path {name!r} must be relative to the root and stay inside it")
        yield name, _parse_label(tag, path, lineno, num_classes)


def _parse_label(tag: str, path: Path, lineno: int, num_classes: int) -> int:
    if not re.fullmatch(r"\d+", tag):
        raise ListingError(f"{path}:{lineno}: label {tag!r} is not a class id; expected an integer 0..{num_classes - 1}")
    label = int(tag)
    if label >= num_classes:
        raise ListingError(f"{path}:{lineno}: label {label} out of range; synsets.txt lists {num_classes} classes")
    return label


def _query_from_path(path: str) -> int | None:
    match = re.search(r"(?:^|/)q(\d+)/", path)
    return int(match.group(1)) if match else None
