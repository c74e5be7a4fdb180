"""Loader backend `dali`: NVIDIA DALI reads the shards and makes both views in one pipeline.

One pipeline per loader (DESIGN.md section 3), built with `pipeline_def` and `fn.*`:
`fn.readers.webdataset` over our `.tar` shards and their `wds2idx` `.idx` files (fields `jpg`,
`lbl`, `sid`; label and sample index read as int32 inside the pipeline), sharded by rank
(`shard_id=rank`, `num_shards=world_size`), then the two views of DESIGN.md section 1:
- weak: random resized crop (area fraction U(0.2, 1), log aspect U(log 3/4, log 4/3)), flip p = 0.5;
- strong: an independent crop of the same family, grayscale p = 0.2, brightness / contrast /
  saturation factors U(0.6, 1.4) and hue shift U(-0.4, 0.4) of the hue circle (DALI's hue is in
  degrees: x 360), flip p = 0.5;
normalised with the ImageNet mean/std by `fn.crop_mirror_normalize` to fp32 (the Batch contract).
Outputs are laid out HWC, so `permute` gives channels-last NCHW tensors with no extra copy.

Decoding (`loader.dali.decode`), "mixed" = nvJPEG on a GPU, "cpu" without one:
- "once" (default): one full `fn.decoders.image`, then two crops;
- "roi": `fn.decoders.image_random_crop` twice, each decoding only its crop's region.
Recipe key `loader.dali.decode`; `mopro-fast bench loader --backend dali --backend dali-roi` compares them. On the 2-core CPU at
224 px, on shards stored at 256 px, three runs gave roi/once = 1.16, 0.97, 0.99: no difference
beyond the noise, so "once" stays the default (one decode, and its crop windows can be returned
for tests). On a GPU with larger stored images ROI decoding may win: unmeasured.

In "once" mode the crop window is sampled explicitly (`fn.random.uniform` + arithmetic) and applied by
`fn.resize` with a relative ROI, so a debug pipeline can return it. Unlike torchvision (10 tries,
then a centre crop), a side that would exceed the image is clamped to the full side, which
shrinks the area; for images with an aspect ratio within [3/4, 4/3] the clamp only trims.
The colour jitter is one `fn.color_twist` (DALI's fixed order and its own contrast centre), not
ColorJitter's random order of four ops: same parameter ranges, not the same pixels.

Epochs and ranks. Each rank reads its own contiguous share of the split (the reader's sharding,
`stick_to_shard=True`, so ranks stay disjoint in every epoch), through a shuffle buffer of
`shuffle_buffer` samples (`initial_fill`). An epoch is exactly `steps_per_epoch` batches on every
rank (default N // (batch_size * world_size), which fits in each rank's share).

Determinism and exact resume: every epoch builds a fresh pipeline whose seed is mixed from
(seed, epoch, rank, world size, resolution), so the reader starts again at its share's
beginning and the reader's shuffle and every random op draw the same numbers whenever that epoch
is run (DALI's random operators are seeded per operator from the pipeline seed and keep one state
per sample slot, so the thread count does not change them). `set_epoch(e, start_step=k)` runs
and drops the first k batches (decoded: skipping costs k batches of work once, at a resume), so
a resumed epoch yields exactly steps k.. of the uninterrupted one. The price of the fresh reader:
each epoch sees the first steps x batch samples of the rank's share through the shuffle buffer,
so the last few samples of a share (fewer than a batch, plus whatever the buffer still holds when
the epoch ends) are seen less often than the rest. `set_resolution` takes effect at the next
epoch's pipeline (no extra rebuild).

Evaluation: no shuffle; each iteration builds a fresh pipeline (so prefetching of one pass cannot
move the next one), reads ceil(n_r / B) batches and trims the last one to the rank's share n_r,
whose bounds are the reader's: [N r / R, N (r + 1) / R). Every sample once over all ranks.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from mopro_fast.data.base import EvalLoaderBase, TrainLoaderBase
from mopro_fast.data.batch import IMAGENET_MEAN, IMAGENET_STD, Batch, EvalBatch
from mopro_fast.data.errors import ShardError, damaged, damaged_split
from mopro_fast.data.options import DaliOptions
from mopro_fast.data.stream import mix_seed
from mopro_fast.views.cpu import CROP_RATIO, CROP_SCALE, FLIP_P, GRAY_P, HUE, JITTER

_MEAN = [255 * m for m in IMAGENET_MEAN]
_STD = [255 * s for s in IMAGENET_STD]
_READER = "reader"
_SEED_MASK = (1 << 31) - 1  # DALI seeds are int32


def _tiny_jpeg() -> np.ndarray:
    """An 8 x 8 black JPEG (Pillow), decoded in place of a flagged sample (see `_screen`)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8).copy()


