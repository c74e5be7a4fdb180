"""Loader backend `dali` on real shards, CPU only (`device_id=None`): Batch contract, eval view vs
the torch backend, view statistics, rank sharding, a demo training run, and `bench loader --quick`.

Skipped as a whole when DALI is not installed. Shards: conftest's `small_shards` (48 px images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.shards import read_samples
from mopro_fast.data import Batch, EvalBatch, build_eval_loader, build_train_loader
from mopro_fast.data.batch import denormalize_to_uint8_range
from mopro_fast.data.manifest import read_manifest
from tests.conftest import run_cli

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RES = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def truth(small_shards: Path) -> dict[str, dict[int, int]]:
    """split -> {sid: label}, read with the writer's own tar reader."""
    out: dict[str, dict[int, int]] = {}
    manifest = read_manifest(small_shards)
    for split in manifest.splits:
        rows = {}
        for shard in manifest.shards(split):
            for _key, fields in read_samples(shard.path):
                rows[int.from_bytes(fields["sid"], "little", signed=True)] = int.from_bytes(fields["lbl"], "little",
                                                                                           signed=True)
        out[split] = rows
    return out


def train_loader(shards: Path, backend: str = "dali", **kw):
    args = dict(shards=shards, split="train", batch_size=8, resolution=RES, workers=1, shuffle_buffer=32, seed=0,
                rank=0, world_size=1, device="cpu")
    return build_train_loader(backend, **{**args, **kw})


# ------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("split", ["val", "imagenet-val"])
def test_eval_view_matches_torch_backend_and_covers_each_sample_once(small_shards: Path, truth, split: str) -> None:
    kw = dict(shards=small_shards, split=split, batch_size=4, resolution=RES, resize=36, workers=1, world_size=2,
              device="cpu")
    dali = [list(build_eval_loader("dali", rank=r, **kw)) for r in range(2)]
    torch_ = [list(build_eval_loader("torch", rank=r, **{**kw, "workers": 0})) for r in range(2)]
    got = [i for batches in dali for b in batches for i in b.index.tolist()]
    assert sorted(got) == sorted(truth[split]) and len(got) == len(set(got))  # disjoint, covering
    for batches in dali:
        for b in batches:
            assert isinstance(b, EvalBatch) and b.image.shape[1:] == (3, RES, RES) and b.image.dtype == torch.float32
            assert b.image.is_contiguous(memory_format=torch.channels_last)
            assert [truth[split][i] for i in b.index.tolist()] == b.label.tolist()
            assert b.label.dtype == b.index.dtype == torch.int64
    ours = {i: img for batches in dali for b in batches for i, img in zip(b.index.tolist(), b.image)}
    ref = {i: img for batches in torch_ for b in batches for i, img in zip(b.index.tolist(), b.image)}
    assert ours.keys() == ref.keys()
    # Normalised units: 1 level ~ 0.017. Same decoder (libjpeg-turbo), same sizes and crop offsets;
    # only the two antialiased bilinear kernels round differently (measured: mean ~0.15, max 1 level).
    diff = torch.stack([(ours[i] - ref[i]).abs() for i in ref])
    assert diff.mean() < 0.01, diff.flatten(1).mean(1)
    assert diff.max() < 0.06, diff.max()


# ------------------------------------------------------------------------------------- train

