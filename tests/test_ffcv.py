"""FFCV: `convert --format ffcv|both` (.beton = the shards' records and images) and the `ffcv` loader
backend on CPU (eval view precision per storage mode, two-view statistics, a demo training run,
`bench loader`; the shared contract: test_loader_contract.py).

Skipped as a whole only when ffcv cannot be imported (`make install` and `.ci/run` install it).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="ffcv is not importable: apt-get install pkg-config libopencv-dev "
                                   "libturbojpeg0-dev, then pip install -e .[ffcv] (make install does both as root)")

from data_tools.beton import BetonSettings  # noqa: E402
from data_tools.convert import ConvertSettings, convert  # noqa: E402
from data_tools.shards import read_samples  # noqa: E402
from mopro_fast.data import Batch  # noqa: E402
from mopro_fast.data.batch import denormalize_to_uint8_range  # noqa: E402
from mopro_fast.data.manifest import ManifestError, read_manifest  # noqa: E402
from tests.conftest import demo_run, eval_loader, run_cli, train_loader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RES = 32
REPO = Path(__file__).resolve().parents[1]


def _settings(small_fixture: Path) -> ConvertSettings:  # conftest's small_shards settings
    return ConvertSettings(shard_size=40, imagenet_val=str(small_fixture / "imagenet_val"))


def _beton_rows(path: Path) -> dict[str, np.ndarray]:
    """The .beton read with FFCV's own Reader: label, index, mode, height, width and each payload."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    assert list(reader.handlers) == ["image", "label", "index"]
    meta = reader.metadata
    data = np.fromfile(path, dtype=np.uint8)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    ptrs = meta["f0"]["data_ptr"].tolist()
    return {"label": meta["f1"], "index": meta["f2"], "mode": meta["f0"]["mode"], "height": meta["f0"]["height"],
            "width": meta["f0"]["width"], "payload": [data[p:p + sizes[p]] for p in ptrs]}


def _shard_rows(shards: Path, split: str) -> list[tuple[int, int, bytes, dict]]:
    return [(int.from_bytes(f["lbl"], "little", signed=True), int.from_bytes(f["sid"], "little", signed=True),
             f["jpg"], json.loads(f["json"]))
            for s in read_manifest(shards).shards(split) for _key, f in read_samples(s.path)]


# ------------------------------------------------------------------------------------ convert

def test_beton_holds_the_shards_records_images_and_rejects(ffcv_shards: Path, small_shards: Path) -> None:
    from PIL import Image

    manifest = json.loads((ffcv_shards / "manifest.json").read_text())
    wds_only = json.loads((small_shards / "manifest.json").read_text())
    assert manifest["formats"] == ["wds", "ffcv"] and manifest["ffcv"]["settings"] == asdict(BetonSettings())
    # The wds output is untouched: same manifest once the FFCV keys are dropped, byte-identical shards.
    stripped = {k: v for k, v in manifest.items() if k not in ("formats", "ffcv")}
    stripped["splits"] = {n: {k: v for k, v in s.items() if k != "beton"} for n, s in manifest["splits"].items()}
    assert stripped == wds_only
    for split, info in wds_only["splits"].items():
        for shard in info["shards"]:
            for key in ("file", "index"):
                assert (ffcv_shards / shard[key]).read_bytes() == (small_shards / shard[key]).read_bytes()
        rows, shard_rows = _beton_rows(ffcv_shards / f"{split}.beton"), _shard_rows(small_shards, split)
        assert manifest["splits"][split]["beton"]["samples"] == len(shard_rows) == info["num_written"]
        assert rows["label"].tolist() == [r[0] for r in shard_rows]
        assert rows["index"].tolist() == [r[1] for r in shard_rows]
        assert rows["width"].tolist() == [r[3]["width"] for r in shard_rows]
        assert rows["height"].tolist() == [r[3]["height"] for r in shard_rows]
        for mode, payload, (_l, _i, jpg, meta) in zip(rows["mode"], rows["payload"], shard_rows):
            if mode == 0:  # JPEG: the shard's very bytes
                assert payload.tobytes() == jpg
            else:  # raw: the shard's JPEG decoded
                pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
                assert np.array_equal(payload.reshape(meta["height"], meta["width"], 3), pixels)
        counts = manifest["splits"][split]["beton"]
        assert counts["jpg"] == int((rows["mode"] == 0).sum()) and counts["raw"] == int((rows["mode"] == 1).sum())
    train = manifest["splits"]["train"]["beton"]
    assert 0 < train["jpg"] < train["samples"]  # proportion 0.5: both kinds


