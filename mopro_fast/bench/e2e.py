"""`mopro-fast bench e2e`: real MoPro training steps from shards, loader and step together.

What a training run would see (DESIGN.md section 3, STYLE.md point 8): the loader backend reads
the shards and makes both views, `mopro_fast.train.train_step` (the trainer's own step: forward
under autocast, MoPro losses, backward, SGD, prototype/queue/key-network updates) consumes them.
After `warmup` untimed steps (worker start, cudnn autotune, `torch.compile`), `windows` windows of
`window_steps` steps are timed, each ending with a device synchronisation. Per window:
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
import time
from pathlib import Path
from typing import Any

import click

from mopro_fast.bench.common import emit, environment
from mopro_fast.bench.core import _ARCHS, _device_option, _json_option, _resolve_device


def _build_training(classes: int, arch: str, small_stem: bool, device, precision: str, compiled: bool,
                    channels_last: bool):
    """Model, optimiser, scaler, autocast and step function as `mopro_fast.train.train` builds them."""
    import torch

    from mopro_fast import runtime
    from mopro_fast.model import MoProNet
    from mopro_fast.mopro import MoPro
    from mopro_fast.step import mopro_step

    torch.manual_seed(0)
    mopro = MoPro(MoProNet(classes, arch, small_stem=small_stem), classes, queue_length=8192).to(device)
    if channels_last:
        mopro.to(memory_format=torch.channels_last)
    optimizer = runtime.sgd(mopro.query.parameters(), 0.1, 0.9, 1e-4, False, "auto", device)
    step_fn = torch.compile(mopro_step) if compiled else mopro_step
    return mopro, optimizer, runtime.grad_scaler(device, precision), runtime.autocast(device, precision), step_fn


def run_e2e_bench(shards: Path, split: str, backend: str, arch: str, res: int, batch: int, workers: int,
                  device_name: str, precision: str, compiled: bool, small_stem: bool, channels_last: bool,
                  warmup: int, windows: int, window_steps: int) -> dict[str, Any]:
    """The `bench e2e` result for one backend on existing shards."""
    import torch

    from mopro_fast import runtime
    from mopro_fast.data import build_train_loader
    from mopro_fast.data.manifest import read_manifest
    from mopro_fast.train import train_step

    device = _resolve_device(device_name)
    runtime.configure_backends(device, cudnn_benchmark=True, tf32=True, deterministic=False)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    manifest = read_manifest(shards)
    classes = manifest.num_classes
    mopro, optimizer, scaler, autocast, step_fn = _build_training(classes, arch, small_stem, device, precision,
                                                                 compiled, channels_last)
    steps = warmup + windows * window_steps
    extra = {"dtype": runtime.DTYPES[precision]} if backend == "nvjpeg" and cuda else {}
    loader = build_train_loader(backend, **extra, shards=shards, split=split, batch_size=batch, resolution=res,
                                workers=workers, shuffle_buffer=1000, seed=0, rank=0, world_size=1, device=device,
                                channels_last=channels_last, steps_per_epoch=steps)
    loader.set_epoch(0)
    batches = iter(loader)

    def one_step(b) -> None:
        train_step(True, step_fn, mopro, mopro.query, optimizer, scaler, autocast, b, use_proto=True, clean=True,
                   truth=None)

    start = time.perf_counter()
    held = None
    for _ in range(warmup):
        held = next(batches)
        one_step(held)
    sync()
    warm_s = time.perf_counter() - start
    rates, waits = [], []
    for _ in range(windows):
        wait = 0.0
        start = time.perf_counter()
        for _ in range(window_steps):
            t0 = time.perf_counter()
            b = next(batches)
            wait += time.perf_counter() - t0
            one_step(b)
        sync()
        elapsed = time.perf_counter() - start
        rates.append(batch * window_steps / elapsed)
        waits.append(wait / elapsed)
    for _ in batches:  # let the loader close its epoch (it checks its step count)
        pass
    # Same run, same step, no loader: one batch kept on the device.
    if held is None:
        held = next(iter(loader))
    step_rates = []
    for i in range(windows + 1):
        start = time.perf_counter()
        for _ in range(window_steps):
            one_step(held)
        sync()
        if i:  # the first window re-warms
            step_rates.append(batch * window_steps / (time.perf_counter() - start))
    e2e, step_only = statistics.median(rates), statistics.median(step_rates)
    return {
        "bench": "e2e",
        "backend": backend,
        "img_s": round(e2e, 1),
        "data_wait": round(statistics.median(waits), 4),
        "step_only_img_s": round(step_only, 1),
        "loader_cost": round(1 - e2e / step_only, 4),
        "window_img_s": [round(r, 1) for r in rates],
        "window_data_wait": [round(w, 4) for w in waits],
        "warmup_s": round(warm_s, 2),
        "settings": {"backend": backend, "arch": arch, "res": res, "batch": batch, "workers": workers,
                     "precision": precision, "compile": compiled, "small_stem": small_stem,
                     "channels_last": channels_last, "warmup_steps": warmup, "windows": windows,
                     "window_steps": window_steps, "classes": classes, "split": split,
                     "samples": manifest.num_written(split), "shards": str(shards), "device": str(device)},
        "env": environment(str(device)),
    }


@click.command("e2e")
@click.option("--backend", default="nvjpeg", show_default=True,
              type=click.Choice(["torch", "dali", "ffcv", "nvjpeg"]), help="Loader backend.")
@click.option("--arch", type=click.Choice(_ARCHS), default="resnet50", show_default=True)
@click.option("--res", default=224, show_default=True, help="Crop size of both views.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1), help="Batch size per step.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Loader workers [default: all cores].")
@_device_option
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Autocast dtype [default: bf16 on CUDA, fp32 on CPU].")
@click.option("--compile", "compiled", is_flag=True, help="torch.compile the MoPro step (warm-up pays it).")
@click.option("--small-stem", is_flag=True, help="3x3 stem without max-pool (for 32-64 px inputs).")
@click.option("--nchw", is_flag=True, help="NCHW instead of channels-last (model and batches).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(1), help="Untimed steps first.")
@click.option("--windows", default=5, show_default=True, type=click.IntRange(1), help="Timed windows (median).")
@click.option("--window-steps", default=4, show_default=True, type=click.IntRange(1), help="Steps per window.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Existing shards (with manifest.json) [default: the built-in data set at web sizes].")
@click.option("--split", default="train", show_default=True)
@click.option("--quick", is_flag=True, help="CI size: resnet18, 32 px, batch 8, 2 windows of 2 steps.")
@_json_option
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
    dev = _resolve_device(device)
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    workers = (os.cpu_count() or 1) if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="mopro-bench-e2e-") as tmp:
        if shards is None:
            classes, per_class, size = (4, 12, 96) if quick else (10, 80, 448)
            shards = make_shards(Path(tmp), classes, per_class, size, max(50, classes * per_class // 8),
                                 max_side=min(size, 384))
        result = run_e2e_bench(shards, split, backend, arch, res, batch, workers, str(dev), precision, compiled,
                               small_stem, not nchw, warmup, windows, window_steps)
    emit(result, as_json)
