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

import datetime
import gc
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
YARDSTICKS = ("original", "decode-only")  # --baseline original: the original's PIL path, and the decode ceiling


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


# Web photos' aspect ratios (w / h) and their shares: an assumption (camera 4:3 and 3:2, wide 16:9,
# square, portrait), stated so it can be changed; the built-in renderer draws 3/4-4/3 only.
PHOTO_ASPECTS = ((4 / 3, 0.40), (3 / 2, 0.25), (16 / 9, 0.10), (1.0, 0.05), (3 / 4, 0.12), (2 / 3, 0.08))


def real_photos() -> list[Path]:
    """The real photographs the installed packages ship: matplotlib's grace_hopper.jpg (a dependency)
    and scikit-learn's china.jpg and flower.jpg (the `transfer` extra) where installed."""
    found = []
    try:
        import matplotlib

        found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn.datasets

        images = Path(sklearn.datasets.__file__).parent / "images"
        found += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    return [p for p in found if p.is_file()]


def replace_with_photo_crops(src: Path, photos: list[Path], seed: int = 0) -> int:
    """Overwrite every JPEG under `src` with a crop of one of `photos`: a random box with an aspect
    ratio drawn from PHOTO_ASPECTS and a shorter side of 256-400 px (quality 95, as a web original):
    the decode cost of real photographs, not of the smooth built-in drawings. Returns how many."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ratios, shares = zip(*PHOTO_ASPECTS)
    pictures = [Image.open(p).convert("RGB") for p in photos]
    files = sorted(src.rglob("*.jpg")) + sorted(src.rglob("*.JPEG"))
    for path in files:
        picture = pictures[int(rng.integers(len(pictures)))]
        ratio = float(rng.choice(ratios, p=np.array(shares) / sum(shares)))
        W, H = picture.size
        h = int(min(H, W / ratio) * rng.uniform(0.6, 1.0))  # the box: as large as fits, then 60-100 % of it
        w = int(h * ratio)
        y, x = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
        short = int(rng.integers(256, 401))
        size = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
        picture.crop((x, y, x + w, y + h)).resize(size, Image.BILINEAR).save(path, "JPEG", quality=95)
    return len(files)


def make_shards(out: Path, classes: int, per_class: int, image_size: int, shard_size: int,
                max_side: int = 384, fmt: str = "wds", photos: bool = False) -> Path:
    """Built-in data set at `image_size` px converted to shards (`fmt`) under `out`; returns the shards
    folder. `photos`: the source images replaced by crops of real photographs first (see
    `replace_with_photo_crops`; the drawings stay where no photograph is installed)."""
    from data_tools.convert import ConvertSettings, convert
    from data_tools.fixture import FixtureSpec, make_fixture

    make_fixture(out / "src", FixtureSpec(classes=classes, train_per_class=per_class, val_per_class=0,
                                          imagenet_per_class=0, image_size=image_size, seed=0))
    photos = real_photos() if photos else []
    if photos:
        replace_with_photo_crops(out / "src", photos)
    convert(out / "src", out / "shards", ConvertSettings(shard_size=shard_size, max_side=max_side), progress=False,
            fmt=fmt)
    return out / "shards"


def _backend_batches(backend: str, shards: Path, split: str, resolution: int, batch_size: int, workers: int,
                     steps: int, device: str):
    """An iterator over `steps` training batches of one backend's loader (epoch 0)."""
    import torch

    from mopro_fast.data import build_train_loader

    backend, extra = VARIANTS.get(backend, (backend, {}))
    if backend == "nvjpeg" and resolve_device(device).type == "cuda":
        extra = {**extra, "dtype": torch.bfloat16}  # what a bf16 run feeds its first convolution
    loader = build_train_loader(backend, **extra, shards=shards, split=split, batch_size=batch_size,
                                resolution=resolution, workers=workers, shuffle_buffer=1000, seed=0, rank=0,
                                world_size=1, device=device, steps_per_epoch=steps)
    loader.set_epoch(0)
    return iter(loader)


