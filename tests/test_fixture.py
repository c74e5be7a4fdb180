"""The built-in WebVision-shaped fixture: layout, determinism, planted noise and broken files, learnability."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.fixture import CORRUPT_KINDS, MAX_CLASSES, FixtureSpec, class_name, make_fixture, wnid

SPEC = FixtureSpec(classes=10, train_per_class=40, val_per_class=10, imagenet_per_class=5, image_size=32,
                   noise=0.2, ood=0.1, flickr=0.3, seed=0, corrupt=True)
N = SPEC.classes * SPEC.train_per_class


def read_pairs(path: Path) -> list[tuple[str, int]]:
    return [(a, int(b)) for a, b in (line.split(" ") for line in path.read_text().splitlines())]


def read_tsv(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [line.split("\t") for line in lines]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("fx") / "webvision"
    return root, make_fixture(root, SPEC, workers=1)


@pytest.fixture(scope="module")
def corrupt(fx) -> dict[str, str]:
    root, _ = fx
    rows = read_tsv(root / "corrupt.tsv")
    assert rows[0] == ["path", "kind"]
    return {kind: path for path, kind in rows[1:]}


def test_info_files(fx):
    root, _ = fx
    synsets = [line.split(" ") for line in (root / "info/synsets.txt").read_text().splitlines()]
    assert synsets == [[wnid(c), class_name(c)] for c in range(10)]
    assert synsets[0] == ["n90000000", "red_plain_circle"] and synsets[9][0] == "n90000009"
    queries = read_pairs(root / "info/queries_synsets_map.txt")
    assert queries == [(str(q), (q - 1) // 2) for q in range(1, 21)]


def test_train_lists(fx, corrupt):
    root, summary = fx
    google = read_pairs(root / "info/train_filelist_google.txt")
    flickr = read_pairs(root / "info/train_filelist_flickr.txt")
    assert (len(google), len(flickr)) == (N - round(0.3 * N) + len(CORRUPT_KINDS), round(0.3 * N))
    assert (summary.train_google, summary.train_flickr) == (len(google), len(flickr))
    pattern = re.compile(r"(google|flickr)/q(\d{4})/(\d{6})\.jpg")
    per_query: dict[str, list[int]] = {}
    for src, rows in (("google", google), ("flickr", flickr)):
        for path, label in rows:
            m = pattern.fullmatch(path)
            assert m and m[1] == src, path
            assert 0 <= label < 10 and (int(m[2]) - 1) // 2 == label  # stored under a query of its listed label
            per_query.setdefault(path.rsplit("/", 1)[0], []).append(int(m[3]))
            assert (root / path).is_file() == (path != corrupt["missing"]), path
    for folder, counters in per_query.items():  # counters run 1..n in every query folder
        assert sorted(counters) == list(range(1, len(counters) + 1)), folder
    regular = Counter(label for path, label in google + flickr if path not in corrupt.values())
    assert regular == {c: 40 for c in range(10)}  # each query lists exactly train_per_class images


def test_truth_fractions(fx, corrupt):
    root, summary = fx
    rows = read_tsv(root / "truth.tsv")
    assert rows[0] == ["path", "web_label", "truth"]
    listed = read_pairs(root / "info/train_filelist_google.txt") + read_pairs(root / "info/train_filelist_flickr.txt")
    assert sorted((p, int(y)) for p, y, _ in rows[1:]) == sorted(listed)
    regular = [(int(y), t) for p, y, t in rows[1:] if p not in corrupt.values()]
    ood = sum(t == "ood" for _, t in regular)
    flipped = sum(t != "ood" and int(t) != y for y, t in regular)
    assert (flipped, ood) == (round(0.2 * N), round(0.1 * N)) == (80, 40)
    assert (summary.clean, summary.flipped, summary.ood) == (N - 120, 80, 40)
    assert all(t == "ood" or 0 <= int(t) < 10 for _, t in regular)
    by_path = {p: (int(y), t) for p, y, t in rows[1:]}
    assert all(by_path[p][1] == str(by_path[p][0]) for p in corrupt.values())  # planted ones: nominal class


def test_pair_noise_is_structured_and_leaves_symmetric_plans_alone():
    from data_tools.fixture import _plan

    base = replace(SPEC, corrupt=False)
    sym = [(y, c) for _, y, c, _ in _plan(base)[1]]
    half = [(y, c) for _, y, c, _ in _plan(replace(base, pair=0.5))[1]]
    full = [(y, c) for _, y, c, _ in _plan(replace(base, pair=1.0))[1]]
    flips = lambda rows: [(y, c) for y, c in rows if c >= 0 and c != y]  # noqa: E731
    assert len(flips(sym)) == len(flips(half)) == len(flips(full)) == 80  # same images flipped, same OOD
    assert [c < 0 for _, c in sym] == [c < 0 for _, c in full]
    assert all(c == (y + 1) % 10 for y, c in flips(full))  # every flip shows the confusable class
    assert sum(c == (y + 1) % 10 for y, c in flips(half)) >= 40  # half of them at least (+ uniform hits)
    assert len({c - y for y, c in flips(sym)}) > 3  # symmetric: spread over the other classes
    with pytest.raises(ValueError, match="pair"):
        replace(base, pair=1.5).validate()


def test_val_and_imagenet(fx):
    root, summary = fx
    val = read_pairs(root / "info/val_filelist.txt")
    assert val[0] == ("val000001.jpg", 0) and len(val) == summary.val == 100
    assert Counter(y for _, y in val) == {c: 10 for c in range(10)}
    assert sorted(p.name for p in (root / "val_images_256").iterdir()) == sorted(f for f, _ in val)
    folders = sorted(p.name for p in (root / "imagenet_val").iterdir())
    assert folders == [wnid(c) for c in range(10)]
    files = sorted((root / "imagenet_val").glob("*/*.JPEG"))
    assert len(files) == summary.imagenet_val == 50
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", f.name) for f in files)
    for f, _ in val[:20]:
        with Image.open(root / "val_images_256" / f) as im:
            assert min(im.size) == 32  # val_images_256 style: shorter side fixed


def test_regular_images_are_web_like_jpegs(fx):
    root, _ = fx
    sizes = []
    for path, _ in read_pairs(root / "info/train_filelist_flickr.txt"):
        with Image.open(root / path) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            sizes.append(im.size)
    short = np.array([min(s) for s in sizes])
    aspect = np.array([max(s) / min(s) for s in sizes])
    assert short.min() >= 25 and short.max() <= 40 and short.std() > 1  # 0.8-1.25 x 32, rounded
    assert aspect.min() >= 1.0 and aspect.max() <= 4 / 3 + 0.05 and aspect.std() > 0.03


def test_corrupt_records(fx, corrupt, monkeypatch):
    root, summary = fx
    assert sorted(corrupt) == sorted(CORRUPT_KINDS) and summary.corrupt == {k: 1 for k in CORRUPT_KINDS}
    assert all(p.startswith("google/") and p.endswith(".jpg") for p in corrupt.values())
    expect = {"png_as_jpg": ("PNG", "RGB"), "gif_as_jpg": ("GIF", "P"), "cmyk": ("JPEG", "CMYK"), "grayscale": ("JPEG", "L")}
    for kind, (fmt, mode) in expect.items():
        with Image.open(root / corrupt[kind]) as im:
            assert (im.format, im.mode) == (fmt, mode), kind
            im.load()  # valid: decodes fully
    assert (root / corrupt["empty"]).stat().st_size == 0
    assert not (root / corrupt["missing"]).exists()
    with pytest.raises(OSError):
        with Image.open(root / corrupt["truncated"]) as im:
            assert im.format == "JPEG"
            im.load()
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own guard trips on it
        Image.open(root / corrupt["huge"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(root / corrupt["huge"]) as im:  # header only, never decoded here
        assert (im.format, im.size) == ("JPEG", (20000, 20000))


def test_deterministic_and_seed_dependent(fx, tmp_path):
    root, _ = fx
    again = tmp_path / "again"
    make_fixture(again, SPEC, workers=2)  # different thread count, same bytes
    first, second = tree(root), tree(again)
    assert len(first) > 500 and first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    make_fixture(other, replace(SPEC, seed=1, corrupt=False))
    third = tree(other)
    assert third["info/synsets.txt"] == first["info/synsets.txt"]
    assert third["truth.tsv"] != first["truth.tsv"]
    val = [k for k in first if k.startswith("val_images_256/")]
    assert sum(first[k] != third[k] for k in val) == len(val) == 100


def test_readme_and_summary(fx):
    root, summary = fx
    text = (root / "README.txt").read_text()
    assert "seed: 0" in text
    spec = json.loads(text.split("spec: ", 1)[1].splitlines()[0])
    assert FixtureSpec(**spec) == SPEC
    d = json.loads(json.dumps(summary.to_dict()))
    assert d["root"] == str(root) and d["classes"] == 10 and d["val"] == 100


def test_classes_are_learnable(fx, corrupt):
    """Nearest class mean on 16x16 clean training images (per-image mean removed) must beat chance (10%)
    clearly on the val set; measured 0.43-0.55 over seeds 0-3 at this size."""
    root, _ = fx

    def feat(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255
        return a - a.mean()

    rows = [r for r in read_tsv(root / "truth.tsv")[1:] if r[1] == r[2] and r[0] not in corrupt.values()]
    x = np.stack([feat(root / p) for p, _, _ in rows])
    y = np.array([int(t) for _, _, t in rows])
    means = np.stack([x[y == c].mean(0) for c in range(10)])  # 10 x 768
    val = read_pairs(root / "info/val_filelist.txt")
    v = np.stack([feat(root / "val_images_256" / f) for f, _ in val])
    pred = ((v[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    acc = float((pred == np.array([c for _, c in val])).mean())
    assert acc >= 0.3, acc


def test_class_attributes_distinct():
    names = [class_name(c) for c in range(MAX_CLASSES)]
    assert MAX_CLASSES == 2520 and len(set(names)) == MAX_CLASSES


def test_rejects_bad_specs_and_nonempty_out(tmp_path):
    for bad in (dict(noise=0.7, ood=0.4), dict(classes=0), dict(classes=MAX_CLASSES + 1), dict(flickr=1.5),
                dict(image_size=8), dict(seed=-1)):
        with pytest.raises(ValueError):
            make_fixture(tmp_path / "x", replace(FixtureSpec(), **bad))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_fixture(tmp_path / "full", FixtureSpec(classes=2, train_per_class=1))


def test_hue_is_a_nuisance_without_hue_coding():
    """hue_coded=False: one class's objects come in any hue (the strong view's hue jitter cannot erase
    the class cue); the default keeps each class's hue within +-8 degrees (and its images unchanged)."""
    import colorsys

    from data_tools.fixture import MAX_CLASSES_NO_HUE, render

    def object_hue(im: Image.Image) -> float:
        a = np.asarray(im.convert("RGB"), np.float32) / 255
        sat = a.max(axis=2) - a.min(axis=2)
        r, g, b = a[sat >= np.quantile(sat, 0.97)].mean(axis=0)  # the most saturated pixels: the object
        return colorsys.rgb_to_hsv(r, g, b)[0] * 360

    def spread(hue_coded: bool) -> float:
        hues = np.radians([object_hue(render(np.random.default_rng([7, i]), 0, 64, hue_coded=hue_coded))
                           for i in range(24)])
        return 1 - abs(np.exp(1j * hues).mean())  # circular variance: 0 = one hue, 1 = all hues

    assert spread(True) < 0.1 and spread(False) > 0.5
    with pytest.raises(ValueError, match="without hue coding at most 315 classes"):
        FixtureSpec(classes=MAX_CLASSES_NO_HUE + 1, hue_coded=False).validate()
    FixtureSpec(classes=MAX_CLASSES_NO_HUE + 1).validate()  # hue-coded: up to 2520