def test_ffcv_only_resumes_and_formats_switch(small_fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    settings = _settings(small_fixture)
    manifest = convert(small_fixture, out, settings, workers=1, progress=False, fmt="ffcv")
    assert manifest["formats"] == ["ffcv"] and all(s["shards"] == [] for s in manifest["splits"].values())
    assert not (out / "train").exists() and not (out / ".state" / "work").exists()  # work shards are gone
    with pytest.raises(ManifestError, match="ffcv"):
        read_manifest(out).shards("train")
    betons = {p.name: p.read_bytes() for p in out.glob("*.beton")}
    assert sorted(betons) == ["imagenet-val.beton", "train.beton", "val.beton"]
    stamp = (out / "train.beton").stat().st_mtime_ns
    assert convert(small_fixture, out, settings, workers=1, progress=False, fmt="ffcv") == manifest
    assert (out / "train.beton").stat().st_mtime_ns == stamp  # current: reused, nothing converted
    # A kill while writing: a partial temporary .beton, no final one, a shard never finished.
    (out / "train.beton").rename(out / "train.beton.tmp-999")
    (out / ".state" / "train-000002.json").unlink()
    assert convert(small_fixture, out, settings, workers=1, progress=False, fmt="ffcv") == manifest
    assert {p.name: p.read_bytes() for p in out.glob("*.beton")} == betons
    assert not list(out.rglob("*.tmp-*"))
    # Other FFCV options: only the .beton is rewritten (no --overwrite needed); shards appear with "both".
    both = convert(small_fixture, out, settings, workers=1, progress=False, fmt="both",
                   beton=BetonSettings(write_mode="raw"))
    assert both["splits"]["train"]["beton"]["raw"] == both["splits"]["train"]["num_written"]
    assert len(list((out / "train").glob("*.tar"))) == len(both["splits"]["train"]["shards"]) > 0
    wds = convert(small_fixture, out, settings, workers=1, progress=False, fmt="wds")
    assert "formats" not in wds and not list(out.glob("*.beton"))


def test_convert_cli_format_flags(small_fixture: Path, tmp_path: Path) -> None:
    bad = run_cli("convert", small_fixture, tmp_path / "bad", "--format", "ffcv", "--ffcv-compress-probability", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--ffcv-compress-probability" in bad.stderr
    out = tmp_path / "out"
    ok = run_cli("convert", small_fixture, out, "--format", "both", "--ffcv-write-mode", "jpg", "--shard-size", "100",
                 "--workers", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train.beton (" in ok.stdout and " 0 raw)" in ok.stdout
    assert json.loads((out / "manifest.json").read_text())["ffcv"]["settings"]["write_mode"] == "jpg"


# ------------------------------------------------------------------------------------- eval

def test_eval_view_precision_per_storage_mode(ffcv_shards: Path) -> None:
    ours = {i: img for b in eval_loader(ffcv_shards, "ffcv", "val") for i, img in zip(b.index.tolist(), b.image)}
    ref = {i: img for b in eval_loader(ffcv_shards, "torch", "val", workers=0)
           for i, img in zip(b.index.tolist(), b.image)}
    rows = _beton_rows(ffcv_shards / "val.beton")
    raw = {i for i, m in zip(rows["index"].tolist(), rows["mode"].tolist()) if m == 1}
    assert ours.keys() == ref.keys() and 0 < len(raw) < len(ref)
    # Normalised units: 1 level ~ 0.017. Raw-stored images: the same pixels and our antialiased
    # bilinear kernel, so only rounding differs (<= 1 level). JPEG-stored ones: FFCV decodes with
    # libjpeg-turbo's fast integer DCT, torchvision with the accurate one (measured: mean ~0.02).
    d_raw = torch.stack([(ours[i] - ref[i]).abs() for i in sorted(raw)])
    d_jpg = torch.stack([(ours[i] - ref[i]).abs() for i in sorted(set(ref) - raw)])
    assert d_raw.max() < 0.02, d_raw.max()
    assert d_jpg.mean() < 0.04 and d_jpg.max() < 0.35, (d_jpg.mean(), d_jpg.max())


# ------------------------------------------------------------------------------------- train

def test_train_batches_contract_and_view_statistics(ffcv_shards: Path) -> None:
    truth = dict(zip(*(_beton_rows(ffcv_shards / "train.beton")[k].tolist() for k in ("index", "label"))))
    loader = train_loader(ffcv_shards, "ffcv")
    steps = loader.steps_per_epoch
    assert steps == len(truth) // 8
    params, seen = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader.iter_debug())
        assert len(batches) == steps
        for b, p in batches:
            assert isinstance(b, Batch) and len(b) == 8
            for view in (b.view_q, b.view_k):
                assert view.shape == (8, 3, RES, RES) and view.dtype == torch.float32
                assert view.is_contiguous(memory_format=torch.channels_last)
            assert b.label.dtype == b.index.dtype == torch.int64
            assert [truth[i] for i in b.index.tolist()] == b.label.tolist()
            if epoch == 0:
                seen += b.index.tolist()
            params.append((p, b))
    assert len(seen) == len(set(seen)) == steps * 8  # no repeat within an epoch
    n = len(params) * 8
    flip_q, flip_k, gray = (np.concatenate([p[k] for p, _ in params]) for k in ("flip_q", "flip_k", "gray"))
    for rate, p in ((flip_q.mean(), 0.5), (flip_k.mean(), 0.5), (gray.mean(), 0.2)):
        assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (rate, p, n)
    for key in ("crop_q", "crop_k"):
        crop = np.concatenate([p[key] for p, _ in params])  # top, left, h, w as fractions of the source
        area = crop[:, 2] * crop[:, 3]
        # Boxes are whole pixels (torchvision's rounding): on ~50 px sources the area may fall a few % below 0.2.
        assert area.min() >= 0.2 - 0.05 and area.max() <= 1 + 1e-9 and area.std() > 0.1
        assert (crop[:, 0] + crop[:, 2] <= 1 + 1e-9).all() and (crop[:, 1] + crop[:, 3] <= 1 + 1e-9).all()
    factors = torch.cat([p["color"].factors for p, _ in params])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and factors[:, 3].abs().max() <= 0.4
    # Grayscale only on the strong view, R = G = B there (the colour ops keep it).
    def spread(view):
        v = denormalize_to_uint8_range(view)
        return (v.amax(1) - v.amin(1)).flatten(1).amax(1)
    spread_k = torch.cat([spread(b.view_k) for _, b in params]).numpy()
    spread_q = torch.cat([spread(b.view_q) for _, b in params]).numpy()
    assert (spread_k[gray] <= 0.01).all()
    assert (spread_k[~gray] > 2.5).mean() > 0.9 and (spread_q > 2.5).mean() > 0.9


def test_host_colour_pass_equals_the_batched_torch_ops() -> None:
    """ffcv_color's compiled per-sample pass (the CPU path) against views.color + normalize_uint8 (the
    batched tensor ops it replaces on the CPU, kept on a GPU): same parameters, float rounding apart."""
    from mopro_fast.data.batch import normalize_uint8
    from mopro_fast.data.ffcv_color import finish_on_host
    from mopro_fast.views.color import apply_strong_color, sample_strong_color

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 24, 20, 16, 3), dtype=np.uint8)  # two views, B = 24, HWC
    images[:, 5, :4] = images[:, 5, :4, :, :1]  # grey rows
    images[:, 6, :, :, 1] = images[:, 6, :, :, 0]  # channel ties (the hue's edge cases)
    color = sample_strong_color(24, torch.Generator().manual_seed(3))
    assert color.gray.any() and (~color.gray).any() and len({tuple(o) for o in color.order.tolist()}) > 5
    q, k = finish_on_host(images[0], images[1], color.gray.numpy(), color.factors.numpy(), color.order.numpy())
    as_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # noqa: E731
    ref_q = normalize_uint8(as_nchw(images[0]))
    ref_k = normalize_uint8(apply_strong_color(as_nchw(images[1]).float(), color))
    assert torch.equal(as_nchw(q), ref_q)
    assert float((as_nchw(k) - ref_k).abs().max()) < 1e-4  # normalised units: 1e-4 x 255 x 0.225 < 0.01 levels


