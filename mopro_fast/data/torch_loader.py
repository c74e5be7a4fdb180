"""Loader backend `torch`: webdataset tar reading + torch DataLoader workers + torchvision ops.

The portable reference the faster backends are measured against (DESIGN.md section 3). Per
worker: read its window of the shards (mopro_fast.data.stream) with `webdataset`'s tar
iterators, shuffle with a buffer, decode JPEG with `torchvision.io.decode_jpeg` (libjpeg-turbo)
into uint8, make the views (mopro_fast.views.cpu), and stack whole uint8 batches; the main
process moves each batch to the device and normalises it there (mopro_fast.data.batch).

Determinism: the batches of epoch e on rank r (samples and augmentations) are a pure function
of (seed, e, r, world_size, workers) and the loader's settings (batch size, resolution, steps,
shuffle buffer); workers = 0 and 1 give the same batches. Shard order and
shuffle buffer are seeded per epoch and slot; each sample's views come from a torch.Generator
seeded with (seed, epoch, rank, world size, workers, worker, position in the worker's output).
Seeding per position is what makes a mid-epoch start cheap and exact: `set_epoch(e, start_step=k)`
skips the first k batches by reading and shuffling their raw bytes without decoding them.
(A caveat in principle: ColorJitter's contrast takes a float mean, which torch may split over
threads. DataLoader workers run on one thread, so with workers >= 1 it cannot matter; with
workers = 0 we saw no difference between 1 and 2 threads at 224 px, but keep the count fixed.)
"""

from __future__ import annotations

import itertools
import random
import tarfile
import warnings
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from mopro_fast.data.base import EvalLoaderBase, TrainLoaderBase
from mopro_fast.data.batch import Batch, EvalBatch, finish_images
from mopro_fast.data.errors import ShardError, damaged, reason
from mopro_fast.data.source import ShardSource
from mopro_fast.data.stream import (TAG_BUFFER, TAG_VIEWS, Piece, batches_of_worker, buffer_shuffle, eval_window,
                                    mix_seed, pieces, shard_order, train_window)
from mopro_fast.views.cpu import eval_view, two_views

