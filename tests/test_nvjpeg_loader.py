"""Loader backend `nvjpeg` on real shards, on the CPU (the same code runs on CUDA tensors): Batch
contract, eval view vs the torch backend, view statistics, samples as the torch backend, ranks,
prefetch thread, a demo training run. Shards: conftest's `small_shards` (48 px images).
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
from mopro_fast.data.errors import ShardError
from mopro_fast.data.manifest import read_manifest
from tests.conftest import run_cli

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

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


def train_loader(shards: Path, backend: str = "nvjpeg", **kw):
    args = dict(shards=shards, split="train", batch_size=8, resolution=RES, workers=1, shuffle_buffer=32, seed=0,
                rank=0, world_size=1, device="cpu")
    return build_train_loader(backend, **{**args, **kw})


@pytest.mark.parametrize("split", ["val", "imagenet-val"])
def test_eval_view_matches_torch_backend_and_covers_each_sample_once(small_shards: Path, truth, split: str) -> None:
    kw = dict(shards=small_shards, split=split, batch_size=4, resolution=RES, resize=36, workers=1, world_size=2,
              device="cpu")
    ours_batches = [list(build_eval_loader("nvjpeg", rank=r, **kw)) for r in range(2)]
    ref_batches = [list(build_eval_loader("torch", rank=r, **{**kw, "workers": 0})) for r in range(2)]
    got = [i for batches in ours_batches for b in batches for i in b.index.tolist()]
    assert sorted(got) == sorted(truth[split]) and len(got) == len(set(got))  # disjoint, covering
    for batches in ours_batches:
        for b in batches:
            assert isinstance(b, EvalBatch) and b.image.shape[1:] == (3, RES, RES) and b.image.dtype == torch.float32
            assert b.image.is_contiguous(memory_format=torch.channels_last)
            assert [truth[split][i] for i in b.index.tolist()] == b.label.tolist()
    ours = {i: img for batches in ours_batches for b in batches for i, img in zip(b.index.tolist(), b.image)}
    ref = {i: img for batches in ref_batches for b in batches for i, img in zip(b.index.tolist(), b.image)}
    assert ours.keys() == ref.keys()
    # Normalised units: 1 level ~ 0.017. Same decoder (libjpeg-turbo on a CPU), same filter, sizes and
    # offsets; the torch backend's uint8 kernel rounds its two passes (measured: mean ~0.3, max 1 level).
    diff = torch.stack([(ours[i] - ref[i]).abs() for i in ref])
    assert diff.mean() < 0.01, diff.flatten(1).mean(1)
    assert diff.max() < 0.02, diff.max()


def test_train_batches_contract_view_statistics_and_torch_samples(small_shards: Path, truth) -> None:
    loader = train_loader(small_shards, debug=True, workers=2)
    reference = train_loader(small_shards, backend="torch", workers=2)
    steps = loader.steps_per_epoch
    assert steps == reference.steps_per_epoch == len(truth["train"]) // 8
    params, seen = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(loader)
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


def test_views_do_not_depend_on_workers_or_prefetch_and_resume_mid_epoch(small_shards: Path) -> None:
    runs = {}
    for workers, prefetch in ((0, 0), (0, 2), (1, 1)):
        loader = train_loader(small_shards, workers=workers, prefetch=prefetch, steps_per_epoch=4)
        loader.set_epoch(1)
        runs[workers, prefetch] = list(loader)
    first = runs[0, 0]
    for batches in runs.values():
        for a, b in zip(first, batches):
            assert torch.equal(a.index, b.index) and torch.equal(a.view_q, b.view_q) and torch.equal(a.view_k, b.view_k)
    loader = train_loader(small_shards, workers=0, steps_per_epoch=4)
    loader.set_epoch(1, start_step=2)
    tail = list(loader)
    assert len(tail) == 2 == len(loader)
    assert all(torch.equal(a.view_k, b.view_k) and torch.equal(a.index, b.index) for a, b in zip(first[2:], tail))
    loader.set_epoch(2)
    other = next(iter(loader))
    assert not torch.equal(other.view_q, first[0].view_q)  # epochs differ
    loader.set_resolution(24)
    loader.set_epoch(2)
    assert next(iter(loader)).view_k.shape == (8, 3, 24, 24)
    half = train_loader(small_shards, workers=0, dtype=torch.bfloat16, channels_last=False)
    half.set_epoch(0)
    batch = next(iter(half))
    assert batch.view_q.dtype == torch.bfloat16 and batch.view_q.is_contiguous()


def test_two_ranks_disjoint_equal_counts(small_shards: Path, truth) -> None:
    per_rank = []
    for rank in range(2):
        loader = train_loader(small_shards, rank=rank, world_size=2, workers=0)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == len(truth["train"]) // 16
        per_rank.append([i for b in batches for i in b.index.tolist()])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b and len(a) == len(per_rank[0]) and len(b) == len(per_rank[1])


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
    loader = train_loader(broken, workers=0, prefetch=2)
    loader.set_epoch(0)
    with pytest.raises(ShardError, match=f"does not decode.*of {shard}"):  # raised in the thread
        list(loader)


def test_demo_recipe_trains_and_evaluates_with_nvjpeg(small_shards: Path, small_fixture: Path, truth,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {"data.shards": small_shards, "data.truth": small_fixture / "truth.tsv", "run.out": out,
                 "model.small_stem": "false", "model.proj_hidden": 64, "mopro.queue_size": 64,
                 "loader.resolution": 32, "loader.eval_resize": 36, "loader.eval_resolution": 32,
                 "loader.batch_size": 32, "loader.workers": 1, "loader.backend": "nvjpeg", "schedule.epochs": 2,
                 "schedule.warmup_epochs": 0, "mopro.proto_start_epoch": 1, "mopro.start_clean_epoch": 1,
                 "optim.lr": 0.05, "optim.base_batch": 32, "run.log_every": 2}
    result = run_cli("train", REPO / "recipes" / "demo_cpu.yaml", *[f"{k}={v}" for k, v in overrides.items()],
                     cwd=REPO)
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
    loader = train_loader(small_shards, device="cuda", dtype=torch.bfloat16, workers=2)
    loader.set_epoch(0)
    batches = list(loader)
    for batch in batches:
        for view in (batch.view_q, batch.view_k):
            assert view.is_cuda and view.dtype == torch.bfloat16
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(view.float()).all()
        assert [truth["train"][i] for i in batch.index.tolist()] == batch.label.tolist()
    kw = dict(shards=small_shards, split="val", batch_size=8, resolution=RES, resize=RES + 4, workers=1, rank=0,
              world_size=1)
    gpu = {i: x for b in build_eval_loader("nvjpeg", device="cuda", **kw)
           for i, x in zip(b.index.tolist(), b.image.cpu())}
    cpu = {i: x for b in build_eval_loader("torch", device="cpu", **kw) for i, x in zip(b.index.tolist(), b.image)}
    assert gpu.keys() == cpu.keys()
    diff = torch.stack([(gpu[i] - cpu[i]).abs() for i in cpu])  # nvJPEG's IDCT may differ from libjpeg-turbo by a level
    assert diff.mean() < 0.03 and diff.max() < 0.2
