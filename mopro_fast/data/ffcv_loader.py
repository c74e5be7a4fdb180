"""Loader backend `ffcv`: FFCV 1.0.2 reads the split's `.beton` (written by `convert --format ffcv|both`).

Per batch (DESIGN.md section 3): FFCV's compiled, memory-mapped loader runs our `TwoViewDecoder`
(mopro_fast.data.ffcv_ops: one decode per image, both random resized crops with flips) on
`workers` threads; then, on the training device, the strong view's grayscale and colour jitter as
batched tensor ops (mopro_fast.views.color) and the ImageNet normalisation to float32, channels-last
when asked (mopro_fast.data.batch). Evaluation runs `EvalDecoder` (`views.eval_view` exactly).
The training crops are resized with FFCV's OpenCV INTER_AREA kernel, not torchvision's
antialiased bilinear; the colour ops follow torchvision's formulas in float.

Epochs and ranks (the `distributed=True` of FFCV, done here so it follows our plan): the split's
samples are laid in a random order seeded by (seed, epoch, pass), passes end to end, and rank r
takes positions [r S B, (r + 1) S B) of that stream (S = steps_per_epoch, B = batch size): random
order, the same S batches on every rank, ranks disjoint within an epoch when R S B <= N.
`set_epoch(e, start_step=k)` starts at batch k of the same order without reading the skipped
ones. The views are a pure function of (seed, rank, epoch order) (ffcv_ops: hashed draws) and the
colour parameters of batch k come from a generator seeded with (seed, epoch, rank, k), so a
resumed epoch repeats an uninterrupted one batch for batch. `shuffle_buffer` is not used: FFCV
reads in a fully random order. `set_resolution` rebuilds the FFCV loader (and pays its JIT again).

JIT: FFCV compiles the pipeline with numba at the first batch of a new loader (seconds); the
`bench loader` report gives it separately as `first_batch_s`. FFCV's `Compiler.set_num_threads`
also sets torch's intra-op thread count; we keep numba's half of it, so the trainer's torch
threads stay as the run configured them.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.pipeline import PipelineSpec
from ffcv.traversal_order.base import TraversalOrder

from mopro_fast.data.base import EvalLoaderBase, TrainLoaderBase
from mopro_fast.data.batch import Batch, EvalBatch, finish_images, normalize_uint8
from mopro_fast.views.color import apply_strong_color, sample_strong_color
from mopro_fast.data.errors import check_size, damaged, reason
from mopro_fast.data.ffcv_color import finish_on_host
from mopro_fast.data.ffcv_ops import EvalDecoder, TwoViewDecoder, bad_rows, read_params
from mopro_fast.data.cache import ShardCache, cache_folder
from mopro_fast.data.manifest import ManifestError, read_manifest
from mopro_fast.data.source import CacheNeeded
from mopro_fast.data.stream import eval_window, mix_seed

TAG_ORDER, TAG_CROPS, TAG_COLOR = 11, 12, 13  # keep these seeds apart from stream.py's tags


def beton_path(shards: Path | str, split: str, cache_dir: Path | None = None) -> tuple[Path, int]:
    """(path of split's .beton, its sample count) from the manifest; ManifestError when there is none.

    FFCV reads a local file: a .beton behind a URL is fetched into `cache_dir` (verified, cache.py)."""
    manifest = read_manifest(shards)
    info = manifest.split(split).get("beton")
    if not info:
        raise ManifestError(f"split {split!r} of {manifest.root} has no FFCV .beton; convert with "
                            f"--format ffcv or --format both")
    if manifest.remote:
        if cache_dir is None:
            raise CacheNeeded(f"loader.backend=ffcv reads a local .beton, and the shards are at {manifest.root}: "
                              f"set data.cache_dir=/a/local/folder (the .beton is fetched and verified there once)")
        cache = ShardCache(cache_folder(cache_dir, str(manifest.root), manifest.sha256), str(manifest.root))
        return cache.local(info["file"], info.get("sha256"), info.get("bytes")), int(info["samples"])
    path = manifest.root / info["file"]
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing; re-run the same convert command")
    check_size(path, info.get("bytes"), what=".beton")
    return path, int(info["samples"])


def _open(beton: Path, **kwargs) -> Loader:
    """FFCV's Loader over `beton`; a file FFCV cannot parse (damaged header or tables) is a ShardError."""
    try:
        return Loader(str(beton), **kwargs)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise damaged(beton, f"FFCV cannot open the .beton: {reason(exc)}") from None


def _check_decoded(beton: Path, status_rows: np.ndarray, index: np.ndarray, byte: int | None = None) -> None:
    """Raise ShardError when a sample's stored JPEG did not decode (the decoders' status byte)."""
    bad = bad_rows(status_rows) if byte is None else bad_rows(status_rows, byte)
    if len(bad):
        raise damaged(beton, "a JPEG does not decode",
                      key=f"index {int(index.reshape(-1)[bad[0]])}")


def epoch_order(num_samples: int, batch_size: int, steps: int, rank: int, world_size: int, seed: int,
                epoch: int, start_step: int = 0) -> np.ndarray:
    """Sample rows (uint64) of rank `rank`'s batches start_step..steps-1 of `epoch`; see the module docstring."""
    lo = (rank * steps + start_step) * batch_size
    hi = (rank + 1) * steps * batch_size
    first, last = lo // num_samples, (hi - 1) // num_samples
    stream = np.concatenate([np.random.default_rng(mix_seed(seed, epoch, p, TAG_ORDER)).permutation(num_samples)
                             for p in range(first, last + 1)]) if hi > lo else np.zeros(0, dtype=np.int64)
    return stream[lo - first * num_samples:hi - first * num_samples].astype(np.uint64)


class _PlanOrder(TraversalOrder):
    """FFCV traversal order that asks the owning train loader for its epoch's rows.

    FFCV's `Loader(order=...)` takes a TraversalOrder instance and calls it with the loader.
    """

    def __init__(self, owner: "FfcvTrainLoader"):
        self.owner = owner
        self.full = True  # while FFCV sizes the loader: the whole epoch

    def __call__(self, loader):
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        o = self.owner
        return epoch_order(o.num_samples, o.batch_size, o.steps_per_epoch, o.rank, o.world_size, o.seed,
                           o.epoch, 0 if self.full else o.start_step)


def _batches(loader: Loader) -> Iterator[tuple]:
    """Iterate an FFCV loader, failing instead of hanging when its pipeline thread dies.

    FFCV's EpochIterator runs the compiled pipeline on a thread; an exception there (a JIT typing
    error, a damaged record) ends the thread and leaves `__next__` waiting forever on its queue.
    The thread's exception is caught (not printed) and raised here as one `ShardError` line; the
    thread is joined before the loader's memory is released.
    """
    it = iter(loader)
    died: list[BaseException] = []
    previous = threading.excepthook

    def hook(args) -> None:
        if args.thread is it:
            died.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        while True:
            try:
                item = it.output_queue.get(timeout=1.0)
            except queue.Empty:
                if not it.is_alive() and it.output_queue.empty():
                    what = reason(died[0]) if died else "its pipeline thread died"
                    raise damaged(loader.fname, f"the FFCV pipeline failed: {what}") from None
                continue
            if item is None:
                return
            slot, result = item
            if IS_CUDA:  # as EpochIterator.__next__: wait for the slot's copy stream
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield result
    finally:
        # Stop the thread before FFCV's close() unmaps the file: a thread still making a batch
        # (after an error or an early stop here) would read freed memory and crash the process.
        it.terminate_event.set()
        while it.is_alive():
            try:
                it.output_queue.get_nowait()  # unblock a thread waiting on a full queue
            except queue.Empty:
                pass
            it.join(timeout=0.1)
        threading.excepthook = previous
        it.close()


def _pipelines(image_decoder) -> dict:
    # PipelineSpec names the decoder: a bare list would put FFCV's default decoder in front of ours.
    return {"image": PipelineSpec("image", decoder=image_decoder), "label": PipelineSpec("label", decoder=IntDecoder()),
            "index": PipelineSpec("index", decoder=IntDecoder())}


def _own(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A host copy of uint8 images out of FFCV's buffer (FFCV reuses it a few batches later, and an
    asynchronous copy to the GPU could still be reading it then)."""
    return images.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """B x 3 x H x W with the strides of B x H x W x 3 (a permuted HWC array): kept when channels-last
    is asked, else made contiguous."""
    return images if channels_last else images.contiguous()


def _int_column(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # A copy: FFCV reuses its output buffers a few batches later.
    return torch.from_numpy(array.reshape(-1).astype(np.int64)).to(device, non_blocking=True)


class _BetonSplit:
    """The split's .beton instead of webdataset shards (mixed into both loaders)."""

    def _read_split(self, shards: Path | str, split: str) -> int:
        self._beton, num_samples = beton_path(shards, split, self.spec.cache_dir)
        return num_samples


class FfcvTrainLoader(_BetonSplit, TrainLoaderBase):
    """Training batches (`Batch`) of one rank from the split's .beton (base.TrainLoaderBase).

    `workers` = FFCV/numba threads, `prefetch` = FFCV's batches_ahead; `shuffle_buffer` unused.
    `iter_debug` adds `color` (the strong view's colour parameters) to the shared keys.
    """

    exact_resume = True
    resolution_without_rebuild = False  # a new resolution rebuilds the FFCV loader (and its JIT)
    debug_params = True
    _loader = None

    def _resolution_changed(self) -> None:
        self._loader = None

    def _build(self) -> Loader:
        self._order = _PlanOrder(self)
        loader = _open(self._beton, batch_size=self.batch_size, num_workers=max(self.workers, 1), os_cache=True,
                        order=self._order, seed=self.seed, drop_last=True, batches_ahead=max(self.prefetch, 1),
                        pipelines=_pipelines(TwoViewDecoder(self.resolution, mix_seed(self.seed, self.rank, TAG_CROPS))))
        self._order.full = False
        return loader

    def _iterate(self, debug: bool) -> Iterator[tuple[Batch, dict | None]]:
        if self._loader is None:
            self._loader = self._build()
        res, dev = self.resolution, self.device
        step = self.start_step
        generator = torch.Generator()
        for images, label, index in _batches(self._loader):
            _check_decoded(self._beton, images[:, 0, res], index)
            generator.manual_seed(mix_seed(self.seed, self.epoch, self.rank, step, TAG_COLOR) & ((1 << 63) - 1))
            color = sample_strong_color(len(images), generator)
            if dev.type == "cpu":  # colour ops and normalisation compiled, on the loader's threads (ffcv_color.py)
                q, k = finish_on_host(images[:, 0, :res], images[:, 1, :res], color.gray.numpy(),
                                      color.factors.numpy(), color.order.numpy())  # B x res x res x 3 float32 each
                view_q, strong = (_layout(torch.from_numpy(v).permute(0, 3, 1, 2), self.channels_last) for v in (q, k))
            else:  # on the device, batched (views.color)
                out = torch.from_numpy(images)  # B x 2 x (res + 1) x res x 3 uint8, FFCV's buffer
                view_q = finish_images(_own(out[:, 0, :res].permute(0, 3, 1, 2), self.channels_last), dev,
                                       self.channels_last)  # B x 3 x res x res float, normalised
                view_k = _own(out[:, 1, :res].permute(0, 3, 1, 2), self.channels_last)  # B x 3 x res x res uint8
                strong = apply_strong_color(view_k.to(dev, non_blocking=True).float(), color)  # 0..255
                if self.channels_last:
                    strong = strong.contiguous(memory_format=torch.channels_last)
                strong = normalize_uint8(strong)
            batch = Batch(view_q, strong, _int_column(label, dev), _int_column(index, dev))
            params = None
            if debug:
                q, k = read_params(images[:, 0, res]), read_params(images[:, 1, res])
                params = {"flip_q": q["flip"], "flip_k": k["flip"], "gray": color.gray.numpy(),
                          "crop_q": _fractions(q), "crop_k": _fractions(k), "color": color}
            yield batch, params
            step += 1
        if step != self._steps:
            raise RuntimeError(f"ffcv loader stopped after step {step - 1} of {self._steps}")


def _fractions(p: dict[str, np.ndarray]) -> np.ndarray:
    """N x 4 (top, left, height, width) of the crops as fractions of the source image (as DALI's debug)."""
    h, w = p["src_height"].astype(np.float64), p["src_width"].astype(np.float64)
    return np.stack([p["top"] / h, p["left"] / w, p["height"] / h, p["width"] / w], axis=1)


class FfcvEvalLoader(_BetonSplit, EvalLoaderBase):
    """Eval batches (`EvalBatch`) of one rank from the split's .beton (base.EvalLoaderBase): rank r
    reads rows [N r / R, N (r + 1) / R) in file order. The view is `views.eval_view`
    (ffcv_ops.EvalDecoder), normalised.
    """

    _loader = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.share = eval_window(self.num_samples, self.rank, self.world_size, 1, 0)

    def __len__(self) -> int:
        return -(-(self.share[1] - self.share[0]) // self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        if self.share[1] == self.share[0]:
            return
        if self._loader is None:
            self._loader = _open(self._beton, batch_size=self.batch_size, num_workers=max(self.workers, 1),
                                  os_cache=True, order=OrderOption.SEQUENTIAL, drop_last=False,
                                  indices=np.arange(*self.share), batches_ahead=max(self.prefetch, 1),
                                  pipelines=_pipelines(EvalDecoder(self.resize, self.resolution)), seed=0)
        crop = self.resolution
        for images, label, index in _batches(self._loader):  # b x (crop + 1) x crop x 3: the view, a status row
            _check_decoded(self._beton, images[:, crop], index, byte=0)
            image = _own(torch.from_numpy(images[:, :crop]).permute(0, 3, 1, 2), self.channels_last)
            yield EvalBatch(finish_images(image, self.device, self.channels_last), _int_column(label, self.device),
                            _int_column(index, self.device))


# The names the backend factory (mopro_fast.data.build_*_loader) looks up.
TrainLoader = FfcvTrainLoader
EvalLoader = FfcvEvalLoader
