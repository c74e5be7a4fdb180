"""Loader backend `dali` on real shards, CPU only (`device_id=None`): view statistics in both decode
modes, a demo training run, and `bench loader --quick` (the shared contract: test_loader_contract.py).

Skipped as a whole when DALI is not installed. Shards: conftest's `small_shards` (48 px images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mopro_fast.data import Batch
from mopro_fast.data.batch import denormalize_to_uint8_range
from mopro_fast.data.options import DaliOptions
from tests.conftest import demo_run, eval_loader, run_cli, train_loader

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RES = 32
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- train

@pytest.mark.parametrize("decode", ["roi", "once"])
def test_train_batches_contract_and_view_statistics(small_shards: Path, truth, decode: str) -> None:
    loader = train_loader(small_shards, "dali", options=DaliOptions(decode=decode))
    steps = loader.steps_per_epoch
    assert steps == len(truth["train"]) // 8
    params, seen = [], []
    for epoch in range(3):  # a few hundred samples; the reader wraps between epochs
        loader.set_epoch(epoch)
        batches = list(loader.iter_debug())
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


# ------------------------------------------------------------------------------------- train run, bench

def test_demo_recipe_trains_and_evaluates_with_dali(small_shards: Path, small_fixture: Path, truth,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = demo_run("dali", small_shards, small_fixture, out, epochs=1)
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
    loader = train_loader(small_shards, "dali", device="cuda", options=DaliOptions(decode=decode))
    loader.set_epoch(0)
    batch = next(iter(loader))
    for view in (batch.view_q, batch.view_k):
        assert view.is_cuda and view.dtype == torch.float32 and view.is_contiguous(memory_format=torch.channels_last)
    assert [truth["train"][i] for i in batch.index.tolist()] == batch.label.tolist()
    evals = eval_loader(small_shards, "dali", "val", resize=RES + 4, batch_size=8, device="cuda")
    assert sum(len(b) for b in evals) == len(truth["val"])
