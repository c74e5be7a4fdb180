"""One contract for every installed loader backend (torch, dali CPU, ffcv, nvjpeg CPU): what
base.TrainLoaderBase / EvalLoaderBase promise, checked on the same small data.

Shapes, float32, the channels_last flag, labels and indices as the shards hold them, equal batch
counts and disjoint samples over two ranks (simulated in one process), the eval view against the
torch backend within each backend's tolerance, exact resume where a backend declares it, the
resolution schedule, and the shared debug keys. Backends that cannot be imported are skipped.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from mopro_fast.data import BACKENDS, Batch, EvalBatch
from tests.conftest import eval_loader, train_loader

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

RES = 32
# Eval view vs the torch backend in normalised units (1 level ~ 0.017): (max mean, max abs).
# dali: another antialiased bilinear kernel (<= 1 level); nvjpeg: float, not uint8, rounding;
# ffcv: JPEG-stored images decoded with libjpeg-turbo's fast integer DCT.
EVAL_TOLERANCE = {"torch": (0.0, 0.0), "dali": (0.01, 0.06), "nvjpeg": (0.01, 0.02), "ffcv": (0.04, 0.35)}


def _available(name: str):
    try:
        importlib.import_module(BACKENDS[name][0])
    except ImportError:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"backend {name} is not importable here"))
    return name


ALL = [_available(name) for name in ("torch", "dali", "ffcv", "nvjpeg")]


@pytest.fixture(scope="module")
def shards(request) -> Path:
    """Shards with a .beton too when ffcv is installed (the same samples: the other backends read the tars)."""
    try:
        importlib.import_module("ffcv")
    except ImportError:
        return request.getfixturevalue("small_shards")
    return request.getfixturevalue("ffcv_shards")


def _check_images(images: torch.Tensor, batch: int, res: int, channels_last: bool) -> None:
    assert images.shape == (batch, 3, res, res) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.isfinite(images).all()


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.view_q, b.view_q), (a.view_k, b.view_k), (a.label, b.label),
                                              (a.index, b.index)))


@pytest.mark.parametrize("backend", ALL)
def test_train_batches_ranks_and_layout(backend: str, shards: Path, truth) -> None:
    per_rank = []
    for rank in range(2):  # rank 0 channels-last, rank 1 contiguous: the flag is honoured either way
        loader = train_loader(shards, backend, rank=rank, world_size=2, channels_last=rank == 0)
        assert loader.steps_per_epoch == len(truth["train"]) // 16
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == len(loader)
        for b in batches:
            assert isinstance(b, Batch) and len(b) == 8
            _check_images(b.view_q, 8, RES, rank == 0)
            _check_images(b.view_k, 8, RES, rank == 0)
            assert b.label.dtype == b.index.dtype == torch.int64
            assert [truth["train"][i] for i in b.index.tolist()] == b.label.tolist()
            assert not torch.equal(b.view_q, b.view_k)
        per_rank.append([i for b in batches for i in b.index.tolist()])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(per_rank[0]) and len(b) == len(per_rank[1])  # no sample twice within an epoch
    assert not a & b  # ranks disjoint


@pytest.mark.parametrize("backend", ALL)
def test_eval_view_matches_the_torch_backend(backend: str, shards: Path, truth) -> None:
    ours = [eval_loader(shards, backend, "val", rank=r, world_size=2) for r in range(2)]
    ref = {i: img for r in range(2) for b in eval_loader(shards, "torch", "val", rank=r, world_size=2, workers=0)
           for i, img in zip(b.index.tolist(), b.image)}
    got = {}
    for loader in ours:
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert isinstance(b, EvalBatch)
            _check_images(b.image, len(b), RES, True)
            assert [truth["val"][i] for i in b.index.tolist()] == b.label.tolist()
            assert b.label.dtype == b.index.dtype == torch.int64
            assert not set(b.index.tolist()) & set(got)
            got.update(zip(b.index.tolist(), b.image))
    assert sorted(got) == sorted(truth["val"]) == sorted(ref)  # every sample once over the ranks
    diff = torch.stack([(got[i] - ref[i]).abs() for i in ref])
    mean, worst = EVAL_TOLERANCE[backend]
    assert diff.mean() <= mean and diff.max() <= worst, (diff.mean(), diff.max())


@pytest.mark.parametrize("backend", ALL)
def test_resume_replay_resolution_and_debug_keys(backend: str, shards: Path) -> None:
    loader = train_loader(shards, backend, steps_per_epoch=4)
    for flag in ("exact_resume", "resolution_without_rebuild", "debug_params"):
        assert isinstance(getattr(loader, flag), bool), flag
    loader.set_epoch(1)
    if loader.debug_params:
        pairs = list(loader.iter_debug())
        full = [b for b, _ in pairs]
        for b, p in pairs:
            assert {"flip_q", "flip_k", "gray", "crop_q", "crop_k"} <= set(p)
            assert p["flip_q"].shape == p["gray"].shape == (8,) and p["crop_q"].shape == (8, 4)
    else:
        full = list(loader)
    assert len(full) == 4
    if loader.exact_resume:
        loader.set_epoch(1, start_step=2)
        tail = list(loader)
        assert len(tail) == 2 == len(loader) and all(_same(a, b) for a, b in zip(full[2:], tail))
        again = train_loader(shards, backend, steps_per_epoch=4)  # a fresh loader replays the epoch
        again.set_epoch(1)
        assert _same(next(iter(again)), full[0])
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader)).view_q, full[0].view_q)  # epochs differ
    loader.set_resolution(24)  # the schedule's call, at an epoch's start
    loader.set_epoch(2)
    b = next(iter(loader))
    _check_images(b.view_q, 8, 24, True)
    _check_images(b.view_k, 8, 24, True)
