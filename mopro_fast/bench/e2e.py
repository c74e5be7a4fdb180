"""`mopro-fast bench e2e`: real MoPro training steps from shards, loader and step together.

What a training run would see (DESIGN.md section 3, STYLE.md point 8): the loader backend reads
the shards and makes both views, `mopro_fast.training.train.train_step` (the trainer's own step: forward
under autocast, MoPro losses, backward, SGD, prototype/queue/key-network updates) consumes them.
The model, optimiser, GradScaler and step function come from the trainer's `build_model`
(`mopro_fast.bench.step.build`). After `warmup` untimed steps (worker start, cudnn autotune,
`torch.compile`), `windows` windows of `window_steps` steps are timed (`mopro_fast.bench.kit`,
wall clock between device synchronisations: the loaders' GPU work may run on their own streams).
Per window:
- images/s: samples stepped per second;
- data wait: the share of the window the host spent blocked in `next(loader)`, the trainer's own
  `data_wait` metric (on CUDA the host runs ahead of the GPU, so this counts starvation as the
  training loop sees it).
Medians over windows are reported. In the same run the same step is timed on one batch held on
the device (no loader at all): `step_only_img_s`, and `loader_cost` = 1 - e2e / step-only is the
share of throughput the data path costs, wherever that cost lands (host wait, or GPU time the
augmentation takes from the step).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click

from mopro_fast.bench.kit import (arch_option, default_precision, emit, environment, interleaved, json_option,
                                  resolve_device, time_ms, timings, training_options)


def run_e2e_bench(shards: Path, split: str, backend: str, arch: str, res: int, batch: int, workers: int,
                  device_name: str, precision: str, compiled: bool, small_stem: bool, channels_last: bool,
                  warmup: int, windows: int, window_steps: int) -> dict[str, Any]:
    """The `bench e2e` result for one backend on existing shards."""
    from mopro_fast.training import runtime
    from mopro_fast.bench.step import build, stepper, training_config
    from mopro_fast.data import build_train_loader
    from mopro_fast.data.manifest import read_manifest
    from mopro_fast.training.observe import LogWindow

    device = resolve_device(device_name)
    runtime.configure_backends(device, cudnn_benchmark=True, tf32=True, deterministic=False)
    manifest = read_manifest(shards)
    classes = manifest.num_classes
    one_step = stepper(build(training_config(arch, small_stem, precision, channels_last, compiled), classes, device))
    steps = warmup + windows * window_steps
    extra = {"dtype": runtime.DTYPES[precision]} if backend == "nvjpeg" and device.type == "cuda" else {}
    loader = build_train_loader(backend, **extra, shards=shards, split=split, batch_size=batch, resolution=res,
                                workers=workers, shuffle_buffer=1000, seed=0, rank=0, world_size=1, device=device,
                                channels_last=channels_last, steps_per_epoch=steps)
    loader.set_epoch(0)
    batches, held, waits, window = iter(loader), [], [], LogWindow(batch)

    def from_loader(n: int):
        def run() -> None:  # n steps on loader batches; the trainer's data-wait count (ms) -> waits
            window.reset()
            for _ in range(n):
                held[:] = [window.fetch(batches)]
                one_step(held[0])
            waits.append(window.wait * 1e3)
        return run

    # Wall clock between device synchronisations: the loader's GPU work may run on its own streams.
    warm_ms = time_ms(from_loader(warmup), device, wall=True)
    waits.clear()
    (e2e,) = interleaved([from_loader(window_steps)], device, windows, warmup=0, wall=True)
    for _ in batches:  # let the loader close its epoch (it checks its step count)
        pass
    # Same run, same step, no loader: one batch kept on the device; the first window re-warms.
    def held_batch() -> None:
        for _ in range(window_steps):
            one_step(held[0])

    (step_only,) = interleaved([held_batch], device, windows, warmup=1, wall=True)
    images = batch * window_steps
    shares = [w / t for w, t in zip(waits, e2e.times_ms)]
    rate, step_rate = e2e.median_rate(images), step_only.median_rate(images)
    return {
        "bench": "e2e",
        "backend": backend,
        "img_s": round(rate, 1),
        "data_wait": round(statistics.median(shares), 4),
        "step_only_img_s": round(step_rate, 1),
        "loader_cost": round(1 - rate / step_rate, 4),
        "window_img_s": [round(r, 1) for r in e2e.rates(images)],
        "window_data_wait": [round(w, 4) for w in shares],
        "warmup_s": round(warm_ms / 1e3, 2),
        "settings": {"backend": backend, "arch": arch, "res": res, "batch": batch, "workers": workers,
                     "precision": precision, "compile": compiled, "small_stem": small_stem,
                     "channels_last": channels_last, "warmup_steps": warmup, "windows": windows,
                     "window_steps": window_steps, "classes": classes, "split": split,
                     "samples": manifest.num_written(split), "shards": str(shards), "device": str(device)},
        "timings": timings(e2e=e2e, step_only=step_only),
        "env": environment(device),
    }


@click.command("e2e")
@click.option("--backend", default="nvjpeg", show_default=True,
              type=click.Choice(["torch", "dali", "ffcv", "nvjpeg"]), help="Loader backend.")
@arch_option(help="Encoder trunk (torchvision ResNet).")
@click.option("--res", default=224, show_default=True, help="Crop size of both views.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1), help="Batch size per step.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Loader workers [default: all cores].")
@training_options
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(1), help="Untimed steps first.")
@click.option("--windows", default=5, show_default=True, type=click.IntRange(1), help="Timed windows (median).")
@click.option("--window-steps", default=4, show_default=True, type=click.IntRange(1), help="Steps per window.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Existing shards (with manifest.json) [default: the built-in data set at web sizes].")
@click.option("--split", default="train", show_default=True)
@click.option("--quick", is_flag=True, help="CI size: resnet18, 32 px, batch 8, 2 windows of 2 steps.")
@json_option
def e2e_bench(backend: str, arch: str, res: int, batch: int, workers: int | None, device: str, precision: str | None,
              compiled: bool, small_stem: bool, nchw: bool, warmup: int, windows: int, window_steps: int,
              shards: Path | None, split: str, quick: bool, as_json: bool) -> None:
    """Real MoPro training steps from shards: images/s and the share of time spent waiting for data."""
    from mopro_fast.bench.loader import make_shards
    from mopro_fast.data import BackendUnavailable, _backend

    try:
        _backend(backend)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if quick:
        arch, res, batch, small_stem, warmup, windows, window_steps = "resnet18", 32, 8, False, 1, 2, 2
    dev = resolve_device(device)
    precision = default_precision(dev, precision)
    workers = (os.cpu_count() or 1) if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="mopro-bench-e2e-") as tmp:
        if shards is None:
            classes, per_class, size = (4, 12, 96) if quick else (10, 80, 448)
            shards = make_shards(Path(tmp), classes, per_class, size, max(50, classes * per_class // 8),
                                 max_side=min(size, 384))
        result = run_e2e_bench(shards, split, backend, arch, res, batch, workers, str(dev), precision, compiled,
                               small_stem, not nchw, warmup, windows, window_steps)
    emit(result, as_json)
