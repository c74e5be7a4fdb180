"""make-fixture -> convert -> read back (webdataset, DALI CPU reader, our index vs wds2idx)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data_tools.convert import ConvertSettings, convert
from data_tools.shards import build_index
from tests.conftest import SMALL, run_cli


def read_truth(root: Path) -> dict[str, str]:
    rows = (root / "truth.tsv").read_text().splitlines()[1:]
    return {r.split("\t")[0]: r.split("\t")[2] for r in rows}


def listed(root: Path) -> list[tuple[str, int]]:
    rows = []
    for name in ("train_filelist_google.txt", "train_filelist_flickr.txt"):
        rows += [(p, int(y)) for p, y in (line.split() for line in (root / "info" / name).read_text().splitlines())]
    return rows


def test_every_listed_record_is_written_or_rejected_with_reason(small_fixture: Path, small_shards: Path) -> None:
    manifest = json.loads((small_shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    rows = listed(small_fixture)
    assert train["num_listed"] == len(rows)
    assert train["num_written"] + train["num_rejected"] == train["num_listed"]
    corrupt = dict(line.split("\t") for line in (small_fixture / "corrupt.tsv").read_text().splitlines()[1:])
    rejected = {r["path"]: r["reason"] for r in train["rejects"]}
    assert rejected == {path: {"truncated": "truncated", "empty": "empty_file", "missing": "missing_file",
                               "huge": "too_large"}[kind]
                        for path, kind in corrupt.items() if kind in ("truncated", "empty", "missing", "huge")}
    repaired = {r["path"]: r["repairs"] for r in train["repaired"]}
    by_kind = {kind: path for path, kind in corrupt.items()}
    assert "format:PNG" in repaired[by_kind["png_as_jpg"]]
    assert "format:GIF" in repaired[by_kind["gif_as_jpg"]]
    assert "mode:CMYK" in repaired[by_kind["cmyk"]]
    assert "mode:L" in repaired[by_kind["grayscale"]]
    # No valid image lost: every listed path that is not a planted broken file is in a shard.
    written = {json.loads(f["json"])["path"] for f in _all_samples(small_shards, "train")}
    broken = set(rejected)
    assert written == {p for p, _ in rows} - broken
    assert sum(train["class_counts"]) == train["num_written"]
    assert sum(train["source_counts"].values()) == train["num_written"]
    assert set(manifest["splits"]) == {"train", "val", "imagenet-val"}
    assert manifest["splits"]["val"]["num_written"] == SMALL.classes * SMALL.val_per_class
    assert manifest["splits"]["imagenet-val"]["num_written"] == SMALL.classes * SMALL.imagenet_per_class


def _all_samples(out: Path, split: str):
    from data_tools.shards import read_samples

    for tar in sorted((out / split).glob("*.tar")):
        for _key, fields in read_samples(tar):
            yield fields


def test_webdataset_reads_back_keys_labels_indices_and_pixels(small_fixture: Path, small_shards: Path) -> None:
    import webdataset as wds

    manifest = json.loads((small_shards / "manifest.json").read_text())
    urls = [str(small_shards / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls", "json"):
        key, img, cls, meta = sample
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape[2] == 3
        assert cls == meta["label"]
        assert key == meta["key"]
        source = Image.open(small_fixture / meta["path"]).convert("RGB")
        assert img.shape[:2] == (source.height, source.width)  # fixture images are small: no resize
        # Re-encoding (or pass-through) keeps pixels within JPEG tolerance of the source.
        assert np.abs(img.astype(float).mean((0, 1)) - np.asarray(source, float).mean((0, 1))).max() < 3.0
        seen += 1
    assert seen == manifest["splits"]["train"]["num_written"]


def test_large_images_are_resized_to_max_side(tmp_path: Path) -> None:
    from data_tools.fixture import FixtureSpec, make_fixture

    src = tmp_path / "src"
    make_fixture(src, FixtureSpec(classes=2, train_per_class=4, val_per_class=1, imagenet_per_class=0,
                                  image_size=300, seed=1))
    convert(src, tmp_path / "out", ConvertSettings(max_side=128), workers=1, progress=False)
    for fields in _all_samples(tmp_path / "out", "train"):
        meta = json.loads(fields["json"])
        img = Image.open(io.BytesIO(fields["jpg"]))
        assert min(img.size) == 128 and (meta["width"], meta["height"]) == img.size
        assert img.mode == "RGB" and img.format == "JPEG"
        aspect = meta["orig_width"] / meta["orig_height"]
        assert abs(img.width / img.height - aspect) < 0.02


def test_dali_cpu_reader_with_our_index_files(small_shards: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((small_shards / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    paths = [str(small_shards / s["file"]) for s in shards]
    idx = [str(small_shards / s["index"]) for s in shards]
    total = manifest["splits"]["train"]["num_written"]

    @pipeline_def(batch_size=total, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpg, lbl, sid = fn.readers.webdataset(paths=paths, index_paths=idx, ext=["jpg", "lbl", "sid"],
                                              dtypes=[types.UINT8, types.INT32, types.INT32],
                                              missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, sid

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == total
    images, labels, indices = p.run()
    got = {int(np.asarray(indices[i])[0]): (int(np.asarray(labels[i])[0]), np.asarray(images[i]))
           for i in range(total)}
    expected = {}
    for fields in _all_samples(small_shards, "train"):
        (sid,) = struct.unpack("<i", fields["sid"])
        expected[sid] = (int(fields["cls"]), np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB")))
    assert got.keys() == expected.keys()
    for sid, (label, img) in expected.items():
        assert got[sid][0] == label
        assert got[sid][1].shape == img.shape
        assert np.abs(got[sid][1].astype(int) - img.astype(int)).mean() < 2.0  # two JPEG decoders


def test_index_files_equal_dali_wds2idx(small_shards: Path, tmp_path: Path) -> None:
    wds2idx = Path(sys.executable).with_name("wds2idx")
    assert wds2idx.exists(), "DALI's wds2idx is installed with nvidia-dali"
    for tar in sorted(small_shards.glob("*/*.tar")):
        theirs = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(wds2idx), str(tar), str(theirs)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == theirs.read_text(), tar
        assert build_index(tar) == theirs.read_text()


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_byte_identical_whatever_the_worker_count(small_fixture: Path, tmp_path: Path) -> None:
    settings = ConvertSettings(shard_size=25, imagenet_val=str(small_fixture / "imagenet_val"))
    convert(small_fixture, tmp_path / "w1", settings, workers=1, progress=False)
    convert(small_fixture, tmp_path / "w2", settings, workers=2, progress=False)
    one, two = _tree_bytes(tmp_path / "w1"), _tree_bytes(tmp_path / "w2")
    assert one.keys() == two.keys() and len(one) > 10
    assert [k for k in one if one[k] != two[k]] == []
    # A re-run reuses every shard and changes nothing.
    convert(small_fixture, tmp_path / "w1", settings, workers=2, progress=False)
    assert _tree_bytes(tmp_path / "w1") == one


def test_verify_passes_then_catches_flipped_byte_and_truncation(small_shards: Path, tmp_path: Path) -> None:
    ok = run_cli("verify", small_shards)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith(f"verify {small_shards}: OK")

    flipped = tmp_path / "flipped"
    shutil.copytree(small_shards, flipped)
    tar = sorted((flipped / "train").glob("*.tar"))[1]
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit somewhere inside a sample
    tar.write_bytes(bytes(data))
    bad = run_cli("verify", flipped)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "sha256" in bad.stderr

    cut = tmp_path / "cut"
    shutil.copytree(small_shards, cut)
    tar = sorted((cut / "val").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    bad = run_cli("verify", cut)
    assert bad.returncode == 1 and "FAILED" in bad.stdout
    assert "bytes, manifest says" in bad.stderr


def test_cli_errors_are_one_line_and_exit_2(small_fixture: Path, tmp_path: Path) -> None:
    missing = run_cli("convert", tmp_path / "nope", tmp_path / "out")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such directory" in missing.stderr
    assert "Traceback" not in missing.stderr

    broken = tmp_path / "broken"
    shutil.copytree(small_fixture / "info", broken / "info")
    with open(broken / "info" / "train_filelist_flickr.txt", "a") as fh:
        fh.write("flickr/q0002/xyz.jpg not-a-label\n")
    bad = run_cli("convert", broken, tmp_path / "out2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "train_filelist_flickr.txt:" in bad.stderr and "not a class id" in bad.stderr

    no_manifest = run_cli("verify", tmp_path)
    assert no_manifest.returncode == 2 and "manifest.json" in no_manifest.stderr

    bad_quality = run_cli("convert", small_fixture, tmp_path / "out3", "--quality", "0")
    assert bad_quality.returncode == 2 and "--quality" in bad_quality.stderr

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    refused = run_cli("convert", small_fixture, other)
    assert refused.returncode == 2 and "not a mopro-fast conversion" in refused.stderr
    assert (other / "keep.txt").read_text() == "user data"


def test_changed_settings_refused_without_overwrite(small_fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(small_fixture, out, ConvertSettings(shard_size=50), workers=1, progress=False)
    again = run_cli("convert", small_fixture, out, "--shard-size", "50", "--quality", "80")
    assert again.returncode == 2 and "quality: 90 -> 80" in again.stderr
    forced = run_cli("convert", small_fixture, out, "--shard-size", "50", "--quality", "80", "--overwrite",
                     "--workers", "1")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "manifest.json").read_text())["settings"]["quality"] == 80


def test_every_command_help_explains_its_options() -> None:
    for command in ("", "make-fixture", "convert", "verify", "demo", "bench", "bench convert"):
        result = run_cli(*command.split(), "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
    convert_help = run_cli("convert", "--help").stdout
    for option in ("--subset", "--classes", "--sources", "--val-dir", "--imagenet-val", "--max-side", "--quality",
                   "--shard-size", "--workers", "--max-pixels", "--seed"):
        assert option in convert_help


def test_make_fixture_bad_options_are_one_line(tmp_path: Path) -> None:
    for args, message in ((["--seed", "-1"], "seed"), (["--noise", "0.8", "--ood", "0.5"], "exceeds 1")):
        result = run_cli("make-fixture", tmp_path / "fx", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    result = run_cli("make-fixture", tmp_path / "full")
    assert result.returncode == 2 and "not empty" in result.stderr


def test_manifest_is_one_dataclass_both_ways(small_shards: Path) -> None:
    """convert writes `ManifestDoc.to_json()`; read_manifest parses it back to the same document."""
    from mopro_fast.data.manifest import ManifestDoc, SplitSummary, read_manifest

    raw = json.loads((small_shards / "manifest.json").read_text())
    doc = ManifestDoc.from_json(raw)
    assert doc.to_json() == raw and read_manifest(small_shards).doc == doc
    train = read_manifest(small_shards).split("train")
    assert isinstance(train, SplitSummary) and train.num_written == raw["splits"]["train"]["num_written"]
    assert train["shards"] == raw["splits"]["train"]["shards"] and train.get("beton") is None
    assert sum(s.samples for s in train.shards) == train.num_written == sum(train.class_counts)


# ---- settings file (--config) --------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_settings_sections_hold_the_defaults_and_the_example_loads() -> None:
    from data_tools.beton import BetonSettings
    from data_tools.convert_config import ConvertRecipe, load_convert_config

    assert ConvertRecipe().settings() == ConvertSettings() and ConvertRecipe().beton() == BetonSettings()
    example = REPO / "recipes" / "convert_webvision.yaml"
    assert example.read_text().startswith("#")
    recipe = load_convert_config(example)
    assert recipe.settings() == ConvertSettings(imagenet_val="/data/imagenet/val")
    assert recipe.beton() == BetonSettings() and recipe.run.format == "both" and recipe.run.workers is None
    resolved = yaml.safe_load(recipe.to_yaml())  # the resolved settings read back to the same
    assert load_convert_config(None, [(resolved, "in resolved")]) == recipe


def test_settings_file_errors_are_the_recipe_loader_s(tmp_path: Path) -> None:
    from data_tools.convert_config import load_convert_config
    from mopro_fast.config import ConfigError

    cases = {"shards:\n  qualty: 80\n": "shards.qualty: unknown key in {p}; did you mean shards.quality?",
             "shards:\n  workers: 2\n": "shards.workers: unknown key in {p}; did you mean run.workers?",
             "listng:\n  subset: mini\n": "listng: unknown section in {p}; did you mean listing?",
             "shards:\n  shard_size: '50'\n": "shards.shard_size: expected an integer, got str '50' in {p}",
             "listing:\n  subset: full\n": "listing.subset: 'full' is not one of webvision, mini in {p}",
             "run:\n  format: tar\n": "run.format: 'tar' is not one of wds, ffcv, both in {p}",
             "shards:\n  quality: 101\n": "shards.quality: must be in [1, 100], got 101",
             "ffcv:\n  max_resolution: 8\n": "ffcv.max_resolution: must be 0 (off) or at least 16 px, got 8",
             "listing:\n  sources: []\n": "listing.sources: names no source; null keeps them all"}
    for text, message in cases.items():
        path = tmp_path / "convert.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_convert_config(path)
        assert str(info.value) == message.format(p=path)


def test_cli_settings_file_with_options_on_top(small_fixture: Path, tmp_path: Path) -> None:
    settings = tmp_path / "convert.yaml"
    settings.write_text("shards:\n  shard_size: 60\n  quality: 80\nlisting:\n  sources: [google]\nrun:\n  workers: 2\n")
    result = run_cli("convert", small_fixture, tmp_path / "cli", "--config", settings, "--quality", "85",
                     "--workers", "1", "--progress-seconds", "0")
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "cli" / "manifest.json").read_text())["settings"]
    assert (recorded["shard_size"], recorded["quality"], recorded["sources"]) == (60, 85, ["google"])
    convert(small_fixture, tmp_path / "api", ConvertSettings(shard_size=60, quality=85, sources=("google",)),
            workers=2, progress=False)
    assert _tree_bytes(tmp_path / "cli") == _tree_bytes(tmp_path / "api")  # the same settings, the same bytes

    bad = run_cli("convert", small_fixture, tmp_path / "bad", "--config", settings, "--max-side", "8")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr == "error: shards.max_side: must be >= 16, got 8 (set by --max-side)\n"
    settings.write_text("shards:\n  shard_sise: 60\n")
    typo = run_cli("convert", small_fixture, tmp_path / "bad", "--config", settings)
    assert typo.returncode == 2 and "did you mean shards.shard_size?" in typo.stderr and typo.stderr.count("\n") == 1
    missing = run_cli("convert", small_fixture, tmp_path / "bad", "--config", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml: recipe file not found" in missing.stderr
    assert not (tmp_path / "bad").exists()
