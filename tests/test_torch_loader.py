"""Loader backend `torch` on real shards: Batch contract, sample plan, determinism, views, eval view.

CPU only, small images (RES px) and tiny batches; the shards come from conftest's `small_shards`
(6 classes, a few uneven train shards of <= 40 samples, planted broken files already rejected).
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image

from data_tools.shards import read_samples
from mopro_fast.data import BackendUnavailable, Batch, EvalBatch, build_eval_loader, build_train_loader
from mopro_fast.data.batch import denormalize_to_uint8_range
from mopro_fast.data.manifest import ManifestError, read_manifest
from mopro_fast.data.stream import eval_window, pieces, shard_order, train_window
from mopro_fast.data.torch_loader import TorchTrainLoader, decode
from mopro_fast.views.cpu import CROP_RATIO, CROP_SCALE, apply_view, eval_size, eval_view, two_views

RES = 32
# torchvision 0.29 deprecates its JPEG decoder in favour of torchcodec; the loader uses it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def truth(small_shards: Path) -> dict[str, dict[int, tuple[int, bytes]]]:
    """split -> {sid: (label from .lbl, JPEG bytes)}, read with the writer's own tar reader."""
    out: dict[str, dict[int, tuple[int, bytes]]] = {}
    manifest = read_manifest(small_shards)
    for split in manifest.splits:
        rows = {}
        for shard in manifest.shards(split):
            for _key, fields in read_samples(shard.path):
                sid = int.from_bytes(fields["sid"], "little", signed=True)
                rows[sid] = (int.from_bytes(fields["lbl"], "little", signed=True), fields["jpg"])
        out[split] = rows
    return out


def train_loader(shards: Path, **kw) -> TorchTrainLoader:
    args = dict(shards=shards, split="train", batch_size=4, resolution=RES, workers=0, shuffle_buffer=16, seed=0,
                rank=0, world_size=1, device="cpu")
    return build_train_loader("torch", **{**args, **kw})


def epoch(loader: TorchTrainLoader, e: int, start_step: int = 0) -> list[Batch]:
    loader.set_epoch(e, start_step=start_step)
    return list(loader)


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.index.tolist()]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.view_q, y.view_q) and torch.equal(x.view_k, y.view_k)
                                    and torch.equal(x.label, y.label) and torch.equal(x.index, y.index)
                                    for x, y in zip(a, b))


# ----------------------------------------------------------------------------- batch contract

def test_batch_contract_and_labels_match_shards(small_shards: Path, truth) -> None:
    loader = train_loader(small_shards, steps_per_epoch=3)
    batches = epoch(loader, 0)
    assert len(batches) == 3 == len(loader)
    for b in batches:
        assert isinstance(b, Batch)
        for view in (b.view_q, b.view_k):
            assert view.shape == (4, 3, RES, RES) and view.dtype == torch.float32 and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=torch.channels_last)
            # Normalised uint8 pixels: un-normalising gives integers in [0, 255].
            raw = denormalize_to_uint8_range(view)
            assert raw.min() > -0.01 and raw.max() < 255.01
            assert (raw - raw.round()).abs().max() < 1e-3
        assert b.label.dtype == b.index.dtype == torch.int64 and b.label.shape == b.index.shape == (4,)
        for sid, label in zip(b.index.tolist(), b.label.tolist()):
            assert truth["train"][sid][0] == label
        assert not torch.equal(b.view_q, b.view_k)


def test_one_rank_epoch_covers_every_sample(small_shards: Path, truth) -> None:
    n = len(truth["train"])
    # Steps that cover the data: every sample at least once, the Q - N extras from the next pass.
    steps = -(-n // 8)
    seen = Counter(indices(epoch(train_loader(small_shards, batch_size=8, steps_per_epoch=steps), 2)))
    assert set(seen) == set(truth["train"]) and sum(seen.values()) == 8 * steps and max(seen.values()) <= 2
    # Default steps (N // B): no sample twice within an epoch.
    loader = train_loader(small_shards, batch_size=8, workers=2)
    assert loader.steps_per_epoch == n // 8
    got = indices(epoch(loader, 0))
    assert len(got) == len(set(got)) == 8 * (n // 8)


@pytest.mark.parametrize("world, workers", [(2, 0), (3, 2)])
def test_ranks_get_equal_batches_and_disjoint_samples(small_shards: Path, world: int, workers: int) -> None:
    # (3, 2): 6 (rank, worker) slots over 5 uneven shards, so some shards are split between slots.
    per_rank = [epoch(train_loader(small_shards, rank=r, world_size=world, workers=workers), 1) for r in range(world)]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1 and counts.pop() == train_loader(small_shards, world_size=world).steps_per_epoch
    seen = [set(indices(batches)) for batches in per_rank]
    assert all(len(s) == len(indices(b)) for s, b in zip(seen, per_rank))
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2))