RawSample = tuple[bytes, int, int, tuple[str, str]]  # (JPEG bytes, label, sample index, (shard, key))
_FIELDS = (".jpg", ".lbl", ".sid")  # the tar members we need; .cls and .json are skipped

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, warning on every call;
# decode_jpeg (libjpeg-turbo) is still what this reference backend is defined by.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def read_piece(source: ShardSource, shard: int, lo: int, hi: int) -> Iterator[RawSample]:
    """Samples [lo, hi) of shard number `shard`, read with webdataset's tar iterators (no decoding)
    from the stream the source gives (a local file, a verified cached copy, or a URL stream: source.py).

    A damaged tar (cut short, a member missing, bad headers) raises `ShardError` naming the shard
    and the sample (or the last good one before the damage); a shard the source cannot deliver
    (unreachable, a wrong checksum) raises the source's own one-line ShardError.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander  # imported here: only workers read tars

    path = source.names[shard]
    try:
        stream = source.open(shard)
    except OSError as exc:
        raise damaged(path, f"cannot open the shard ({exc.strerror or reason(exc)})") from None
    files = tar_file_expander([{"url": path, "stream": stream}], select_files=lambda name: name.endswith(_FIELDS))
    samples = group_by_keys(files)
    n, key, last = lo, None, None
    try:
        for sample in itertools.islice(samples, lo, hi):
            key = sample.get("__key__")
            raw = (sample["jpg"], int.from_bytes(sample["lbl"], "little", signed=True),
                   int.from_bytes(sample["sid"], "little", signed=True), (path, key))
            last, key = key, None
            yield raw
            n += 1
    except ShardError as exc:  # from the stream; webdataset appended its own context to the arguments
        raise type(exc)(exc.message) from None
    except (tarfile.TarError, OSError, EOFError, KeyError, ValueError) as exc:
        raise damaged(path, f"the tar does not read: {reason(exc)}", key=key, after=last) from None
    finally:
        samples.close()
        stream.close()
    if n < hi:
        raise damaged(path, f"it ends after {n} samples, the manifest promised at least {hi}", after=last)


def read_pieces(source: ShardSource, plan: list[Piece]) -> Iterator[RawSample]:
    for piece in plan:
        yield from read_piece(source, piece.shard, piece.lo, piece.hi)


def decode(jpeg: bytes, where: tuple[str, str] | None = None) -> torch.Tensor:
    """JPEG bytes -> uint8 3 x H x W RGB (libjpeg-turbo via torchvision); `where` = (shard, key) for errors."""
    # bytearray: torch.frombuffer wants a writable buffer (decode_jpeg only reads it).
    try:
        return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        if where is None:
            raise
        raise undecodable(where, exc) from None


def undecodable(where: tuple[str, str], exc: BaseException) -> ShardError:
    """The ShardError for a stored JPEG that does not decode; `where` = (shard path, sample key)."""
    return damaged(where[0], f"a JPEG does not decode: {reason(exc)}", key=where[1])


def _empty_images(batch: int, res: int, channels_last: bool) -> torch.Tensor:
    """uint8 B x 3 x res x res, laid out channels-last when asked (the layout survives IPC and pinning)."""
    if channels_last:
        return torch.empty(batch, res, res, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    return torch.empty(batch, 3, res, res, dtype=torch.uint8)


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


class _TrainEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs one slot (see stream.py)."""

    def __init__(self, source: ShardSource, sizes: list[int], batch_size: int, resolution: int, steps: int,
                 shuffle_buffer: int, seed: int, epoch: int, rank: int, world_size: int, workers: int,
                 start_step: int, channels_last: bool):
        super().__init__()
        self.source, self.sizes = source, sizes
        self.batch_size, self.resolution, self.steps = batch_size, resolution, steps
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.start_step, self.channels_last = start_step, channels_last

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        W, B = self.workers, self.batch_size
        # DataLoader worker i serves slot (i + start_step) % W, so its round robin starts at start_step.
        slot = (_worker_id() + self.start_step) % W
        key = (self.seed, self.epoch, self.rank, self.world_size, W, slot)
        generator = torch.Generator()
        for b, samples in slot_batches(self.source, self.sizes, B, self.steps, self.shuffle_buffer, self.seed,
                                       self.epoch, self.rank, self.world_size, W, slot, self.start_step):
            view_q = _empty_images(B, self.resolution, self.channels_last)  # B x 3 x res x res uint8
            view_k = _empty_images(B, self.resolution, self.channels_last)  # B x 3 x res x res uint8
            labels, indices = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)  # B, B
            for i, (jpeg, label, index, where) in enumerate(samples):
                generator.manual_seed(mix_seed(*key, b * B + i, TAG_VIEWS))
                view_q[i], view_k[i] = two_views(decode(jpeg, where), generator, self.resolution)
                labels[i], indices[i] = label, index
            yield slot + b * W, view_q, view_k, labels, indices


