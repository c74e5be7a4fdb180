"""The listing at scale (DESIGN.md section 5): compact record tables and the chunked numpy parser
give what a plain line-by-line listing gives, on awkward lines too, and `bench listing --quick`
measures listing, planning and manifest writing of a generated WebVision-2.0 file list."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest

from data_tools import filelist
from data_tools.records import make_key, query_of
from data_tools.webvision import ListingError, list_webvision


def reference_listing(lines: list[str], num_classes: int, limit: int) -> tuple[list[tuple], list[tuple]]:
    """What the listing must give, computed the plain way: (records, duplicates) as
    (key, path, label, index, query) tuples, from the split's lines of every source in order."""
    kept = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, tag = line.rsplit(maxsplit=1)
        assert int(tag) < num_classes
        if int(tag) < limit:
            kept.append((name, int(tag)))
    records, duplicates, paths, keys = [], [], set(), set()
    for index, (path, label) in enumerate(kept):
        key = make_key(path)
        if path in paths:
            key = f"{key}-dup{index}"
        elif key in keys:
            key = f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"
        (duplicates if path in paths else records).append((key, path, label, index, query_of(path)))
        paths.add(path)
        keys.add(key)
    return records, duplicates


def awkward_lines(rng: random.Random, n: int) -> list[str]:
    names = ["google/q{q:04d}/{f:06d}.jpg", "google/q{q:04d}/a.b{f}.jpg", "google/q{q:04d}/a_b{f}.jpg",
             "google/q{q:04d}/x y{f}.jpg", "google/q{q:04d}/é{f}.jpg", "google/q{q}/.hidden{f}", "g/a..b{f}.jpg"]
    out = []
    for _ in range(n):
        name = rng.choice(names).format(q=rng.randint(1, 3), f=rng.randint(0, 6))
        label, r = rng.randint(0, 9), rng.random()
        out.append("# a comment" if r < 0.04 else "" if r < 0.07 else f"  {name}\t{label} " if r < 0.1
                   else f"{name} {label}\r" if r < 0.13 else f"{name} {label:03d}" if r < 0.16 else f"{name} {label}")
    return out


@pytest.mark.parametrize("chunk", [64, 1 << 20])  # many chunks (fast and slow ones mixed), or one
def test_compact_listing_equals_the_plain_one(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(filelist, "CHUNK", chunk)
    rng = random.Random(chunk)
    for trial in range(12):
        root = tmp_path / f"t{trial}"
        (root / "info").mkdir(parents=True)
        (root / "info" / "synsets.txt").write_text("".join(f"n{i:08d} c{i}\n" for i in range(10)))
        lines = {s: awkward_lines(rng, rng.randint(1, 80)) for s in ("google", "flickr")}
        lines["google"].insert(0, "google/q0001/first.jpg 1")  # never an empty training split
        for source, text in lines.items():
            bom = "\ufeff" if trial % 5 == 0 else ""
            (root / "info" / f"train_filelist_{source}.txt").write_text(bom + "\n".join(text), encoding="utf-8")
        limit = [10, 4][trial % 2]
        train = list_webvision(root, classes=limit)["train"]
        want_records, want_dups = reference_listing(lines["google"] + lines["flickr"], 10, limit)
        got = [(r.key, r.path, r.label, r.index, r.query) for r in train.records]
        assert got == want_records
        assert [(r.key, r.path, r.label, r.index, r.query) for r in train.duplicates] == want_dups
        sources = [r.source for r in train.records]
        assert sources == sorted(sources, key=["google", "flickr"].index)
        assert train.num_listed == len(want_records) + len(want_dups)


def test_a_bad_line_deep_in_a_big_list_names_its_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(filelist, "CHUNK", 4096)
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "synsets.txt").write_text("n1 a\nn2 b\n")
    good = [f"google/q0001/{i:06d}.jpg {i % 2}" for i in range(5000)]
    for bad, message in (("google/q0001/x.jpg 2", ":4001: label 2 out of range"),
                         ("google/../x.jpg 1", ":4001: path 'google/../x.jpg' must be relative"),
                         ("google/q0001/x.jpg", ":4001: expected '<relative path> <label>'")):
        (tmp_path / "info" / "train_filelist_google.txt").write_text("\n".join(good[:4000] + [bad] + good[4000:]))
        with pytest.raises(ListingError, match=message):
            list_webvision(tmp_path, sources=["google"])


def test_bench_listing_quick(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mopro_fast.cli import main

    out = tmp_path / "listing.json"
    result = CliRunner().invoke(main, ["bench", "listing", "--lines", "3000", "--lines", "30000", "--json",
                                       "--out", str(out)])  # (each size still runs in a fresh interpreter)
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(result.output)
    small, big = report["sizes"]
    for size in (small, big):
        assert size["classes"] == 5000 and size["records"]["train"] == size["lines"]
        assert size["manifest_written"] == {"train": size["lines"], "val": size["val_lines"]}
        assert size["shards"] == math.ceil(size["lines"] / 2000) + math.ceil(size["val_lines"] / 2000)
        peaks = size["peak_rss_mb"]
        assert peaks["start"] <= peaks["listing"] <= peaks["plan"] <= peaks["manifest"]
        assert all(v >= 0 for v in size["seconds"].values())
    assert report["growth"]["lines"] == 10
    assert report["goal"]["lines"] == 30000 and report["goal"]["met"] is True