def measure(backend: str, shards: Path, split: str, resolution: int, batch_size: int, workers: int,
            warmup: int, windows: int, window_batches: int, device: str = "cpu",
            loose: Path | None = None) -> dict:
    """Median two-view images/s of one backend's training loader (or of a yardstick of original.py,
    read from the loose folder `loose`) over timed windows of batches."""
    from mopro_fast.bench import original

    steps = 1 + warmup + windows * window_batches
    dev = resolve_device(device)
    if backend == "original":
        make = lambda: original.original_batches(loose, resolution, batch_size, workers, steps)  # noqa: E731
    elif backend == "decode-only":
        jpegs = original.jpegs_of(loose)
        make = lambda: original.decode_only_batches(jpegs, batch_size, workers, steps)  # noqa: E731
    else:
        make = lambda: _backend_batches(backend, shards, split, resolution, batch_size, workers, steps,  # noqa: E731
                                        device)
    held: dict = {}

    def first_batch() -> None:  # build + first batch (JIT/compile, worker start-up)
        held["it"] = make()
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
    del held["it"]  # shut the workers down now, not at interpreter exit (where they abort noisily)
    gc.collect()
    images = batch_size * window_batches
    return {"img_s": round(timing.median_rate(images), 1),
            "window_img_s": [round(r, 1) for r in timing.rates(images)], "first_batch_s": round(first_ms / 1e3, 2),
            "warmup_s": round(warm_ms / 1e3, 2), "spread": round(timing.spread, 3)}