def slot_batches(source: ShardSource, sizes: list[int], batch_size: int, steps: int, shuffle_buffer: int, seed: int,
                 epoch: int, rank: int, world_size: int, workers: int, slot: int,
                 start_step: int) -> Iterator[tuple[int, list[RawSample]]]:
    """The raw samples of slot `slot`'s batches of one epoch, from `start_step` on (stream.py's plan).

    Yields (b, B raw samples) for the slot's b-th batch, which is step `slot + b * workers`;
    the batches before `start_step` are read and shuffled, never decoded. Shared by the backends
    that read with webdataset (torch, nvjpeg), so both see the same samples in the same batches.
    """
    W, B = workers, batch_size
    start, end, quota = train_window(sum(sizes), B, steps, rank, world_size, W, slot)
    plan = pieces(sizes, start, end, lambda p: shard_order(len(sizes), seed, epoch, p))
    rng = random.Random(mix_seed(seed, epoch, rank, world_size, W, slot, TAG_BUFFER))
    raw = itertools.islice(buffer_shuffle(read_pieces(source, plan), shuffle_buffer, rng), quota)
    skip = batches_of_worker(start_step, W, slot)  # this slot's batches before start_step
    for _ in itertools.islice(raw, skip * B):
        pass  # read and shuffled, never decoded
    for b in range(skip, quota // B):
        samples = list(itertools.islice(raw, B))
        if len(samples) < B:  # cannot happen while each window holds its quota (stream.train_window)
            raise RuntimeError(f"slot {slot} ran out of samples in batch {b}")
        yield b, samples


class _EvalShare(IterableDataset):
    """The eval samples of one rank; worker w reads sub-window w, in manifest order."""

    def __init__(self, source: ShardSource, sizes: list[int], batch_size: int, resolution: int, resize: int,
                 rank: int, world_size: int, workers: int, channels_last: bool):
        super().__init__()
        self.source, self.sizes = source, sizes
        self.batch_size, self.resolution, self.resize = batch_size, resolution, resize
        self.rank, self.world_size, self.workers, self.channels_last = rank, world_size, workers, channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start, end = eval_window(sum(self.sizes), self.rank, self.world_size, self.workers, _worker_id())
        raw = read_pieces(self.source, pieces(self.sizes, start, end, lambda p: range(len(self.sizes))))
        while chunk := list(itertools.islice(raw, self.batch_size)):
            images = _empty_images(len(chunk), self.resolution, self.channels_last)  # b x 3 x res x res uint8
            for i, (jpeg, _, _, where) in enumerate(chunk):
                images[i] = eval_view(decode(jpeg, where), self.resize, self.resolution)
            yield (images, torch.tensor([c[1] for c in chunk], dtype=torch.int64),
                   torch.tensor([c[2] for c in chunk], dtype=torch.int64))


def _data_loader(dataset: IterableDataset, workers: int, device: torch.device, prefetch: int) -> DataLoader:
    """`prefetch` batches ahead per rank, spread over the workers (DataLoader counts per worker)."""
    # batch_size=None: workers already yield whole batches (stacked in place, no collate copy).
    # generator: its own, so that starting an epoch never draws from the global torch RNG (a resumed
    # run starts one mid-epoch; shuffle-BN's permutations come from that RNG, see mopro_fast.dist).
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=max(1, -(-prefetch // workers)) if workers else None,
                      generator=torch.Generator())


class TorchTrainLoader(TrainLoaderBase):
    """Training batches (`Batch`) of one rank (base.TrainLoaderBase). Shard and sample assignment:
    mopro_fast.data.stream; determinism: this module's docstring. `workers` = DataLoader
    processes (0: the main process); `shuffle_buffer` samples of raw JPEG bytes are held per worker.
    """

    exact_resume = True
    resolution_without_rebuild = True

    def _iterate(self, debug: bool) -> Iterator[tuple[Batch, None]]:
        start = self.start_step
        dataset = _TrainEpoch(self._source, self._sizes, self.batch_size, self.resolution, self._steps,
                              self.shuffle_buffer, self.seed, self.epoch, self.rank, self.world_size,
                              max(self.workers, 1), start, self.channels_last)
        expected = start
        for step, view_q, view_k, label, index in _data_loader(dataset, self.workers, self.device, self.prefetch):
            if step != expected:  # the round-robin order the plan relies on; cheap to check
                raise RuntimeError(f"loader produced step {step} where step {expected} was due")
            yield Batch(finish_images(view_q, self.device, self.channels_last),
                        finish_images(view_k, self.device, self.channels_last),
                        label.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)), None
            expected += 1
        if expected != self._steps:
            raise RuntimeError(f"loader stopped after step {expected - 1} of {self._steps}")


class TorchEvalLoader(EvalLoaderBase):
    """Eval batches (`EvalBatch`) of one rank (base.EvalLoaderBase), in manifest order. The view is
    `views.eval_view(resize, resolution)`, normalised like the training views.
    """

    def __len__(self) -> int:
        return eval_batches(self.num_samples, self.batch_size, self.rank, self.world_size, self.workers)

    def __iter__(self) -> Iterator[EvalBatch]:
        if self.num_samples == 0:
            return
        dataset = _EvalShare(self._source, self._sizes, self.batch_size, self.resolution, self.resize, self.rank,
                             self.world_size, max(self.workers, 1), self.channels_last)
        for image, label, index in _data_loader(dataset, self.workers, self.device, self.prefetch):
            yield EvalBatch(finish_images(image, self.device, self.channels_last),
                            label.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int, workers: int) -> int:
    """Batches of one rank's eval share when each of `workers` readers batches its own sub-window."""
    W = max(workers, 1)
    return sum(-(-(e - s) // batch_size) for s, e in (eval_window(num_samples, rank, world_size, W, w) for w in range(W)))


# The names the backend factory (mopro_fast.data.build_*_loader) looks up.
TrainLoader = TorchTrainLoader
EvalLoader = TorchEvalLoader
