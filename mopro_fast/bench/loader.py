"""`mopro-fast bench loader`: two-view training images/s of the loader backends, same shards, same run.

Every backend gets the same shards, split, resolution, batch size and worker count (DataLoader
processes for torch and nvjpeg, DALI threads for dali, FFCV/numba threads for ffcv, which reads the
.beton written from the same shards) and the same device (`--device`; on CUDA
each timed window ends with a device synchronisation, so queued GPU work is counted; nvjpeg then
hands over bf16 views, the others their fp32 Batch contract). Per backend: build the training loader
and time it to its first batch (`first_batch_s`: start-up, FFCV's numba JIT, DALI's pipeline build),
let `warmup` more batches pass untimed (page cache, pipeline prefetch), then time
`windows` windows of `window_batches` batches each; images/s is the median over windows. One
"image" is one sample with both of its views made (a weak and a strong crop of one decode).
Without `--shards`, realistic shards are made on the spot: the built-in data set rendered at
`--image-size` px (shorter side), converted with `--max-side` (default 384: stored images of
about 384 x 450-510 px, web-like sizes; `mopro-fast convert`'s own default is 256), with
`--format both` when ffcv is measured (FFCV's default write options). With `--shards`, ffcv needs
a conversion made with `--format both`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from mopro_fast.bench.kit import (device_option, emit, environment, interleaved, json_option, resolve_device,
                                  time_ms)

BACKENDS = ("torch", "dali", "dali-roi", "ffcv", "nvjpeg")
# "dali-roi": the dali backend with two ROI decodes per image (each decodes only its crop's region)
# instead of its default of one decode and two crops; measured to pick the DALI default.
VARIANTS = {"dali-roi": ("dali", {"decode": "roi"})}


def available_backends() -> list[str]:
    """The backends of BACKENDS that import here (DALI is optional)."""
    from mopro_fast.data import BackendUnavailable, _backend

    out = []
    for name in BACKENDS:
        if name in VARIANTS:
            continue  # alternatives are measured when asked for
        try:
            _backend(VARIANTS.get(name, (name, {}))[0])
        except BackendUnavailable:
            continue
        out.append(name)
    return out


def make_shards(out: Path, classes: int, per_class: int, image_size: int, shard_size: int,
                max_side: int = 384, fmt: str = "wds") -> Path:
    """Built-in data set at `image_size` px converted to shards (`fmt`) under `out`; returns the shards folder."""
    from data_tools.convert import ConvertSettings, convert
    from data_tools.fixture import FixtureSpec, make_fixture

    make_fixture(out / "src", FixtureSpec(classes=classes, train_per_class=per_class, val_per_class=0,
                                          imagenet_per_class=0, image_size=image_size, seed=0))
    convert(out / "src", out / "shards", ConvertSettings(shard_size=shard_size, max_side=max_side), progress=False,
            fmt=fmt)
    return out / "shards"


def measure(backend: str, shards: Path, split: str, resolution: int, batch_size: int, workers: int,
            warmup: int, windows: int, window_batches: int, device: str = "cpu") -> dict:
    """Median two-view images/s of one backend's training loader over timed windows of batches."""
    import torch

    from mopro_fast.data import build_train_loader

    steps = 1 + warmup + windows * window_batches
    backend, extra = VARIANTS.get(backend, (backend, {}))
    dev = resolve_device(device)
    if backend == "nvjpeg" and dev.type == "cuda":
        extra = {**extra, "dtype": torch.bfloat16}  # what a bf16 run feeds its first convolution
    held: dict = {}

    def first_batch() -> None:  # build + first batch (JIT/compile, worker start-up)
        loader = build_train_loader(backend, **extra, shards=shards, split=split, batch_size=batch_size,
                                    resolution=resolution, workers=workers, shuffle_buffer=1000, seed=0, rank=0,
                                    world_size=1, device=device, steps_per_epoch=steps)
        loader.set_epoch(0)
        held["it"] = iter(loader)
        next(held["it"])

    def batches(n: int):
        def take() -> None:
            for _ in range(n):
                next(held["it"])
        return take

    # Wall clock between device synchronisations: a loader's GPU work may run on its own streams.
    first_ms = time_ms(first_batch, dev, wall=True)
    warm_ms = time_ms(batches(warmup), dev, wall=True)
    (timing,) = interleaved([batches(window_batches)], dev, windows, warmup=0, wall=True)
    for _ in held["it"]:  # let the loader finish its epoch (torch checks its step count at the end)
        pass
    images = batch_size * window_batches
    return {"img_s": round(timing.median_rate(images), 1),
            "window_img_s": [round(r, 1) for r in timing.rates(images)], "first_batch_s": round(first_ms / 1e3, 2),
            "warmup_s": round(warm_ms / 1e3, 2), "spread": round(timing.spread, 3)}