# ------------------------------------------------------------------------------------- train run, bench

def test_demo_recipe_trains_and_evaluates_with_ffcv(ffcv_shards: Path, small_fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = demo_run("ffcv", ffcv_shards, small_fixture, out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    manifest = read_manifest(ffcv_shards)
    assert summary["eval"]["val"]["samples"] == manifest.num_written("val")
    assert summary["eval"]["imagenet-val"]["samples"] == manifest.num_written("imagenet-val")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in records if r["kind"] == "train"} == {0, 1}


def test_shards_without_beton_give_one_line(small_shards: Path) -> None:
    with pytest.raises(ManifestError, match="--format ffcv or --format both"):
        train_loader(small_shards, "ffcv")
    with pytest.raises(ManifestError, match="--format ffcv or --format both"):
        eval_loader(small_shards, "ffcv", "val")


def test_bench_loader_ffcv_joins_the_comparison() -> None:
    result = run_cli("bench", "loader", "--quick", "--backend", "torch", "--backend", "ffcv", "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert set(out["img_s"]) == set(out["first_batch_s"]) == {"torch", "ffcv"}
    assert all(v > 0 for v in out["img_s"].values()) and all(v > 0 for v in out["first_batch_s"].values())
    assert out["ratio_ffcv_torch"] > 0 and out["env"]["ffcv"] == "1.0.2"
