"""`mopro-fast bench all`: every benchmark with one consistent set of settings, one JSON report.

The same shards (the built-in data set rendered at web-like sizes, made once) feed the loader and
e2e benchmarks; the same architecture, resolution, batch, precision and memory format serve the
step, ema and e2e benchmarks. The settings come from a profile chosen by device (a GPU: ResNet-50
at 224 px, batch 256, bf16, channels-last, the step with and without `torch.compile`; a CPU:
ResNet-18 at 64 px, batch 64, fp32, NCHW, as the demo recipe), or `--quick` (tiny, one torch thread, for CI), and
a few options override them. Each benchmark warms up and reports medians (its own module says
how); each entry keeps its own settings and environment. A benchmark that fails is recorded
under `errors` with its one-line reason and the others still run (exit status 1 then).

Writes `REPORT.json` (default `benchmarks/results/<device>-<date>.json`) and `REPORT.md` next to
it, the markdown table of `mopro_fast.bench.table` (what `bench table REPORT.json` prints).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from mopro_fast.bench.kit import Parts, arch_option, device_option, environment, resolve_device, stopwatch


@dataclass
class SuiteSettings:
    """Every knob of `bench all`, recorded in the report."""

    device: str
    quick: bool
    arch: str
    small_stem: bool
    res: int
    batch: int
    precision: str
    channels_last: bool
    model_classes: int  # K of the step and ema benchmarks (e2e uses the shards' classes)
    compile: tuple[bool, ...]  # step variants: without and/or with torch.compile
    threads: int | None  # torch intra-op threads (None: torch's default)
    backends: list[str]  # loader benchmark
    e2e_backends: list[str]  # one e2e benchmark each
    workers: int
    # the built-in data set behind the loader and e2e benchmarks
    classes: int
    per_class: int
    image_size: int
    max_side: int
    # per-benchmark repetition
    convert: dict = field(default_factory=dict)
    loader: dict = field(default_factory=dict)
    proto: dict = field(default_factory=dict)
    ema: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)


def profile(device: str, quick: bool, backends: list[str], e2e_backends: list[str] | None = None) -> SuiteSettings:
    """The default settings for this device type (see the module docstring)."""
    cpus = os.cpu_count() or 1
    cuda = device.startswith("cuda")
    e2e_backends = list(backends) if e2e_backends is None else e2e_backends
    shared = dict(device=device, backends=backends, e2e_backends=e2e_backends)
    if quick:  # seconds on a 2-core CPU
        return SuiteSettings(
            **shared, quick=True, arch="resnet18", small_stem=False, res=32, batch=8,
            precision="bf16" if cuda else "fp32", channels_last=cuda, model_classes=10, compile=(False,), workers=1,
            threads=1,  # on a busy shared CPU, waits for a second intra-op thread made a 10 s run take 6 min
            classes=4, per_class=12, image_size=96, max_side=96,
            convert=dict(classes=2, per_class=10, image_size=128, repeats=1, shard_size=10),
            loader=dict(warmup=1, windows=2, window_batches=1),
            proto=dict(batch=256, classes=50, rounds=2, fused_per_round=2, warmup=1),
            ema=dict(rounds=2, warmup=1), step=dict(rounds=1, warmup=1),
            e2e=dict(warmup=1, windows=2, window_steps=2))
    # Web-like stored sizes: the built-in data at 448 px converted with --max-side 384 (~384 x 450-510 px).
    shared.update(quick=False, small_stem=False, workers=cpus, model_classes=1000, threads=None,
                  classes=10, per_class=200 if cuda else 80, image_size=448, max_side=384,
                  convert=dict(classes=10, per_class=100, image_size=500, repeats=3, shard_size=100),
                  loader=dict(warmup=4, windows=5, window_batches=4),
                  proto=dict(batch=2048, classes=1000, rounds=7, fused_per_round=10, warmup=2),
                  ema=dict(rounds=20, warmup=3))
    if cuda:
        return SuiteSettings(**shared, arch="resnet50", res=224, batch=256, precision="bf16", channels_last=True,
                             compile=(False, True), step=dict(rounds=10, warmup=3),
                             e2e=dict(warmup=8, windows=5, window_steps=5))
    # CPU: the demo recipe's network and size; NCHW (channels-last is slower on CPUs).
    return SuiteSettings(**shared, arch="resnet18", res=64, batch=64, precision="fp32", channels_last=False,
                         compile=(False,), step=dict(rounds=5, warmup=2), e2e=dict(warmup=3, windows=5, window_steps=4))


def device_slug(env: dict) -> str:
    """'cpu', or the GPU's name without the vendor: 'NVIDIA H200' -> 'h200'."""
    name = env.get("gpu") or "cpu"
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_suite(s: SuiteSettings, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run every benchmark with settings `s`; returns the report (results, errors, settings, env)."""
    from mopro_fast.bench.convert import run_convert_bench
    from mopro_fast.bench.core import run_ema_bench, run_proto_bench
    from mopro_fast.bench.e2e import run_e2e_bench
    from mopro_fast.bench.loader import make_shards, run_loader_bench
    from mopro_fast.bench.step import run_step_bench

    parts = Parts("bench all", progress)
    run, results, errors, seconds = parts.run, parts.results, parts.errors, parts.seconds

    total = stopwatch()
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    c = s.convert
    run("convert", lambda: run_convert_bench(c["classes"], c["per_class"], c["image_size"], s.workers, c["repeats"],
                                             c["shard_size"]))
    with tempfile.TemporaryDirectory(prefix="mopro-bench-all-") as tmp:
        progress(f"bench all: making shards ({s.classes} x {s.per_class} images at {s.image_size} px, "
                 f"stored at {s.max_side} px)")
        ffcv = "ffcv" in s.backends or "ffcv" in s.e2e_backends  # the .beton is written from the same shards
        shards = make_shards(Path(tmp), s.classes, s.per_class, s.image_size,
                             max(50, s.classes * s.per_class // 8), s.max_side, fmt="both" if ffcv else "wds")
        lo = s.loader
        run("loader", lambda: {**run_loader_bench(s.backends, shards, "train", s.res, s.batch, s.workers, lo["warmup"],
                                                  lo["windows"], lo["window_batches"], s.classes, s.per_class,
                                                  s.image_size, s.max_side, s.device, fresh=not s.quick),
                               "data": {"classes": s.classes, "per_class": s.per_class, "image_size": s.image_size,
                                        "max_side": s.max_side}})
        p, e = s.proto, s.ema
        run("proto", lambda: run_proto_bench(batch=p["batch"], classes=p["classes"], rounds=p["rounds"],
                                             fused_per_round=p["fused_per_round"], warmup=p["warmup"], device=s.device))
        run("ema", lambda: run_ema_bench(arch=s.arch, classes=s.model_classes, rounds=e["rounds"], warmup=e["warmup"],
                                         device=s.device))
        for compiled in s.compile:
            run("step_compile" if compiled else "step",
                lambda compiled=compiled: run_step_bench(s.arch, s.res, s.batch, s.model_classes, s.device, s.precision,
                                                         compiled, s.small_stem, s.step["rounds"], s.step["warmup"],
                                                         channels_last=s.channels_last))
        for backend in s.e2e_backends:
            ee = s.e2e
            run(f"e2e_{backend}", lambda backend=backend: run_e2e_bench(
                shards, "train", backend, s.arch, s.res, s.batch, s.workers, s.device, s.precision, False,
                s.small_stem, s.channels_last, ee["warmup"], ee["windows"], ee["window_steps"]))
    env = environment(s.device)
    return {"report": "mopro-fast bench all", "date": dt.date.today().isoformat(), "device": device_slug(env),
            "quick": s.quick, "settings": dataclasses.asdict(s), "env": env, "results": results, "errors": errors,
            "seconds": {**seconds, "total": round(total(), 1)}}


def write_report(report: dict[str, Any], out: Path) -> Path:
    """REPORT.json and its markdown table REPORT.md; returns the .md path."""
    from mopro_fast.bench.table import render

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(render(report, str(out)) + "\n")
    return md


def _installed(backends: list[str]) -> list[str]:
    from mopro_fast.bench.loader import available_backends

    have = available_backends()
    return [b for b in backends if b in have] if backends else have


@click.command("all")
@click.option("--quick", is_flag=True, help="Tiny settings (CI: well under a minute on a 2-core CPU).")
@device_option()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Report path [default: benchmarks/results/<device>[-quick]-<date>.json]; the .md goes next to it.")
@click.option("--backend", "backends", multiple=True,
              help="Loader backends for the loader and e2e benchmarks (repeatable) [default: every installed one].")
@click.option("--e2e-backend", "e2e_backends", multiple=True,
              help="Backends of the e2e benchmark (repeatable) [default: those of the loader benchmark].")
@arch_option(default=None, help="Override the profile's architecture.")
@click.option("--res", type=click.IntRange(8), help="Override the profile's resolution.")
@click.option("--batch", type=click.IntRange(1), help="Override the profile's batch size.")
@click.option("--workers", type=click.IntRange(1), help="Loader workers and convert processes [default: all cores].")
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile variant of the step benchmark.")
def all_bench(quick: bool, device: str, out: Path | None, backends: tuple[str, ...], e2e_backends: tuple[str, ...],
              arch: str | None,
              res: int | None, batch: int | None, workers: int | None, no_compile: bool) -> None:
    """Run every benchmark (convert, loader, proto, ema, step, e2e) with consistent settings.

    Writes one JSON report and a markdown table next to it; prints the table.
    """
    from mopro_fast.data import BACKENDS

    unknown = [b for b in backends + e2e_backends if b not in BACKENDS]
    if unknown:
        raise click.UsageError(f"unknown loader backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    try:
        dev = str(resolve_device(device))
    except RuntimeError as exc:
        raise click.UsageError(f"--device {device}: {exc}") from None
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"--device {device}, but no CUDA device is visible; use --device cpu")
    chosen = _installed(list(backends))
    if not chosen:
        raise click.UsageError(f"none of the loader backends {', '.join(backends)} is installed here")
    e2e_chosen = _installed(list(e2e_backends)) if e2e_backends else None
    if e2e_backends and not e2e_chosen:
        raise click.UsageError(f"none of the e2e backends {', '.join(e2e_backends)} is installed here")
    s = profile(dev, quick, chosen, e2e_chosen)
    s = dataclasses.replace(s, arch=arch or s.arch, res=res or s.res, batch=batch or s.batch,
                            workers=workers or s.workers, compile=(False,) if no_compile else s.compile)
    report = run_suite(s, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if out is None:
        out = Path("benchmarks/results") / f"{report['device']}{'-quick' if quick else ''}-{report['date']}.json"
    md = write_report(report, out)
    click.echo(md.read_text(), nl=False)
    click.echo(f"wrote {out} and {md}", err=True)
    if report["errors"]:
        raise SystemExit(1)
