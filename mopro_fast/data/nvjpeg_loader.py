"""Loader backend `nvjpeg`: pure PyTorch/torchvision, JPEGs decoded and augmented as whole batches
on the training device (nvJPEG through `torchvision.io.decode_jpeg(..., device="cuda")` on a GPU,
libjpeg-turbo on a CPU, where the same code runs and the tests cover it). DESIGN.md section 3.

Pipeline per batch:
- DataLoader workers read raw JPEG bytes, labels and sample indices from the shards with
  webdataset's tar iterators and do no decoding. The samples of each batch are the torch
  backend's exactly (the same plan: `torch_loader.slot_batches`). A batch crosses the process
  boundary as one byte buffer plus lengths, not B small tensors.
- In the main process, in a background thread `prefetch` batches ahead on its own CUDA stream
  (mopro_fast.data.prefetch): one `decode_jpeg` call on the whole list, then both views for the
  whole batch (mopro_fast.views.gpu: padding, crop + resize + flip as batched GEMMs, colour
  ops of views.augment), normalisation with the ImageNet mean/std, the output dtype and
  channels-last in one copy. No per-sample Python loop touches pixels.

Output dtype: `options.dtype` (default float32, the Batch contract: an fp32 recipe gets fp32 inputs). On a
GPU with a bf16 recipe, `dtype=torch.bfloat16` halves the bytes the first convolution reads;
autocast would cast them anyway (`bench loader` / `bench e2e` use it on CUDA).

Differences from the torch backend (views.py), all documented, none in the sampling rules:
same crop rule (torchvision's, vectorised), same flip/grayscale probabilities, same jitter
ranges and per-sample random order; the pixels are computed in float and never rounded to uint8
between ops (the torch backend rounds after the resize and after each colour op), and the
random numbers come from a per-batch generator on the device, seeded with (seed, epoch, rank,
world size, step): the views of a batch do not depend on the worker count, but a CUDA and a CPU
run draw different numbers (different generators). The eval view equals `views.eval_view` up to
float rounding (the torch backend's uint8 kernel rounds to within 1 level of it).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from mopro_fast.data.base import EvalLoaderBase, TrainLoaderBase
from mopro_fast.data.batch import IMAGENET_MEAN, IMAGENET_STD, Batch, EvalBatch
from mopro_fast.views.augment import constant
from mopro_fast.views.gpu import eval_view_batch, to_device, two_views_batch
from mopro_fast.data.options import NvjpegOptions
from mopro_fast.data.prefetch import prefetch
from mopro_fast.data.source import ShardSource
from mopro_fast.data.stream import TAG_VIEWS, eval_window, mix_seed, pieces
from mopro_fast.data.torch_loader import (RawSample, _worker_id, eval_batches, read_pieces, slot_batches,
                                          undecodable)

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# bytes, lengths, labels, indices, and per sample (shard, key) for error messages
RawBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]


def pack(samples: list[RawSample]) -> RawBatch:
    """B raw samples -> (one uint8 buffer of all JPEG bytes, B lengths, B labels, B indices, B sources)."""
    data = torch.frombuffer(bytearray(b"".join(s[0] for s in samples)), dtype=torch.uint8)
    lengths = torch.tensor([len(s[0]) for s in samples], dtype=torch.int64)
    return (data, lengths, torch.tensor([s[1] for s in samples], dtype=torch.int64),
            torch.tensor([s[2] for s in samples], dtype=torch.int64), [s[3] for s in samples])


def decode_batch(data: torch.Tensor, lengths: torch.Tensor, device: torch.device,
                 sources: list[tuple[str, str]] | None = None) -> list[torch.Tensor]:
    """One `decode_jpeg` call on the whole batch: uint8 `3 x H_b x W_b` RGB images on `device`.

    When it fails and `sources` ((shard, key) per sample) are given, the JPEGs are decoded one by
    one to find the damaged one, and a `ShardError` names it.
    """
    jpegs = list(torch.split(data, lengths.tolist()))  # views into one host buffer, no copies
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        if sources is None:
            raise
        for jpeg, where in zip(jpegs, sources):
            try:
                decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as one:
                raise undecodable(where, one) from None
        raise undecodable((sources[0][0], f"{sources[0][1]} or a sample of its batch"), exc) from None


def finish(views: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """float `B x 3 x H x W` in [0, 1] -> `(x - mean) / std` in `dtype`, channels-last if asked (one copy)."""
    mean = constant(IMAGENET_MEAN, torch.float32, views.device).view(1, 3, 1, 1)
    inv_std = constant(tuple(1 / s for s in IMAGENET_STD), torch.float32, views.device).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ((views - mean) * inv_std).to(dtype=dtype, memory_format=fmt)


class _RawTrainEpoch(IterableDataset):
    """One epoch of one rank as raw batches (step, bytes, lengths, labels, indices); no decoding."""

    def __init__(self, source: ShardSource, sizes: list[int], batch_size: int, steps: int, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int, world_size: int, workers: int, start_step: int):
        super().__init__()
        self.args = (source, sizes, batch_size, steps, shuffle_buffer, seed, epoch, rank, world_size, workers)
        self.workers, self.start_step = workers, start_step

    def __iter__(self) -> Iterator[tuple[int, RawBatch]]:
        slot = (_worker_id() + self.start_step) % self.workers  # as torch_loader._TrainEpoch
        for b, samples in slot_batches(*self.args, slot, self.start_step):
            yield slot + b * self.workers, pack(samples)


class _RawEvalShare(IterableDataset):
    """The eval samples of one rank as raw batches; worker w reads sub-window w, in manifest order."""

    def __init__(self, source: ShardSource, sizes: list[int], batch_size: int, rank: int, world_size: int,
                 workers: int):
        super().__init__()
        self.source, self.sizes, self.batch_size = source, sizes, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers

    def __iter__(self) -> Iterator[RawBatch]:
        start, end = eval_window(sum(self.sizes), self.rank, self.world_size, self.workers, _worker_id())
        raw = read_pieces(self.source, pieces(self.sizes, start, end, lambda p: range(len(self.sizes))))
        while chunk := list(itertools.islice(raw, self.batch_size)):
            yield pack(chunk)


def _raw_loader(dataset: IterableDataset, workers: int, prefetch_batches: int) -> DataLoader:
    # Raw bytes are not pinned: decode_jpeg reads them on the host (nvJPEG's Huffman stage) anyway.
    # generator: never the global torch RNG (exact resume, as torch_loader._data_loader says).
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      prefetch_factor=max(1, -(-prefetch_batches // workers)) if workers else None,
                      generator=torch.Generator())


class NvjpegTrainLoader(TrainLoaderBase):
    """Training batches (`Batch`) of one rank (base.TrainLoaderBase); samples per batch as the torch
    backend's. `workers` = reader processes (no decoding there); `prefetch` = batches the device
    thread prepares ahead (0: decode and augment inline), also what the readers hold ahead in all.
    Options (options.NvjpegOptions): `dtype` of the views. `iter_debug` adds `size` (H, W of each
    source), `factors` and `order` (colour jitter) to the shared keys.
    """

    Options = NvjpegOptions
    exact_resume = True
    resolution_without_rebuild = True
    debug_params = True

    def _make(self, item: tuple[int, RawBatch], debug: bool):
        step, (data, lengths, label, index, sources) = item
        images = decode_batch(data, lengths, self.device, sources)
        generator = torch.Generator(device=images[0].device)
        generator.manual_seed(mix_seed(self.seed, self.epoch, self.rank, self.world_size, step, TAG_VIEWS))
        view_q, view_k, (weak, strong) = two_views_batch(images, generator, self.resolution)
        dtype = self.options.dtype
        batch = Batch(finish(view_q, dtype, self.channels_last), finish(view_k, dtype, self.channels_last),
                      to_device(label, self.device), to_device(index, self.device))
        if not debug:
            return step, (batch, None)
        sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.float64)  # B x 2 (H, W)
        params = {"size": sizes.numpy(), "flip_q": weak.flip.cpu().numpy(), "flip_k": strong.flip.cpu().numpy(),
                  "gray": strong.gray.cpu().numpy(), "factors": strong.factors.cpu().numpy(),
                  "order": strong.order.cpu().numpy()}
        for name, view in (("crop_q", weak), ("crop_k", strong)):
            c = view.crops
            box = torch.stack([c.top, c.left, c.height, c.width], dim=1).cpu().double()  # B x 4 pixels
            params[name] = (box / sizes.repeat(1, 2)).numpy()  # y0, x0, h, w as fractions of H, W
        return step, (batch, params)

    def _iterate(self, debug: bool) -> Iterator[tuple[Batch, dict | None]]:
        start, W = self.start_step, max(self.workers, 1)
        dataset = _RawTrainEpoch(self._source, self._sizes, self.batch_size, self._steps, self.shuffle_buffer,
                                 self.seed, self.epoch, self.rank, self.world_size, W, start)
        expected = start
        raw = _raw_loader(dataset, self.workers, self.prefetch)
        for step, out in prefetch(raw, lambda item: self._make(item, debug), self.prefetch, self.device):
            if step != expected:  # the round-robin order the plan relies on; cheap to check
                raise RuntimeError(f"loader produced step {step} where step {expected} was due")
            yield out
            expected += 1
        if expected != self._steps:
            raise RuntimeError(f"loader stopped after step {expected - 1} of {self._steps}")


class NvjpegEvalLoader(EvalLoaderBase):
    """Eval batches (`EvalBatch`) of one rank (base.EvalLoaderBase), in the torch backend's sample
    order; the view is `views.eval_view(resize, resolution)` made for the whole batch on the device.
    """

    Options = NvjpegOptions

    def __len__(self) -> int:
        return eval_batches(self.num_samples, self.batch_size, self.rank, self.world_size, self.workers)

    def _make(self, raw: RawBatch) -> EvalBatch:
        data, lengths, label, index, sources = raw
        image = eval_view_batch(decode_batch(data, lengths, self.device, sources), self.resize, self.resolution)
        return EvalBatch(finish(image, self.options.dtype, self.channels_last), to_device(label, self.device),
                         to_device(index, self.device))

    def __iter__(self) -> Iterator[EvalBatch]:
        if self.num_samples == 0:
            return
        dataset = _RawEvalShare(self._source, self._sizes, self.batch_size, self.rank, self.world_size,
                                max(self.workers, 1))
        yield from prefetch(_raw_loader(dataset, self.workers, self.prefetch), self._make, self.prefetch, self.device)


# The names the backend factory (mopro_fast.data.build_*_loader) looks up.
TrainLoader = NvjpegTrainLoader
EvalLoader = NvjpegEvalLoader
