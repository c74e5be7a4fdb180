"""Loader backend `nvjpeg` on real shards, on the CPU (the same code runs on CUDA tensors): view
statistics, samples as the torch backend, workers and prefetch, the prefetch thread's errors, a
demo training run (the shared contract: test_loader_contract.py). Shards: conftest's `small_shards`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mopro_fast.data import Batch
from mopro_fast.data.batch import denormalize_to_uint8_range
from mopro_fast.data.errors import ShardError
from mopro_fast.data.manifest import read_manifest
from mopro_fast.data.options import NvjpegOptions
from tests.conftest import demo_run, eval_loader, train_loader

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

RES = 32


def test_train_batches_contract_view_statistics_and_torch_samples(small_shards: Path, truth) -> None:
    loader = train_loader(small_shards, "nvjpeg", workers=2)
    reference = train_loader(small_shards, "torch", workers=2)
    steps = loader.steps_per_epoch
    assert steps == reference.steps_per_epoch == len(truth["train"]) // 8
    params, seen = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(loader.iter_debug())
        assert len(batches) == steps
        assert [b.index.tolist() for b, _ in batches] == [r.index.tolist() for r in reference]  # same samples
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
    size = np.concatenate([p["size"] for p, _ in params])  # H, W
    for key in ("crop_q", "crop_k"):
        crop = np.concatenate([p[key] for p, _ in params])  # y0, x0, h, w as fractions of the source
        area = crop[:, 2] * crop[:, 3]
        slack = (crop[:, 2] * size[:, 0] + crop[:, 3] * size[:, 1]) / 2 / (size[:, 0] * size[:, 1])  # side rounding
        assert (area >= 0.2 - slack - 1e-9).all() and area.max() <= 1 + 1e-9 and area.std() > 0.1
        assert (crop[:, 0] + crop[:, 2] <= 1 + 1e-9).all() and (crop[:, 1] + crop[:, 3] <= 1 + 1e-9).all()
    factors = np.concatenate([p["factors"] for p, _ in params])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and np.abs(factors[:, 3]).max() <= 0.4
    # Grayscale only on the strong view: R = G = B there, colour elsewhere.
    def spread(view: torch.Tensor) -> np.ndarray:
        pixels = denormalize_to_uint8_range(view)
        return (pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1).numpy()
    spread_k = np.concatenate([spread(b.view_k) for _, b in params])
    spread_q = np.concatenate([spread(b.view_q) for _, b in params])
    assert (spread_k[gray] <= 0.5).all()
    assert (spread_k[~gray] > 2.5).mean() > 0.9 and (spread_q > 2.5).mean() > 0.9


def test_views_do_not_depend_on_workers_or_prefetch_and_dtype(small_shards: Path) -> None:
    runs = {}
    for workers, prefetch in ((0, 0), (0, 2), (1, 1)):
        loader = train_loader(small_shards, "nvjpeg", workers=workers, prefetch=prefetch, steps_per_epoch=4)
        loader.set_epoch(1)
        runs[workers, prefetch] = list(loader)
    first = runs[0, 0]
    for batches in runs.values():
        for a, b in zip(first, batches):
            assert torch.equal(a.index, b.index) and torch.equal(a.view_q, b.view_q) and torch.equal(a.view_k, b.view_k)
    half = train_loader(small_shards, "nvjpeg", workers=0, channels_last=False,
                        options=NvjpegOptions(dtype=torch.bfloat16))
    half.set_epoch(0)
    batch = next(iter(half))
    assert batch.view_q.dtype == torch.bfloat16 and batch.view_q.is_contiguous()


def test_errors_in_the_prefetch_thread_reach_the_caller(small_shards: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(small_shards, broken)
    manifest = read_manifest(broken)
    shard = manifest.shards("train")[0].path
    # One stored JPEG zeroed in place (a truncated tar is caught earlier, by the manifest's size).
    parts = shard.with_suffix(".idx").read_text().splitlines()[1].split()
    offset, size = int(parts[parts.index("jpg") + 1]), int(parts[parts.index("jpg") + 2])
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(size))
    loader = train_loader(broken, "nvjpeg", workers=0, prefetch=2)
    loader.set_epoch(0)
    with pytest.raises(ShardError, match=f"does not decode.*of {shard}"):  # raised in the thread
        list(loader)


def test_demo_recipe_trains_and_evaluates_with_nvjpeg(small_shards: Path, small_fixture: Path, truth,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = demo_run("nvjpeg", small_shards, small_fixture, out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["val"]["samples"] == len(truth["val"])
    assert summary["eval"]["imagenet-val"]["samples"] == len(truth["imagenet-val"])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("kind") == "train" and "loss" in r]
    assert len(losses) >= 4 and all(np.isfinite(losses)) and min(losses[-2:]) < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG decode)")
def test_gpu_decode_and_views(small_shards: Path, truth) -> None:
    loader = train_loader(small_shards, "nvjpeg", device="cuda", workers=2, options=NvjpegOptions(dtype=torch.bfloat16))
    loader.set_epoch(0)
    batches = list(loader)
    for batch in batches:
        for view in (batch.view_q, batch.view_k):
            assert view.is_cuda and view.dtype == torch.bfloat16
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(view.float()).all()
        assert [truth["train"][i] for i in batch.index.tolist()] == batch.label.tolist()
    kw = dict(resize=RES + 4, batch_size=8)
    gpu = {i: x for b in eval_loader(small_shards, "nvjpeg", "val", device="cuda", **kw)
           for i, x in zip(b.index.tolist(), b.image.cpu())}
    cpu = {i: x for b in eval_loader(small_shards, "torch", "val", **kw) for i, x in zip(b.index.tolist(), b.image)}
    assert gpu.keys() == cpu.keys()
    diff = torch.stack([(gpu[i] - cpu[i]).abs() for i in cpu])  # nvJPEG's IDCT may differ from libjpeg-turbo by a level
    assert diff.mean() < 0.03 and diff.max() < 0.2