def test_steps_beyond_data_still_give_every_rank_its_batches(small_shards: Path) -> None:
    for rank in range(2):
        assert len(epoch(train_loader(small_shards, rank=rank, world_size=2, workers=2, steps_per_epoch=30), 0)) == 30


# ------------------------------------------------------------------------------ determinism

def test_same_seed_epoch_rank_is_bit_identical_and_epochs_differ(small_shards: Path) -> None:
    kw = dict(rank=1, world_size=2, workers=2, steps_per_epoch=6)
    a, b = train_loader(small_shards, **kw), train_loader(small_shards, **kw)
    first = epoch(a, 3)
    assert same(first, epoch(b, 3))
    assert same(first, epoch(a, 3))  # iterating again replays the epoch
    other = epoch(a, 4)
    assert indices(other) != indices(first)
    assert not torch.equal(other[0].view_q, first[0].view_q)
    assert indices(epoch(train_loader(small_shards, seed=1, **kw), 3)) != indices(first)
    # workers=0 (main process) and workers=1 run the same single slot.
    assert same(epoch(train_loader(small_shards, workers=0, steps_per_epoch=4), 0),
                epoch(train_loader(small_shards, workers=1, steps_per_epoch=4), 0))


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (2, 4)])
def test_start_step_replays_the_rest_of_the_epoch(small_shards: Path, workers: int, start: int) -> None:
    loader = train_loader(small_shards, workers=workers, steps_per_epoch=7)
    full = epoch(loader, 5)
    tail = epoch(loader, 5, start_step=start)
    assert len(loader) == 7 - start and same(tail, full[start:])


def test_set_resolution_applies_to_the_next_epoch(small_shards: Path) -> None:
    loader = train_loader(small_shards, steps_per_epoch=2)
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)
    loader.set_resolution(24)
    assert next(it).view_q.shape[-1] == RES == first.view_q.shape[-1]
    assert {b.view_k.shape[-1] for b in epoch(loader, 1)} == {24}


# ------------------------------------------------------------------------------------ views

def test_view_statistics_follow_design_section_1() -> None:
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    area = 60 * 80
    n = 400
    g = torch.Generator()
    flips_q = flips_k = grays = same_box = 0
    for s in range(n):
        q, k, (pq, pk) = two_views(image, g.manual_seed(s), RES, return_params=True)
        assert q.shape == k.shape == (3, RES, RES) and q.dtype == k.dtype == torch.uint8
        for p in (pq, pk):
            # Rounding the box to whole pixels moves area and ratio a little past the nominal range.
            assert CROP_SCALE[0] - 0.02 <= p.height * p.width / area <= 1
            assert CROP_RATIO[0] * 0.95 <= p.width / p.height <= CROP_RATIO[1] * 1.05
        assert not pq.grayscale and pq.jitter == ()
        assert sorted(op for op, _ in pk.jitter) == ["brightness", "contrast", "hue", "saturation"]
        assert all((abs(f) <= 0.4) if op == "hue" else (0.6 <= f <= 1.4) for op, f in pk.jitter)
        # A grayscale strong view is R = G = B; a colour one (random pixels) is not.
        assert bool((k[0] == k[1]).all() and (k[1] == k[2]).all()) == pk.grayscale
        assert not (q[0] == q[1]).all()
        same_box += (pq.top, pq.left, pq.height, pq.width) == (pk.top, pk.left, pk.height, pk.width)
        flips_q, flips_k, grays = flips_q + pq.flip, flips_k + pk.flip, grays + pk.grayscale
        if s < 40:  # the weak view is exactly torchvision's crop + resize (+ flip) with these parameters
            ref = F.resized_crop(image, pq.top, pq.left, pq.height, pq.width, [RES, RES], antialias=True)
            assert torch.equal(q, F.horizontal_flip(ref) if pq.flip else ref)
            assert torch.equal(apply_view(image, replace(pk, flip=not pk.flip), RES), F.horizontal_flip(k))
    assert same_box < n * 0.02  # independent crops
    assert 0.4 < flips_q / n < 0.6 and 0.4 < flips_k / n < 0.6
    assert 0.13 < grays / n < 0.27
    # Same generator seed, same views; another seed, other views.
    assert all(torch.equal(a, b) for a, b in zip(two_views(image, g.manual_seed(7), RES),
                                                  two_views(image, g.manual_seed(7), RES)))
    assert not torch.equal(two_views(image, g.manual_seed(8), RES)[0], two_views(image, g.manual_seed(7), RES)[0])