_TINY_JPEG = _tiny_jpeg()
_INVALID = "Current pipeline object is no longer valid."  # DALI appends it to every error after the first


# ----------------------------------------------------------------------------------- pipelines

def _read(paths: list[str], rank: int, world_size: int, shuffle: bool, initial_fill: int):
    jpeg, label, index = fn.readers.webdataset(
        paths=paths, index_paths=[p[:-4] + ".idx" for p in paths], ext=["jpg", "lbl", "sid"],
        dtypes=[types.UINT8, types.INT32, types.INT32], missing_component_behavior="error",
        shard_id=rank, num_shards=world_size, random_shuffle=shuffle, initial_fill=max(initial_fill, 1),
        stick_to_shard=True, pad_last_batch=False, name=_READER)
    return jpeg, label, index


def _screen(jpeg):
    """(bytes to decode, ok, source info): a sample that does not start with a JPEG marker (FF D8) is
    swapped for a tiny valid JPEG and flagged, so the loader raises a ShardError naming it (DALI's
    CPU decoder can crash the process on such bytes instead of raising)."""
    src = fn.get_property(jpeg, key="source_info")  # "shard.tar:offset:member", read only on failure
    ok = (jpeg[0] == np.uint8(0xFF)) & (jpeg[1] == np.uint8(0xD8))
    if ok:
        data = jpeg
    else:
        data = types.Constant(_TINY_JPEG, device="cpu")
    return data, ok, src


def _check_screened(ok, src) -> None:
    """Raise ShardError for the first sample `_screen` flagged in a batch (ok, src: its CPU outputs)."""
    flags = np.array(ok.as_tensor()).reshape(-1)
    if flags.all():
        return
    shard, _, member = bytes(np.array(src[int(np.flatnonzero(flags == 0)[0])])).decode().partition(":")
    raise damaged(shard, "a JPEG does not decode: it does not start with a JPEG marker",
                  key=member.partition(":")[2].rsplit(".", 1)[0] or None)


def _normalize(images, channels_last: bool, mirror=None, crop: int | None = None, crop_pos=None):
    kw = {} if crop is None else dict(crop=(crop, crop), crop_pos_y=crop_pos[0], crop_pos_x=crop_pos[1])
    # float32 on every device: the Batch contract (fp16 would halve the copy on a GPU, but then an
    # fp32 recipe would feed half inputs to fp32 weights; autocast casts inside the model instead).
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, mean=_MEAN, std=_STD,
                                    output_layout="HWC" if channels_last else "CHW", mirror=mirror, **kw)


def _random_crop(image, resolution: int):
    """A random resized crop of `image` (HWC) to resolution^2; returns (view, (y0, x0, h, w) relative)."""
    shape = fn.cast(image.shape(), dtype=types.FLOAT)
    aspect = shape[1] / shape[0]  # W / H of the source
    area = fn.random.uniform(range=CROP_SCALE)
    ratio = dmath.exp(fn.random.uniform(range=(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))))
    w = dmath.min(dmath.sqrt(area * ratio / aspect), 1.0)  # fraction of the width
    h = dmath.min(dmath.sqrt(area / ratio * aspect), 1.0)  # fraction of the height
    y0 = fn.random.uniform(range=(0.0, 1.0)) * (1.0 - h)
    x0 = fn.random.uniform(range=(0.0, 1.0)) * (1.0 - w)
    start, end = fn.stack(y0, x0), fn.stack(y0 + h, x0 + w)
    view = fn.resize(image, size=(resolution, resolution), roi_start=start, roi_end=end, roi_relative=True,
                     antialias=True, interp_type=types.INTERP_LINEAR)
    return view, fn.stack(y0, x0, h, w)


def _decode(jpeg, gpu: bool, hw_decoder_load: float):
    if gpu:
        return fn.decoders.image(jpeg, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)


def _roi_view(jpeg, gpu: bool, hw_decoder_load: float, resolution: int):
    """A random resized crop decoded straight from the JPEG: only the crop's region is decoded."""
    kw = dict(device="mixed", hw_decoder_load=hw_decoder_load) if gpu else dict(device="cpu")
    region = fn.decoders.image_random_crop(jpeg, output_type=types.RGB, random_area=CROP_SCALE,
                                           random_aspect_ratio=CROP_RATIO, **kw)
    return fn.resize(region, size=(resolution, resolution), antialias=True, interp_type=types.INTERP_LINEAR)