def run_loader_bench(backends: list[str], shards: Path | None, split: str, resolution: int, batch_size: int,
                     workers: int, warmup: int, windows: int, window_batches: int, classes: int, per_class: int,
                     image_size: int, max_side: int = 384, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory(prefix="mopro-bench-loader-") as tmp:
        made = shards is None
        if made:
            shard_size = max(50, classes * per_class // 8)
            shards = make_shards(Path(tmp), classes, per_class, image_size, shard_size, max_side,
                                 fmt="both" if "ffcv" in backends else "wds")
        from mopro_fast.data.manifest import read_manifest

        samples = read_manifest(shards).num_written(split)
        per_backend = {b: measure(b, shards, split, resolution, batch_size, workers, warmup, windows, window_batches,
                                  device) for b in backends}
    result = {"bench": "loader", "img_s": {b: r["img_s"] for b, r in per_backend.items()},
              "first_batch_s": {b: r["first_batch_s"] for b, r in per_backend.items()}}
    if "torch" in per_backend and "ffcv" in per_backend:
        result["ratio_ffcv_torch"] = round(per_backend["ffcv"]["img_s"] / per_backend["torch"]["img_s"], 2)
    if "torch" in per_backend and "dali" in per_backend:
        result["ratio_dali_torch"] = round(per_backend["dali"]["img_s"] / per_backend["torch"]["img_s"], 2)
    if "torch" in per_backend and "nvjpeg" in per_backend:
        result["ratio_nvjpeg_torch"] = round(per_backend["nvjpeg"]["img_s"] / per_backend["torch"]["img_s"], 2)
    if "dali" in per_backend and "dali-roi" in per_backend:
        result["ratio_dali_roi_vs_once"] = round(per_backend["dali-roi"]["img_s"] / per_backend["dali"]["img_s"], 2)
    result["details"] = per_backend
    result["settings"] = {"backends": backends, "resolution": resolution, "batch_size": batch_size,
                          "workers": workers, "warmup_batches": warmup, "windows": windows,
                          "window_batches": window_batches, "split": split, "samples": samples,
                          "shards": "built-in" if made else str(shards), "device": device}
    if made:
        result["settings"].update({"classes": classes, "per_class": per_class, "image_size": image_size,
                                   "max_side": max_side})
    result["env"] = environment(device)
    return result


@click.command("loader")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Backend to measure (repeatable) [default: every installed one of torch, dali, ffcv, nvjpeg; "
                   "dali-roi = dali with two ROI decodes instead of one decode and two crops].")
@click.option("--res", "resolution", default=224, show_default=True, help="Crop size of both views.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(1),
              help="DataLoader workers (torch, nvjpeg) = DALI threads (dali) [default: all cores].")
@device_option("Where the batches are delivered: 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Existing shards folder (with manifest.json) instead of generated ones.")
@click.option("--split", default="train", show_default=True)
@click.option("--warmup", default=4, show_default=True, type=click.IntRange(0), help="Untimed batches first.")
@click.option("--windows", default=5, show_default=True, type=click.IntRange(1), help="Timed windows (median).")
@click.option("--window-batches", default=4, show_default=True, type=click.IntRange(1), help="Batches per window.")
@click.option("--classes", default=10, show_default=True, help="Classes of the generated data set.")
@click.option("--per-class", default=80, show_default=True, help="Training images per class (generated).")
@click.option("--image-size", default=448, show_default=True, help="Shorter side of the generated images.")
@click.option("--max-side", default=384, show_default=True,
              help="Shorter side the generated images are stored at (convert --max-side).")
@click.option("--quick", is_flag=True, help="CI-sized: 4 x 20 images at 160 px, res 64, batch 16, 2 windows of 2.")
@json_option
def loader_bench(backends: tuple[str, ...], resolution: int, batch_size: int, workers: int | None,
                 device: str, shards: Path | None, split: str, warmup: int, windows: int, window_batches: int,
                 classes: int, per_class: int, image_size: int, max_side: int, quick: bool, as_json: bool) -> None:
    """Two-view training images/s of the loader backends on the same shards and device."""
    chosen = list(backends) or available_backends()
    if quick:
        resolution, batch_size, warmup, windows, window_batches = 64, 16, 1, 2, 2
        classes, per_class, image_size = 4, 20, 160
    from mopro_fast.data import BackendUnavailable
    from mopro_fast.data.manifest import ManifestError

    try:
        result = run_loader_bench(chosen, shards, split, resolution, batch_size, workers or os.cpu_count() or 1,
                                  warmup, windows, window_batches, classes, per_class, image_size, max_side,
                                  str(resolve_device(device)))
    except (BackendUnavailable, ManifestError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    emit(result, as_json)
