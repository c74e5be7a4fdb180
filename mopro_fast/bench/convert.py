"""`mopro-fast bench convert`: conversion images/s, fast path vs the naive way, same images, same run.

Naive way (what a first script does, and roughly what the original code pays per image every
epoch): one process, for each listed file open it with PIL, decode it in full, convert to RGB,
resize, encode, add it to a tar. Fast path: `mopro-fast convert` (DCT-domain downscaled decode,
pass-through of already-small JPEGs, a process pool over shards), at 1 worker and at all workers.
The three run in interleaved rounds (`mopro_fast.bench.kit.interleaved`, perf_counter), after one
untimed fast run; medians are reported.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import click

from mopro_fast.bench.kit import emit, environment, interleaved, json_option, timings


def naive_convert(src: Path, out_tar: Path, max_side: int = 256, quality: int = 90) -> int:
    """The baseline: one image at a time with plain PIL, into one tar; returns images written."""
    from PIL import Image

    from data_tools.imaging import target_size

    lines = []
    for name in ("train_filelist_google.txt", "train_filelist_flickr.txt"):
        path = src / "info" / name
        if path.is_file():
            lines += [line.rsplit(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    written = 0
    with tarfile.open(out_tar, "w") as tar:
        for rel, label in lines:
            try:
                img = Image.open(src / rel).convert("RGB")
            except Exception:  # noqa: BLE001 - the naive way simply skips what it cannot read
                continue
            img = img.resize(target_size(img.width, img.height, max_side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            for ext, data in (("jpg", buf.getvalue()), ("cls", label.encode())):
                info = tarfile.TarInfo(f"{written:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            written += 1
    return written


def run_convert_bench(classes: int, per_class: int, image_size: int, workers: int, repeats: int,
                      shard_size: int) -> dict:
    from data_tools.convert import ConvertSettings, convert
    from data_tools.fixture import FixtureSpec, make_fixture

    with tempfile.TemporaryDirectory(prefix="mopro-bench-convert-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        make_fixture(src, FixtureSpec(classes=classes, train_per_class=per_class, val_per_class=0,
                                      imagenet_per_class=0, image_size=image_size, seed=0))
        settings = ConvertSettings(shard_size=shard_size)
        runs = {"n": 0}

        def fast(n_workers: int):
            def go():
                runs["n"] += 1
                out = tmp / f"out{runs['n']}"
                manifest = convert(src, out, settings, workers=n_workers, progress=False)
                shutil.rmtree(out)
                return manifest["splits"]["train"]["num_written"]
            return go

        def naive():
            out = tmp / "naive.tar"
            n = naive_convert(src, out)
            out.unlink()
            return n

        images = fast(1)()  # warm-up: page cache, imports
        naive_t, one_t, all_t = interleaved([naive, fast(1), fast(workers)], "cpu", repeats, warmup=0)
    t_naive, t_one, t_all = (t.median_ms / 1e3 for t in (naive_t, one_t, all_t))
    return {
        "bench": "convert",
        "images": images,
        "naive_img_s": round(images / t_naive, 1),
        "fast_1_worker_img_s": round(images / t_one, 1),
        "fast_all_workers_img_s": round(images / t_all, 1),
        "workers": workers,
        "ratio_1_worker": round(t_naive / t_one, 2),
        "ratio_all_workers": round(t_naive / t_all, 2),
        "seconds": {name: [ms / 1e3 for ms in t.times_ms]
                    for name, t in (("naive", naive_t), ("fast_1_worker", one_t), ("fast_all_workers", all_t))},
        "settings": {"classes": classes, "per_class": per_class, "image_size": image_size, "max_side": 256,
                     "quality": 90, "shard_size": shard_size, "repeats": repeats},
        "timings": timings(naive=naive_t, fast_1_worker=one_t, fast_all_workers=all_t),
        "env": environment("cpu"),
    }


@click.command("convert")
@click.option("--classes", default=10, show_default=True, help="Classes of the generated built-in data set.")
@click.option("--per-class", default=100, show_default=True, help="Training images per class.")
@click.option("--image-size", default=500, show_default=True,
              help="Base shorter side of the generated images (web-like sizes need a resize to 256).")
@click.option("--workers", default=None, type=click.IntRange(1), help="Workers of the fast path [default: all cores].")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs; the median is reported.")
@click.option("--shard-size", default=100, show_default=True, help="Samples per shard in the fast path.")
@click.option("--quick", is_flag=True, help="Small and single-shot (for CI): 5 classes x 20 images, 1 repeat.")
@json_option
def convert_bench(classes: int, per_class: int, image_size: int, workers: int | None, repeats: int,
                  shard_size: int, quick: bool, as_json: bool) -> None:
    """Conversion images/s on the built-in data set: naive PIL loop vs `convert` at 1 and all workers."""
    if quick:
        classes, per_class, repeats, shard_size = 5, 20, 1, 25
    result = run_convert_bench(classes, per_class, image_size, workers or os.cpu_count() or 1, repeats, shard_size)
    emit(result, as_json)