def _child(results, fn, args, kwargs) -> None:
    try:
        results.put(("ok", fn(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001 - sent back and raised in the parent
        try:
            results.put(("error", exc))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            results.put(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


def in_fresh_process(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh (spawned) interpreter: no process-wide state of one measured
    path (the allocator setting our loaders make, data/host_memory.py; thread pools; a warm JIT)
    carries into the next, and the original's path runs as it does on its own. Its exception is
    raised here."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(results, fn, args, kwargs))  # not daemonic: it starts workers
    child.start()
    try:
        status, value = results.get()
    finally:
        child.join()
    if status == "error":
        raise value
    return value


def _median(values: list[float]) -> float:
    import statistics

    return round(statistics.median(values), 2)


def _ratios(img_s: dict[str, float], to: str) -> dict[str, float]:
    """Each loader backend's images/s over `to`'s (the yardsticks themselves left out)."""
    return {b: round(v / img_s[to], 2) for b, v in img_s.items() if b not in YARDSTICKS and img_s.get(to)}


def _summarise(per_round: list[dict[str, dict]], res: str, rounds: int, yardsticks: bool) -> dict:
    """One size's entry: per path the median over rounds of its images/s, per backend the median of its
    ratios within each round (and the per-round values when there are several)."""
    rounds_img_s = [{b: r["img_s"] for b, r in rd[res].items()} for rd in per_round]
    entry = {"img_s": {b: _median([x[b] for x in rounds_img_s]) for b in rounds_img_s[0]},
             "details": per_round[-1][res]}
    if rounds > 1:
        entry["rounds_img_s"] = {b: [x[b] for x in rounds_img_s] for b in rounds_img_s[0]}
    if yardsticks:
        for key, to in (("vs_original", "original"), ("of_limit", "decode-only")):
            each = [_ratios(x, to) for x in rounds_img_s]
            entry[key] = {b: _median([e[b] for e in each]) for b in each[0]}
            if rounds > 1:
                entry[f"rounds_{key}"] = {b: [e[b] for e in each] for b in each[0]}
    return entry


def run_loader_bench(backends: list[str], shards: Path | None, split: str, resolution: int | list[int],
                     batch_size: int, workers: int, warmup: int, windows: int, window_batches: int, classes: int,
                     per_class: int, image_size: int, max_side: int = 384, device: str = "cpu",
                     baseline: str | None = None, photos: bool = False, fresh: bool = True,
                     rounds: int = 1) -> dict:
    """One report: every backend at every resolution (the first one's figures at the top level, every
    one's under `by_res`); with `baseline="original"` also the original's PIL path and the
    decode-only ceiling, and each backend's ratio to both. `fresh`: every path measured in its own
    spawned interpreter (`in_fresh_process`; False for the CI-sized run, where start-up would
    dominate). `rounds`: the whole set repeated, medians over rounds (`details`: the last round's)."""
    resolutions = [resolution] if isinstance(resolution, int) else list(resolution)
    with tempfile.TemporaryDirectory(prefix="mopro-bench-loader-") as tmp:
        made = shards is None
        if made:
            shard_size = max(50, classes * per_class // 8)
            shards = make_shards(Path(tmp), classes, per_class, image_size, shard_size, max_side,
                                 fmt="both" if "ffcv" in backends else "wds", photos=photos)
        from mopro_fast.data.manifest import read_manifest

        samples = read_manifest(shards).num_written(split)
        loose = None
        if baseline == "original":
            from mopro_fast.bench.original import write_loose

            loose = write_loose(shards, split, Path(tmp) / "loose")
        args = (split, batch_size, workers, warmup, windows, window_batches, device)

        def run(name: str, res: int) -> dict:
            s, b, w, wu, nw, wb, dev = args
            call = in_fresh_process if fresh else (lambda fn, *a, **k: fn(*a, **k))
            return call(measure, name, shards, s, res, b, w, wu, nw, wb, dev, loose=loose)

        # Rounds: every path once per round, rounds one after another, so a slow spell of a shared
        # machine hits every path; per path the median over rounds of its window medians, per backend
        # the median over rounds of its ratio within the round.
        per_round: list[dict[str, dict]] = []
        for _ in range(rounds):
            limit = run("decode-only", resolutions[0]) if loose else None  # one decode per image: no resolution
            per_round.append({str(res): {**({"original": run("original", res)} if loose else {}),
                                         **{b: run(b, res) for b in backends},
                                         **({"decode-only": limit} if loose else {})} for res in resolutions})
        by_res = {res: _summarise(per_round, res, rounds, loose is not None) for res in map(str, resolutions)}
    first = by_res[str(resolutions[0])]
    per_backend = first["details"]
    result = {"bench": "loader", "img_s": first["img_s"],
              "first_batch_s": {b: r["first_batch_s"] for b, r in per_backend.items()}}
    if loose:
        result["vs_original"], result["of_limit"] = first["vs_original"], first["of_limit"]
    for other, key in (("ffcv", "ratio_ffcv_torch"), ("dali", "ratio_dali_torch"), ("nvjpeg", "ratio_nvjpeg_torch")):
        if "torch" in per_backend and other in per_backend:
            result[key] = round(first["img_s"][other] / first["img_s"]["torch"], 2)
    if "dali" in per_backend and "dali-roi" in per_backend:
        result["ratio_dali_roi_vs_once"] = round(first["img_s"]["dali-roi"] / first["img_s"]["dali"], 2)
    result["details"] = per_backend
    result["by_res"] = {res: {k: v for k, v in e.items() if k != "details"} for res, e in by_res.items()}
    if len(resolutions) > 1:
        result["by_res_details"] = {res: e["details"] for res, e in by_res.items()}
    result["settings"] = {"backends": backends, "baseline": baseline, "resolution": resolutions[0],
                          "resolutions": resolutions, "batch_size": batch_size,
                          "workers": workers, "warmup_batches": warmup, "windows": windows,
                          "window_batches": window_batches, "split": split, "samples": samples,
                          "shards": "built-in" if made else str(shards), "device": device,
                          "each_path": "a fresh interpreter" if fresh else "one interpreter", "rounds": rounds}
    if made:
        result["settings"].update({"classes": classes, "per_class": per_class, "image_size": image_size,
                                   "max_side": max_side,
                                   "photos": [p.name for p in real_photos()] if photos else []})
    result["env"] = environment(device)
    result["date"] = datetime.date.today().isoformat()
    return result


@click.command("loader")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Backend to measure (repeatable) [default: every installed one of torch, dali, ffcv, nvjpeg; "
                   "dali-roi = dali with two ROI decodes instead of one decode and two crops].")
@click.option("--baseline", type=click.Choice(["original"]),
              help="Also measure the original MoPro code's data path (PIL + torchvision on loose JPEGs, the "
                   "shards' own images written out once) and the decode-only ceiling (one libjpeg-turbo decode "
                   "per image, same workers), and report every backend's ratio to both. Generated data are then "
                   "web-like: stored at --max-side 256 with web photos' aspect ratios.")
@click.option("--res", "resolutions", multiple=True, type=click.IntRange(8), default=(224,), show_default=True,
              help="Crop size of both views (repeatable: every backend at every size, one report; the first one's "
                   "figures at the top level).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(1),
              help="DataLoader workers (torch, nvjpeg, original) = DALI / FFCV threads [default: all cores].")
@device_option("Where the batches are delivered: 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Existing shards folder (with manifest.json) instead of generated ones.")
@click.option("--split", default="train", show_default=True)
@click.option("--warmup", default=4, show_default=True, type=click.IntRange(0), help="Untimed batches first.")
@click.option("--windows", default=5, show_default=True, type=click.IntRange(1), help="Timed windows (median).")
@click.option("--window-batches", default=4, show_default=True, type=click.IntRange(1), help="Batches per window.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1),
              help="Repeat every path this many times, one round after another; report medians over rounds "
                   "(a shared machine's speed drifts between runs by up to 2x here).")
@click.option("--classes", default=10, show_default=True, help="Classes of the generated data set.")
@click.option("--per-class", default=None, type=click.IntRange(1),
              help="Training images per class (generated) [default: 80; with --baseline: 64, 640 images].")
@click.option("--image-size", default=448, show_default=True, help="Shorter side of the generated images.")
@click.option("--max-side", default=None, type=click.IntRange(16),
              help="Shorter side the generated images are stored at (convert --max-side) [default: 384; with "
                   "--baseline: 256, WebVision's resized release].")
@click.option("--quick", is_flag=True,
              help="CI-sized: 4 x 20 images at 160 px, res 64 (unless --res is given), batch 16, 2 windows of 2, "
                   "every path in this one interpreter (otherwise each in a fresh one).")
@json_option
def loader_bench(backends: tuple[str, ...], baseline: str | None, resolutions: tuple[int, ...], batch_size: int,
                 workers: int | None, device: str, shards: Path | None, split: str, warmup: int, windows: int,
                 window_batches: int, rounds: int, classes: int, per_class: int | None, image_size: int,
                 max_side: int | None, quick: bool, as_json: bool) -> None:
    """Two-view training images/s of the loader backends on the same shards and device.

    With `--baseline original`, the report says, per resolution, original / each backend / limit
    side by side: `vs_original` (backend over the original's PIL path) and `of_limit` (backend over
    decode-only).
    """
    chosen = list(backends) or available_backends()
    web = baseline is not None
    per_class = per_class or (64 if web else 80)
    max_side = max_side or (256 if web else 384)
    res_list = list(resolutions)
    if quick:
        batch_size, warmup, windows, window_batches = 16, 1, 2, 2
        res_list = [64] if res_list == [224] else res_list  # the default size, unless sizes were given
        classes, per_class, image_size = 4, 20, 160
        max_side = min(max_side, 160)
    from mopro_fast.data import BackendUnavailable
    from mopro_fast.data.manifest import ManifestError

    try:
        result = run_loader_bench(chosen, shards, split, res_list, batch_size, workers or os.cpu_count() or 1,
                                  warmup, windows, window_batches, classes, per_class, image_size, max_side,
                                  str(resolve_device(device)), baseline=baseline, photos=web, fresh=not quick,
                                  rounds=rounds)
    except (BackendUnavailable, ManifestError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    emit(result, as_json)