def _train_graph(paths, rank, world_size, initial_fill, resolution, gpu, channels_last, hw_decoder_load, debug,
                 decode="once"):
    jpeg, label, index = _read(paths, rank, world_size, True, initial_fill)
    jpeg, ok, src = _screen(jpeg)
    if decode == "roi":  # two ROI decodes (`bench loader --backend dali-roi` measures it)
        weak, strong = (_roi_view(jpeg, gpu, hw_decoder_load, resolution) for _ in range(2))
        crop_q = crop_k = None
    else:  # one full decode, two crops
        image = _decode(jpeg, gpu, hw_decoder_load)
        weak, crop_q = _random_crop(image, resolution)
        strong, crop_k = _random_crop(image, resolution)
    gray = fn.cast(fn.random.coin_flip(probability=GRAY_P), dtype=types.FLOAT)
    saturation = fn.random.uniform(range=(1 - JITTER, 1 + JITTER)) * (1.0 - gray)  # 0 = grayscale
    strong = fn.color_twist(strong, brightness=fn.random.uniform(range=(1 - JITTER, 1 + JITTER)),
                            contrast=fn.random.uniform(range=(1 - JITTER, 1 + JITTER)), saturation=saturation,
                            hue=fn.random.uniform(range=(-HUE * 360, HUE * 360)))
    flip_q = fn.random.coin_flip(probability=FLIP_P)
    flip_k = fn.random.coin_flip(probability=FLIP_P)
    view_q = _normalize(weak, channels_last, mirror=flip_q)
    view_k = _normalize(strong, channels_last, mirror=flip_k)
    if gpu:
        label, index = label.gpu(), index.gpu()
    outputs = (view_q, view_k, label, index, ok, src)
    if debug:  # the sampled parameters, for tests (ROI decoding does not expose its crop windows)
        outputs += (flip_q, flip_k, gray) + ((crop_q, crop_k) if crop_q is not None else ())
    return outputs


def _eval_graph(paths, rank, world_size, resize, resolution, gpu, channels_last, hw_decoder_load):
    jpeg, label, index = _read(paths, rank, world_size, False, 1)
    jpeg, ok, src = _screen(jpeg)
    image = _decode(jpeg, gpu, hw_decoder_load)
    # Output size as views.eval_size: short side -> resize, long side floored (DALI's resize_shorter
    # rounds it, which shifts the scale and the crop by up to half a pixel).
    shape = fn.cast(image.shape(), dtype=types.FLOAT)
    short = dmath.min(shape[0], shape[1])
    size = dmath.floor(fn.stack(shape[0], shape[1]) * (resize / short) + 1e-3)  # 1e-3: float32 of exact ratios
    image = fn.resize(image, size=size, antialias=True, interp_type=types.INTERP_LINEAR)
    # Centre crop with top = round((h' - crop) / 2), Python's round (halves to even), as views.eval_view;
    # DALI's crop_pos 0.5 rounds halves up. A margin d gives start round_half_even(d / 2); asking for
    # (start + 0.25) / d lands on it whether DALI rounds or floors.
    pos = []
    for margin in (size[0] - resolution, size[1] - resolution):
        half = dmath.floor(margin / 2)
        odd_up = (margin - 2 * half) * (half - 2 * dmath.floor(half / 2))  # 1 when d odd and floor(d/2) odd
        pos.append((half + odd_up + 0.25) / dmath.max(margin, 1.0))
    image = _normalize(image, channels_last, crop=resolution, crop_pos=pos)
    if gpu:
        label, index = label.gpu(), index.gpu()
    return image, label, index, ok, src


# ----------------------------------------------------------------------------------- DALI -> torch

def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) -> a torch tensor on `device` (copied: DALI reuses its buffers)."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


