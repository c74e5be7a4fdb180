"""Listing of a WebVision root (1.0, or 2.0: the same info/ files) and of ImageNet val (DESIGN.md section 2).

Nothing here assumes a class count or ImageNet synsets: the classes are the lines of synsets.txt
(1,000 in 1.0, 5,000 in 2.0, whose ids beyond the ILSVRC-2012 ones are other WordNet synsets), and
a listing of 16 M lines is held in compact columns (data_tools/records.py).

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data_tools.filelist import Columns, read_file_list
from data_tools.records import Record, RecordTable, RecordView, make_key, table_of  # noqa: F401 (Record, make_key: public here)
from mopro_fast.errors import MoproError

SOURCES = ("google", "flickr")
SUBSETS = ("webvision", "mini")
MINI_CLASSES = 50  # mini-WebVision: the Google half, classes 0-49
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


class ListingError(MoproError):
    """A listing problem the user must fix; the message is one line: where, what, what to do."""


@dataclass
class Split:
    """The records of one split in listing order, and the listed lines refused before decoding.

    The lines live in `table` (compact columns, data_tools/records.py); `records` makes a `Record`
    each time one is read, so a split of 16 M lines costs a few hundred MB, not tens of GB.
    """

    name: str
    table: RecordTable
    rows: np.ndarray  # rows of `table` that are records (not repeated paths), ascending
    duplicates: list[Record]  # same path listed again

    @property
    def records(self) -> RecordView:
        return RecordView(self.table, self.rows)

    @property
    def num_listed(self) -> int:
        return len(self.table)


@dataclass(frozen=True)
class Synset:
    wnid: str
    name: str


def read_synsets(root: Path) -> list[Synset]:
    path = Path(root) / "info" / "synsets.txt"
    if not path.is_file():
        raise ListingError(f"{path}: not found; is {root} a WebVision root (1.0 or 2.0: it needs info/synsets.txt)?")
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

    files = []
    for source in wanted:
        path = root / "info" / f"train_filelist_{source}.txt"
        if not path.is_file():
            raise ListingError(f"{path}: not found; list it or leave {source} out with --sources")
        files.append(path)
    train = _split_from_files("train", root, wanted, files, num_classes, limit)

    val_list = root / "info" / "val_filelist.txt"
    splits = {"train": train}
    if val_list.is_file():
        splits["val"] = _split_from_files("val", root, ["val"], [val_list], num_classes, limit, prefix=f"{val_dir}/")
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


def _make_split(name: str, root: Path, lines: Sequence[tuple[str, int, str]]) -> Split:
    """A split from (path, label, source) lines held in memory (small listings: ImageNet val)."""
    return _split(name, table_of(str(root), list(lines)))


def make_split(name: str, root: Path, lines: Sequence[tuple[str, int, str]]) -> Split:
    """A Split of `(path relative to root, label, source)` lines, with the keys every listing makes
    (`mopro-fast finetune` lists an ImageNet folder's subset with it)."""
    return _make_split(name, root, lines)


def _split_from_files(name: str, root: Path, sources: Sequence[str], files: Sequence[Path], num_classes: int,
                      limit: int, prefix: str = "") -> Split:
    """A split from file lists (one per source, in order), read into compact columns."""
    try:
        columns = Columns(list(files))
    except OSError as exc:
        raise ListingError(f"{exc.filename}: cannot read it ({exc.strerror or type(exc).__name__}); "
                           f"check that it is a readable text file") from None
    for code, path in enumerate(files):
        _read_label_file(path, num_classes, limit, columns, code)
    n = columns.n
    table = RecordTable(str(root), sources, None, columns.label[:n], columns.source[:n],
                        columns.blob[:columns.nbytes], columns.offsets(), prefix=prefix)
    del columns
    return _split(name, table)


def _split(name: str, table: RecordTable) -> Split:
    rows, duplicates = table.resolve()
    return Split(name, table, rows, [table.record(r) for r in duplicates.tolist()])


def _read_label_file(path: Path, num_classes: int, limit: int, columns: Columns, code: int) -> None:
    """Add a file list's lines with a label below `limit` to `columns`, with source `code`."""
    def undecodable(exc: UnicodeDecodeError, offset: int) -> ListingError:
        return ListingError(f"{path}: not UTF-8 text ({exc.reason} at byte {offset + exc.start})")

    try:
        read_file_list(path, limit, lambda line, lineno: _label_line(path, line, lineno, num_classes),
                       undecodable, num_classes, columns, code)
    except OSError as exc:
        raise ListingError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__}); "
                           f"check that it is a readable text file") from None


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


def _label_line(path: Path, line: str, lineno: int, num_classes: int) -> tuple[str, int]:
    """One stripped, non-comment line of a file list: (relative path, label), or the error."""
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise ListingError(f"{path}:{lineno}: expected '<relative path> <label>', got {line!r}; fix or delete the line")
    name, tag = parts
    if name.startswith("/") or ".." in Path(name).parts:
        raise ListingError(f"{path}:{lineno}: path {name!r} must be relative to the root and stay inside it")
    return name, _parse_label(tag, path, lineno, num_classes)


def _parse_label(tag: str, path: Path, lineno: int, num_classes: int) -> int:
    if not re.fullmatch(r"\d+", tag):
        raise ListingError(f"{path}:{lineno}: label {tag!r} is not a class id; expected an integer 0..{num_classes - 1}")
    label = int(tag)
    if label >= num_classes:
        raise ListingError(f"{path}:{lineno}: label {label} out of range; synsets.txt lists {num_classes} classes")
    return label