def test_make_fixture_cli_hue_nuisance(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "fx"
    result = run_cli("make-fixture", str(out), "--classes", "3", "--train-per-class", "2", "--val-per-class", "1",
                     "--imagenet-per-class", "0", "--hue-nuisance")
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"hue_coded": false' in (out / "README.txt").read_text()


def test_demo_reuses_only_a_complete_fixture_of_its_own_spec(tmp_path, monkeypatch):
    """README.txt is written last, so the demo reuses a fixture only when it is complete and of the
    very spec it asks for; a foreign folder in its place is refused, not deleted."""
    import data_tools.fixture as fixture_module
    from data_tools.fixture import written_spec as _written_spec
    from tests.conftest import run_cli

    spec = FixtureSpec(classes=3, train_per_class=2, val_per_class=1, imagenet_per_class=1, hue_coded=False)
    make_fixture(tmp_path / "done", spec)
    assert _written_spec(tmp_path / "done") == spec
    assert _written_spec(tmp_path / "done") != replace(spec, hue_coded=True)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fixture_module, "_write", crash)  # killed while rendering
    with pytest.raises(KeyboardInterrupt):
        make_fixture(tmp_path / "half", spec, workers=1)
    assert (tmp_path / "half" / "info" / "synsets.txt").is_file() and _written_spec(tmp_path / "half") is None
    foreign = tmp_path / "mine" / "fixture"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    result = run_cli("demo", "--out", str(tmp_path / "mine"), "--runs", str(tmp_path / "runs"))
    assert result.returncode == 2 and "not a built-in data set written by mopro-fast" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
