"""WebVision / ImageNet-val listing on hand-made WebVision-shaped trees (text files and folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.webvision import ListingError, list_imagenet_val, list_webvision, make_key, read_synsets

K = 60  # more than the 50 classes of mini-WebVision, so the mini filter has something to drop


def write_tree(root: Path, google: list[tuple[str, int]], flickr: list[tuple[str, int]],
               val: list[tuple[str, int]]) -> Path:
    (root / "info").mkdir(parents=True)
    (root / "info" / "synsets.txt").write_text("".join(f"n{9000 + c:08d} class {c}\n" for c in range(K)))
    for name, rows in (("train_filelist_google.txt", google), ("train_filelist_flickr.txt", flickr),
                       ("val_filelist.txt", val)):
        (root / "info" / name).write_text("".join(f"{p} {y}\n" for p, y in rows))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    google = [(f"google/q{2 * c + 1:04d}/{i:06d}.jpg", c) for c in range(K) for i in range(1, 3)]
    flickr = [(f"flickr/q{2 * c + 2:04d}/{i:06d}.jpg", c) for c in range(K) for i in range(1, 2)]
    val = [(f"val{c * 10 + i:06d}.jpg", c) for c in range(K) for i in range(3)]
    return write_tree(tmp_path / "wv", google, flickr, val)


def test_full_webvision_lists_both_sources_and_val(tree: Path) -> None:
    splits = list_webvision(tree)
    train, val = splits["train"], splits["val"]
    assert len(train.records) == K * 3 and len(val.records) == K * 3
    assert {r.source for r in train.records} == {"google", "flickr"}
    assert [r.index for r in train.records] == list(range(K * 3))  # index = position in the split
    first = train.records[0]
    assert (first.path, first.label, first.source, first.query, first.key) == (
        "google/q0001/000001.jpg", 0, "google", 1, "google_q0001_000001")
    assert val.records[0].path == "val_images_256/val000000.jpg" and val.records[0].source == "val"
    assert len({r.key for r in train.records}) == len(train.records)


def test_mini_is_google_only_first_50_classes(tree: Path) -> None:
    splits = list_webvision(tree, subset="mini")
    labels = {r.label for r in splits["train"].records}
    assert labels == set(range(50))
    assert {r.source for r in splits["train"].records} == {"google"}
    assert len(splits["train"].records) == 50 * 2
    assert {r.label for r in splits["val"].records} == set(range(50))


def test_class_and_source_filters(tree: Path) -> None:
    splits = list_webvision(tree, classes=7, sources=["flickr"])
    assert {r.label for r in splits["train"].records} == set(range(7))
    assert {r.source for r in splits["train"].records} == {"flickr"}
    assert len(splits["val"].records) == 7 * 3
    mini = list_webvision(tree, subset="mini", classes=5)
    assert {r.label for r in mini["train"].records} == set(range(5))
    with pytest.raises(ListingError, match="Google-only"):
        list_webvision(tree, subset="mini", sources=["flickr"])
    with pytest.raises(ListingError, match="unknown source"):
        list_webvision(tree, sources=["bing"])


def test_custom_val_folder(tree: Path) -> None:
    splits = list_webvision(tree, val_dir="val_full")
    assert splits["val"].records[0].path.startswith("val_full/")


@pytest.mark.parametrize("line, message", [
    ("google/q0001/000001.jpg", "expected '<relative path> <label>'"),
    ("google/q0001/000001.jpg seven", "is not a class id"),
    (f"google/q0001/000001.jpg {K}", "out of range"),
    ("/etc/passwd 3", "must be relative"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    root = write_tree(tmp_path / "wv", [("google/q0001/000001.jpg", 0)], [], [])
    with open(root / "info" / "train_filelist_google.txt", "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(ListingError, match=message) as info:
        list_webvision(root)
    assert "train_filelist_google.txt:2:" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_root_and_synsets(tmp_path: Path) -> None:
    with pytest.raises(ListingError, match="no such directory"):
        list_webvision(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ListingError, match="synsets.txt"):
        list_webvision(tmp_path / "empty")


def test_duplicates_and_key_collisions(tmp_path: Path) -> None:
    google = [("google/q0001/a.b.jpg", 0), ("google/q0001/a_b.jpg", 0), ("google/q0001/a.b.jpg", 1)]
    root = write_tree(tmp_path / "wv", google, [], [])
    train = list_webvision(root)["train"]
    assert [r.path for r in train.records] == ["google/q0001/a.b.jpg", "google/q0001/a_b.jpg"]
    assert [r.path for r in train.duplicates] == ["google/q0001/a.b.jpg"]
    assert train.num_listed == 3
    keys = [r.key for r in train.records]
    assert len(set(keys)) == 2 and all("." not in k and "/" not in k for k in keys)
    assert keys[0] == "google_q0001_a_b" and keys[1].startswith("google_q0001_a_b-")  # stable hash suffix
    assert list_webvision(root)["train"].records[1].key == keys[1]
    assert make_key("x/y.z.jpeg") == "x_y_z"


def test_imagenet_val_folder_per_wnid(tree: Path, tmp_path: Path) -> None:
    synsets = read_synsets(tree)
    inv = tmp_path / "imagenet"
    for c in (3, 0):
        (inv / synsets[c].wnid).mkdir(parents=True)
        for i in range(2):
            (inv / synsets[c].wnid / f"ILSVRC2012_val_{c}{i}.JPEG").write_bytes(b"x")
    (inv / synsets[0].wnid / "notes.txt").write_text("not an image")
    split = list_imagenet_val(inv, synsets)
    assert [(r.path, r.label) for r in split.records] == [
        (f"{synsets[0].wnid}/ILSVRC2012_val_00.JPEG", 0), (f"{synsets[0].wnid}/ILSVRC2012_val_01.JPEG", 0),
        (f"{synsets[3].wnid}/ILSVRC2012_val_30.JPEG", 3), (f"{synsets[3].wnid}/ILSVRC2012_val_31.JPEG", 3)]
    assert {r.source for r in split.records} == {"imagenet"}
    assert [r.label for r in list_imagenet_val(inv, synsets, classes=2).records] == [0, 0]
    (inv / "stray").mkdir()
    with pytest.raises(ListingError, match="not a wnid"):
        list_imagenet_val(inv, synsets)


def test_imagenet_val_flat_with_labels_file(tree: Path, tmp_path: Path) -> None:
    synsets = read_synsets(tree)
    flat = tmp_path / "flat"
    flat.mkdir()
    labels = tmp_path / "labels.txt"
    labels.write_text(f"a.JPEG 5\nb.JPEG {synsets[7].wnid}\n")
    split = list_imagenet_val(flat, synsets, labels)
    assert [(r.path, r.label) for r in split.records] == [("a.JPEG", 5), ("b.JPEG", 7)]
    labels.write_text("a.JPEG n_bogus\n")
    with pytest.raises(ListingError, match="labels.txt:1"):
        list_imagenet_val(flat, synsets, labels)