def _images(tensor_list, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = _to_torch(tensor_list, device)
    if channels_last:  # B x H x W x 3 -> B x 3 x H x W with channels-last strides, no copy
        return images.permute(0, 3, 1, 2)
    return images


def _ints(tensor_list, device: torch.device) -> torch.Tensor:
    return _to_torch(tensor_list, device).reshape(-1).to(torch.int64)


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def _pipeline_error(exc: RuntimeError, paths: list[str], where: tuple[str, str]) -> ShardError:
    """DALI's many-line pipeline error -> one ShardError naming the shard when DALI's text does.

    `where` = (shards folder, split). DALI names the file for reader errors (a tar or index that
    does not match); a JPEG that does not decode is reported without its sample, so the split is named.
    """
    text = str(exc)
    found = text.split("encountered:", 1)[-1].split("C++ context", 1)[0].replace(_INVALID, "")
    detail = " ".join(found.split())[:200] or "pipeline error"
    decoder = "decoders.image" in text
    what = f"a JPEG does not decode: {detail}" if decoder else f"the tar does not read: {detail}"
    for path in paths:
        if path in text or path[:-4] + ".idx" in text:
            return damaged(path, what)
    return damaged_split(where[0], where[1], what)


def _checked(call, paths: list[str], where: tuple[str, str]):
    """`call()` (a pipeline's build or run) with DALI's errors mapped by `_pipeline_error`."""
    try:
        return call()
    except RuntimeError as exc:
        raise _pipeline_error(exc, paths, where) from None


# ----------------------------------------------------------------------------------- loaders

def _pipeline(graph, loader, seed: int, *args):
    """A built DALI pipeline of `graph(*args)` with the loader's batch, threads, device and prefetch."""
    pipe = pipeline_def(graph, enable_conditionals=True, batch_size=loader.batch_size,
                        num_threads=max(loader.workers, 1), device_id=_device_id(loader.device),
                        prefetch_queue_depth=max(loader.prefetch, 1), seed=seed & _SEED_MASK)(*args)
    _checked(pipe.build, loader._paths, loader._where)
    return pipe


class DaliTrainLoader(TrainLoaderBase):
    """Training batches (`Batch`) of one rank (base.TrainLoaderBase). `workers` = DALI threads (at
    least 1), `prefetch` = DALI's prefetch_queue_depth. Options (`loader.dali`, options.DaliOptions):
    `hw_decoder_load` (GPU only) and `decode`. `iter_debug`: the shared keys; "roi" decoding has no
    crop windows to report. Determinism and resume: module docstring.
    """

    Options = DaliOptions
    exact_resume = True
    resolution_without_rebuild = False  # a new resolution is a new pipeline (built per epoch anyway)
    debug_params = True

    def _build(self, debug: bool):
        o = self.options
        return _pipeline(_train_graph, self, mix_seed(self.seed, self.epoch, self.rank, self.world_size, self.resolution),
                         self._reader_paths("dali", native=("s3",)), self.rank, self.world_size, self.shuffle_buffer,
                         self.resolution, self.device.type == "cuda", self.channels_last, o.hw_decoder_load, debug,
                         o.decode)

    def _iterate(self, debug: bool) -> Iterator[tuple[Batch, dict | None]]:
        pipe = self._build(debug)
        try:
            for step in range(self._steps):
                out = _checked(pipe.run, self._paths, self._where)
                if step < self.start_step:
                    continue  # a resumed epoch: the batches before start_step, drawn and dropped
                _check_screened(out[4], out[5])
                batch = Batch(_images(out[0], self.device, self.channels_last),
                              _images(out[1], self.device, self.channels_last),
                              _ints(out[2], self.device), _ints(out[3], self.device))
                yield batch, (_debug_params(out[6:]) if debug else None)
        finally:
            del pipe


def _debug_params(outputs) -> dict:
    flip_q, flip_k, gray, *crops = (np.array(o.as_tensor()) for o in outputs)
    params = {"flip_q": flip_q.reshape(-1).astype(bool), "flip_k": flip_k.reshape(-1).astype(bool),
              "gray": gray.reshape(-1) > 0.5}
    if crops:
        params.update(crop_q=crops[0], crop_k=crops[1])
    return params


class DaliEvalLoader(EvalLoaderBase):
    """Eval batches (`EvalBatch`) of one rank (base.EvalLoaderBase), in shard order. View: resize the
    shorter side to `resize` (antialiased bilinear), centre crop `resolution`, as `views.eval_view`
    up to the resize kernels' rounding. Options: `loader.dali.hw_decoder_load`.
    """

    Options = DaliOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The reader's own share bounds (DALI: start = N * shard_id / num_shards).
        n, r, w = self.num_samples, self.rank, self.world_size
        self.share = (n * (r + 1) // w) - (n * r // w)

    def __len__(self) -> int:
        return -(-self.share // self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        if self.share == 0:
            return
        pipe = _pipeline(_eval_graph, self, 0, self._reader_paths("dali", native=("s3",)), self.rank, self.world_size,
                         self.resize, self.resolution, self.device.type == "cuda", self.channels_last,
                         self.options.hw_decoder_load)
        left = self.share
        while left > 0:
            image, label, index, ok, src = _checked(pipe.run, self._paths, self._where)
            _check_screened(ok, src)
            n = min(left, self.batch_size)  # the last batch is trimmed to the share
            yield EvalBatch(_images(image, self.device, self.channels_last)[:n],
                            _ints(label, self.device)[:n], _ints(index, self.device)[:n])
            left -= n
        del pipe


# The names the backend factory (mopro_fast.data.build_*_loader) looks up.
TrainLoader = DaliTrainLoader
EvalLoader = DaliEvalLoader