@pytest.mark.parametrize("decode", ["roi", "once"])
def test_train_batches_contract_and_view_statistics(small_shards: Path, truth, decode: str) -> None:
    loader = train_loader(small_shards, debug=True, decode=decode)
    steps = loader.steps_per_epoch
    assert steps == len(truth["train"]) // 8
    params, seen = [], []
    for epoch in range(3):  # a few hundred samples; the reader wraps between epochs
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == steps
        for b, p in batches:
            assert isinstance(b, Batch) and len(b) == 8
            for view in (b.view_q, b.view_k):
                assert view.shape == (8, 3, RES, RES) and view.dtype == torch.float32
                assert view.is_contiguous(memory_format=torch.channels_last)
            assert b.label.dtype == b.index.dtype == torch.int64
            assert [truth["train"][i] for i in b.index.tolist()] == b.label.tolist()
            if epoch == 0:
                seen += b.index.tolist()
            params.append((p, b))
    assert len(seen) == len(set(seen)) == steps * 8  # no repeat within an epoch
    n = len(params) * 8
    flip_q = np.concatenate([p["flip_q"] for p, _ in params])
    flip_k = np.concatenate([p["flip_k"] for p, _ in params])
    gray = np.concatenate([p["gray"] for p, _ in params])
    for rate, p in ((flip_q.mean(), 0.5), (flip_k.mean(), 0.5), (gray.mean(), 0.2)):
        assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (rate, p, n)
    for key in ("crop_q", "crop_k") if decode == "once" else ():  # ROI decoding keeps its windows inside
        crop = np.concatenate([p[key] for p, _ in params])  # y0, x0, h, w as fractions of the source
        area = crop[:, 2] * crop[:, 3]
        assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-6 and area.std() > 0.1
        assert (crop[:, 0] + crop[:, 2] <= 1 + 1e-5).all() and (crop[:, 1] + crop[:, 3] <= 1 + 1e-5).all()
    # Grayscale only on the strong view, R = G = B there (up to the colour op's rounding).
    spread_k = torch.cat([denormalize_to_uint8_range(b.view_k).amax(1) - denormalize_to_uint8_range(b.view_k).amin(1)
                          for _, b in params]).flatten(1).amax(1).numpy()
    spread_q = torch.cat([denormalize_to_uint8_range(b.view_q).amax(1) - denormalize_to_uint8_range(b.view_q).amin(1)
                          for _, b in params]).flatten(1).amax(1).numpy()
    assert (spread_k[gray] <= 2.5).all()
    assert (spread_k[~gray] > 2.5).mean() > 0.9 and (spread_q > 2.5).mean() > 0.9


def test_two_ranks_disjoint_equal_counts_and_resolution(small_shards: Path, truth) -> None:
    per_rank = []
    for rank in range(2):
        loader = train_loader(small_shards, rank=rank, world_size=2)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == len(truth["train"]) // 16
        per_rank.append([i for b in batches for i in b.index.tolist()])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b and len(a) == len(per_rank[0]) and len(b) == len(per_rank[1])
    assert len(a | b) >= len(truth["train"]) - 16 and a | b <= set(truth["train"])
    loader = train_loader(small_shards, steps_per_epoch=3)
    loader.set_epoch(1, start_step=1)
    assert len(list(loader)) == 2 == len(loader)
    loader.set_resolution(24)
    loader.set_epoch(2)
    assert next(iter(loader)).view_k.shape == (8, 3, 24, 24)


# ------------------------------------------------------------------------------------- train run, bench

def test_demo_recipe_trains_and_evaluates_with_dali(small_shards: Path, small_fixture: Path, truth,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {"data.shards": small_shards, "data.truth": small_fixture / "truth.tsv", "run.out": out,
                 "model.small_stem": "false", "model.proj_hidden": 64, "mopro.queue_size": 64,
                 "loader.resolution": 32, "loader.eval_resize": 36, "loader.eval_resolution": 32,
                 "loader.batch_size": 32, "loader.workers": 1, "loader.backend": "dali", "schedule.epochs": 1,
                 "schedule.warmup_epochs": 0, "mopro.proto_start_epoch": 1, "mopro.start_clean_epoch": 1,
                 "optim.lr": 0.05, "optim.base_batch": 32, "run.log_every": 2}
    result = run_cli("train", REPO / "recipes" / "demo_cpu.yaml", *[f"{k}={v}" for k, v in overrides.items()],
                     cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["val"]["samples"] == len(truth["val"])
    assert summary["eval"]["imagenet-val"]["samples"] == len(truth["imagenet-val"])


def test_bench_loader_quick_json() -> None:
    result = run_cli("bench", "loader", "--quick", "--backend", "torch", "--backend", "dali", "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert set(out["img_s"]) == {"torch", "dali"} and all(v > 0 for v in out["img_s"].values())
    assert out["ratio_dali_torch"] > 0 and "env" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the mixed nvJPEG pipeline)")
@pytest.mark.parametrize("decode", ["once", "roi"])
def test_mixed_pipeline_on_gpu(small_shards: Path, truth, decode: str) -> None:
    loader = train_loader(small_shards, device="cuda", decode=decode)
    loader.set_epoch(0)
    batch = next(iter(loader))
    for view in (batch.view_q, batch.view_k):
        assert view.is_cuda and view.dtype == torch.float32 and view.is_contiguous(memory_format=torch.channels_last)
    assert [truth["train"][i] for i in batch.index.tolist()] == batch.label.tolist()
    evals = build_eval_loader("dali", shards=small_shards, split="val", batch_size=8, resolution=RES, resize=RES + 4,
                              workers=1, rank=0, world_size=1, device="cuda")
    assert sum(len(b) for b in evals) == len(truth["val"])
