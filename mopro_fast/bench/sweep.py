"""`mopro-fast bench res`: the MoPro training step, and the loader, at several crop sides; one report.

What `mopro-fast plan` needs to time a recipe with progressive resizing (loader.min_resolution up
to loader.resolution): `bench step` figures measured at each side rather than one side scaled by
pixels. The settings are `bench all`'s device profile (mopro_fast/bench/suite.py: on a GPU
ResNet-50, batch 256, bf16, channels-last; on a CPU ResNet-18, batch 64, fp32, NCHW; `--quick`
tiny) with few timed rounds and windows (`--rounds`, `--warmup`, `--windows`), so that three
step sides and two loader sides cost about what `bench all`'s step and loader parts cost.

The report (`--out`, default `benchmarks/results/<device>[-quick]-res-<date>.json`) is shaped like
a `bench all` report: `results` holds `step_<side>` (one `bench step` result per side) and
`loader_<side>` (one `bench loader` result per side, all on one set of shards: the profile's
generated images, at most `SWEEP_IMAGES`), `errors` the one-line reason of any that failed (the
others still run; exit status 1 then). `mopro-fast plan --img-s-per-gpu REPORT` reads the step
figures of either kind of report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from mopro_fast.bench.kit import Parts, device_option, environment, resolve_device, stopwatch

SWEEP_IMAGES = 1000  # at most this many generated training images for the loader sides (bench all: 2,000 on a GPU)


def run_sweep(s: Any, step_sides: list[int], loader_sides: list[int], backends: list[str], rounds: int,
              warmup: int, windows: int, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Step results at `step_sides` and loader results at `loader_sides` with the profile `s`
    (a `suite.SuiteSettings`); the report of the module docstring."""
    from mopro_fast.bench.loader import make_shards, run_loader_bench
    from mopro_fast.bench.step import run_step_bench
    from mopro_fast.bench.suite import device_slug

    parts = Parts("bench res", progress)
    run, results, errors, seconds = parts.run, parts.results, parts.errors, parts.seconds

    total = stopwatch()
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    for side in step_sides:
        run(f"step_{side}", lambda side=side: run_step_bench(s.arch, side, s.batch, s.model_classes, s.device,
                                                             s.precision, False, s.small_stem, rounds, warmup,
                                                             channels_last=s.channels_last))
    if loader_sides and backends:
        with tempfile.TemporaryDirectory(prefix="mopro-bench-res-") as tmp:
            per_class = min(s.per_class, SWEEP_IMAGES // s.classes)  # the loader cycles through them
            shards = make_shards(Path(tmp), s.classes, per_class, s.image_size,
                                 max(50, s.classes * per_class // 8), s.max_side)
            lo = s.loader
            for side in loader_sides:
                run(f"loader_{side}", lambda side=side: run_loader_bench(
                    backends, shards, "train", side, s.batch, s.workers, lo["warmup"], windows,
                    lo["window_batches"], s.classes, per_class, s.image_size, s.max_side, s.device,
                    fresh=not s.quick))
    env = environment(s.device)
    settings = {**dataclasses.asdict(s), "step_sides": step_sides, "loader_sides": loader_sides,
                "loader_backends": backends, "step": {"rounds": rounds, "warmup": warmup},
                "loader": {**s.loader, "windows": windows}}
    return {"report": "mopro-fast bench res", "date": dt.date.today().isoformat(), "device": device_slug(env),
            "quick": s.quick, "settings": settings, "env": env, "results": results, "errors": errors,
            "seconds": {**seconds, "total": round(total(), 1)}}


def summary(report: dict[str, Any]) -> str:
    """One line per result: the side and its images/s."""
    lines = []
    for name, r in report["results"].items():
        if r.get("bench") == "step":
            lines.append(f"{name}: {r['fast_img_s']:,.1f} img/s (original style {r['original_img_s']:,.1f})")
        elif r.get("bench") == "loader":
            lines.append(f"{name}: " + ", ".join(f"{b} {v:,.1f} img/s" for b, v in r["img_s"].items()))
    lines += [f"{name}: FAILED {why}" for name, why in report["errors"].items()]
    return "\n".join(lines)


@click.command("res")
@click.option("--quick", is_flag=True,
              help="Tiny settings (CI): the quick profile, sides 32 and 48 px, loader at 32 px, 1 round, 2 windows.")
@device_option()
@click.option("--res", "step_sides", multiple=True, type=click.IntRange(8),
              help="Step at this side (repeatable) [default: 160, 192, 224].")
@click.option("--loader-res", "loader_sides", multiple=True, type=click.IntRange(8),
              help="Loader at this side (repeatable) [default: 160, 192: the fast recipe's].")
@click.option("--backend", "backends", multiple=True, default=("nvjpeg",), show_default=True,
              help="Loader backend (repeatable).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Timed step rounds (median).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Untimed step rounds first (cudnn autotuning of each new side).")
@click.option("--windows", default=3, show_default=True, type=click.IntRange(1), help="Timed loader windows (median).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Report path [default: benchmarks/results/<device>[-quick]-res-<date>.json].")
def res_bench(quick: bool, device: str, step_sides: tuple[int, ...], loader_sides: tuple[int, ...],
              backends: tuple[str, ...], rounds: int, warmup: int, windows: int, out: Path | None) -> None:
    """Training step (and loader) images/s at several crop sides: the figures `mopro-fast plan` reads."""
    from mopro_fast.bench.loader import BACKENDS
    from mopro_fast.bench.suite import profile

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise click.UsageError(f"unknown loader backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    dev = str(resolve_device(device))
    s = profile(dev, quick, list(backends))
    steps = list(step_sides) or ([32, 48] if quick else [160, 192, 224])
    loaders = list(loader_sides) or ([32] if quick else [160, 192])
    report = run_sweep(s, steps, loaders, list(backends), 1 if quick else rounds, warmup, 2 if quick else windows,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    if out is None:
        out = Path("benchmarks/results") / f"{report['device']}{'-quick' if quick else ''}-res-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    click.echo(summary(report))
    click.echo(f"wrote {out}", err=True)
    if report["errors"]:
        raise SystemExit(1)