@pytest.mark.parametrize("resize, crop", [(40, 32), (36, 36), (73, 64)])
def test_eval_view_is_resize_shorter_side_then_centre_crop(truth, resize: int, crop: int) -> None:
    jpeg = next(iter(truth["val"].values()))[1]
    image = decode(jpeg)
    got = eval_view(image, resize, crop)
    assert got.shape == (3, crop, crop)
    # Exactly torchvision v2's Resize + CenterCrop on the uint8 tensor.
    assert torch.equal(got, T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop)])(image))
    # Close to PIL's antialiased bilinear on the same decoded pixels.
    pil = Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert torch.equal(torch.from_numpy(np.array(pil)).permute(2, 0, 1), image)
    h, w = eval_size(pil.height, pil.width, resize)
    pil = pil.resize((w, h), Image.BILINEAR)
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    ref = torch.from_numpy(np.array(pil.crop((left, top, left + crop, top + crop)))).permute(2, 0, 1)
    diff = (got.int() - ref.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.5


# ------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("split, workers", [("val", 2), ("imagenet-val", 0)])
def test_eval_loader_two_ranks_cover_every_sample_once(small_shards: Path, truth, split: str, workers: int) -> None:
    kw = dict(shards=small_shards, split=split, batch_size=4, resolution=RES, resize=36, workers=workers,
              world_size=2, device="cpu")
    per_rank = [list(build_eval_loader("torch", rank=r, **kw)) for r in range(2)]
    got = indices(per_rank[0]) + indices(per_rank[1])
    assert sorted(got) == sorted(truth[split]) and len(got) == len(set(got))
    for r, batches in enumerate(per_rank):
        assert len(batches) == len(build_eval_loader("torch", rank=r, **kw))
        for b in batches:
            assert isinstance(b, EvalBatch) and b.image.shape[1:] == (3, RES, RES)
            assert b.image.is_contiguous(memory_format=torch.channels_last)
            assert [truth[split][i][0] for i in b.index.tolist()] == b.label.tolist()
    again = list(build_eval_loader("torch", rank=0, **kw))
    assert all(torch.equal(a.image, b.image) and torch.equal(a.index, b.index) for a, b in zip(again, per_rank[0]))
    first = per_rank[0][0]
    want = eval_view(decode(truth[split][first.index[0].item()][1]), 36, RES).float()
    assert (denormalize_to_uint8_range(first.image[0]) - want).abs().max() < 1e-3


# ------------------------------------------------------------------------------- plan, factory

def test_train_windows_are_disjoint_and_hold_their_quota() -> None:
    for n, batch, steps, world, workers in [(175, 8, 21, 1, 1), (175, 4, 21, 2, 3), (50, 4, 30, 2, 2),
                                            (7, 2, 5, 4, 3), (1000, 16, 3, 2, 4)]:
        windows = [train_window(n, batch, steps, r, world, workers, w) for r in range(world) for w in range(workers)]
        assert all(end - start >= quota for start, end, quota in windows)
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:]))
        per_rank = [sum(q for _, _, q in windows[r * workers:(r + 1) * workers]) for r in range(world)]
        assert per_rank == [steps * batch] * world
        sizes = [40, 40, 13, 40, 42]
        for start, end, _ in windows:
            plan = pieces(sizes, start, end, lambda p: shard_order(len(sizes), 0, 0, p))
            assert sum(p.hi - p.lo for p in plan) == end - start
    spans = [eval_window(101, r, 3, 2, w) for r in range(3) for w in range(2)]
    assert spans[0][0] == 0 and spans[-1][1] == 101 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_factory_and_manifest_errors_are_one_line(small_shards: Path, tmp_path: Path) -> None:
    assert isinstance(train_loader(small_shards), TorchTrainLoader)
    with pytest.raises(BackendUnavailable, match="unknown loader backend 'nope'") as exc:
        build_train_loader("nope")
    assert "\n" not in str(exc.value)
    with pytest.raises(ManifestError, match="no manifest.json"):
        train_loader(tmp_path)
    with pytest.raises(ManifestError, match=r"split 'nope' is not in .*\(it has: imagenet-val, train, val\)"):
        train_loader(small_shards, split="nope")


def test_backend_missing_library_or_module_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    from mopro_fast import data

    (tmp_path / "fake_backend.py").write_text("import not_a_real_library_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(data.BACKENDS, "fake", ("fake_backend", "pip install not-a-real-library-xyz"))
    monkeypatch.setitem(data.BACKENDS, "future", ("mopro_fast.data.future_loader", "pip install future"))
    with pytest.raises(BackendUnavailable, match="install: pip install not-a-real-library-xyz") as exc:
        build_eval_loader("fake")
    assert "\n" not in str(exc.value)
    with pytest.raises(BackendUnavailable, match="not part of this mopro-fast version yet"):
        build_train_loader("future")
