"""Click commands for the data tools (data_tools/): `make-fixture`, `convert`, `verify`.

Every user error is a MoproError, printed by the `mopro-fast` group as one line on stderr with
exit code 2 (click's own usage errors exit 2 too).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from click.core import ParameterSource

from mopro_fast.errors import Interrupted, fail
from data_tools.convert_config import DEFAULTS as D, OPTIONS, ConvertRecipe, load_convert_config


@click.command("make-fixture")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=10, show_default=True, type=click.IntRange(2, 5000),
              help="Number of classes (each a distinct shape/colour/texture up to 2520; --layout 2.0 allows "
                   "5000, drawings repeating).")
@click.option("--layout", type=click.Choice(["1.0", "2.0"]), default="1.0", show_default=True,
              help="WebVision 1.0's shape, or 2.0's (up to 5000 classes, q00001 query folders, no ImageNet-1k "
                   "val: pass --imagenet-per-class 0).")
@click.option("--train-per-class", default=120, show_default=True, type=click.IntRange(1),
              help="Training images listed per class, noisy ones included.")
@click.option("--val-per-class", default=20, show_default=True, type=click.IntRange(0),
              help="WebVision-val images per class (clean labels).")
@click.option("--imagenet-per-class", default=20, show_default=True, type=click.IntRange(0),
              help="ImageNet-val images per class, under OUT/imagenet_val/<wnid>/.")
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(16, 4096),
              help="Base shorter side in pixels; sizes and aspect ratios vary around it like web images.")
@click.option("--noise", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of training labels flipped to another class.")
@click.option("--pair", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the flipped labels that show one fixed confusable class ((c+1) mod K) instead of a "
                   "uniformly drawn one: structured, web-like noise.")
@click.option("--ood", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of training images that show no class (out-of-distribution), with random labels.")
@click.option("--flickr", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of training images listed under the flickr source (the rest: google).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives the same bytes.")
@click.option("--hue-coded/--hue-nuisance", default=True, show_default=True,
              help="Each class has its own hue, or (--hue-nuisance) every object's hue is drawn per image and "
                   "only shape, pattern and edge tell the classes apart, as colour does not in photos "
                   "(what `bench noise` uses).")
@click.option("--corrupt", is_flag=True,
              help="Also plant broken web files (truncated, PNG/GIF behind .jpg, CMYK, grayscale, empty, "
                   "missing, 20000x20000) listed in OUT/corrupt.tsv.")
def make_fixture(out: Path, classes: int, train_per_class: int, val_per_class: int, imagenet_per_class: int,
                 image_size: int, noise: float, pair: float, ood: float, flickr: float, seed: int,
                 hue_coded: bool, corrupt: bool, layout: str) -> None:
    """Write the built-in WebVision-1.0-shaped (or --layout 2.0) data set to OUT.

    Real JPEGs a small CNN can learn, with planted web noise: flipped labels and out-of-distribution
    images, recorded in OUT/truth.tsv (clean label or 'ood' per training image).
    """
    from data_tools.fixture import FixtureSpec, make_fixture as build

    if noise + ood > 1:
        fail(f"--noise {noise} + --ood {ood} exceeds 1; lower one of them")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; pick a new folder or delete it")
    spec = FixtureSpec(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                       imagenet_per_class=imagenet_per_class, image_size=image_size, noise=noise, pair=pair,
                       ood=ood, flickr=flickr, seed=seed, corrupt=corrupt, hue_coded=hue_coded, layout=layout)
    try:
        spec.validate()
        summary = build(out, spec, progress=sys.stderr.isatty())
    except (ValueError, FileExistsError) as exc:  # the fixture's own checks (data_tools stays click-free)
        fail(str(exc))
    click.echo(json.dumps(summary.to_dict(), indent=1, default=str))


PROGRESS_HELP = ("Without a terminal (logs, nohup, SLURM), print one plain progress line on stderr every S seconds "
                 "(done/total, images/s, ETA); 0 = none. On a terminal a progress bar is shown instead.")


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Settings file (YAML; sections shards, listing, ffcv, run; e.g. recipes/convert_webvision.yaml). "
                   "Every option below overrides its key of the file; without the file, the defaults shown.")
@click.option("--subset", type=click.Choice(["webvision", "mini"]), default=D.listing.subset, show_default=True,
              help="webvision: all classes, google+flickr. mini: mini-WebVision (google only, classes 0-49).")
@click.option("--classes", type=click.IntRange(1), default=None,
              help="Keep only classes 0..N-1 (after --subset).")
@click.option("--sources", default=None, metavar="LIST",
              help="Comma-separated training sources to keep, e.g. google or google,flickr.")
@click.option("--val-dir", default=D.listing.val_dir, show_default=True,
              help="Folder under SRC holding the files of info/val_filelist.txt.")
@click.option("--imagenet-val", type=click.Path(path_type=Path), default=None,
              help="ImageNet val folder (one sub-folder per wnid, or flat with --imagenet-labels); "
                   "adds the imagenet-val split.")
@click.option("--imagenet-labels", type=click.Path(path_type=Path), default=None,
              help="Labels file for a flat ImageNet val folder: '<file> <class id or wnid>' per line.")
@click.option("--max-side", default=D.shards.max_side, show_default=True, type=int,
              help="Resize so the shorter side is at most this many pixels (never upscales).")
@click.option("--quality", default=D.shards.quality, show_default=True, type=int,
              help="JPEG quality of re-encoded images.")
@click.option("--shard-size", default=D.shards.shard_size, show_default=True, type=int,
              help="Samples per shard (about 40 MB at 256 px); use a few shards per loader worker and rank.")
@click.option("--max-pixels", default=D.shards.max_pixels, show_default=True, type=int,
              help="Reject images with more pixels than this, from the header, before decoding.")
@click.option("--seed", default=D.shards.seed, show_default=True, type=int,
              help="Seed of the one-time shuffle of the training records across shards.")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Processes converting shards in parallel [default: all cores]. Output does not depend on it.")
@click.option("--overwrite", is_flag=True,
              help="Clear OUT first if it holds a mopro-fast conversion made with other settings. Only an earlier "
                   "mopro-fast output (its manifest.json or .state/ stamp) is ever cleared; any other content is "
                   "refused, --overwrite or not.")
@click.option("--progress-seconds", default=D.run.progress_seconds, show_default=True, type=click.FloatRange(min=0),
              metavar="S", help=PROGRESS_HELP)
@click.option("--format", "fmt", type=click.Choice(["wds", "ffcv", "both"]), default=D.run.format, show_default=True,
              help="wds: WebDataset shards (torch, dali backends). ffcv: one FFCV .beton per split, OUT/<split>.beton "
                   "(ffcv backend; needs the ffcv extra). both: shards and .beton, same records and images.")
@click.option("--ffcv-write-mode", type=click.Choice(["proportion", "jpg", "raw"]), default=D.ffcv.write_mode,
              show_default=True, help="How the .beton stores each image. jpg: the shard's JPEG bytes; raw: decoded "
                                      "RGB pixels (larger, no decode when loading); proportion: JPEG with probability "
                                      "--ffcv-compress-probability, else raw.")
@click.option("--ffcv-max-resolution", default=D.ffcv.max_resolution, show_default=True, type=int,
              help="Also bound the longer side in the .beton (px); 0 = the shards' images unchanged.")
@click.option("--ffcv-jpeg-quality", default=D.ffcv.jpeg_quality, show_default=True, type=int,
              help="JPEG quality of images that --ffcv-max-resolution resized (others keep the shard's JPEG bytes).")
@click.option("--ffcv-compress-probability", default=D.ffcv.compress_probability, show_default=True, type=float,
              help="proportion mode: share of images stored as JPEG (seeded per sample, so reproducible).")
@click.pass_context
def convert(ctx: click.Context, src: Path, out: Path, config_file: Path | None, overwrite: bool, **options) -> None:
    """Convert a WebVision-1.0 folder SRC into WebDataset shards (or FFCV .beton files) under OUT.

    Writes OUT/<split>/<split>-NNNNNN.tar with a DALI index (.idx) beside each, for the splits
    train, val and (with --imagenet-val) imagenet-val, and OUT/manifest.json: settings, shard
    list with sha256, counts per class and source, and every rejected record with its reason.
    With --format ffcv or both, OUT/<split>.beton holds the same records and images (fields image,
    label, index). Re-running the same command after an interruption finishes the job and reuses
    complete shards and .beton files; a shard whose input files changed (size or mtime) is redone.

    The settings can come from a YAML file, --config FILE, with sections shards, listing, ffcv and
    run (recipes/convert_webvision.yaml; keys in data_tools/convert_config.py); an option given on
    the command line overrides its key of the file. --overwrite is never read from the file.

    \b
    Safety: nothing outside OUT is ever written or deleted.
      - OUT may not be SRC, the --val-dir or --imagenet-val folder, inside one or hold one.
      - OUT must be a folder (or a new path) on a writable file system.
      - An OUT that holds anything but an earlier mopro-fast conversion (a foreign manifest.json
        included) is refused, with --overwrite too; --overwrite only clears a mopro-fast output.
      - A full disk, or a split of which every record is rejected (e.g. a wrong --val-dir), ends in
        one line and exit code 2 with no manifest.json written; the same command resumes later.
    """
    from data_tools.convert import convert as run

    recipe = _convert_settings(ctx, config_file, options)
    if not src.exists():
        fail(f"{src}: no such directory; pass the WebVision root (the folder holding info/)")
    with _sigterm_as_interrupt() as terminated:
        try:
            manifest = run(src, out, recipe.settings(), workers=recipe.run.workers or os.cpu_count(),
                           overwrite=overwrite, progress=True, progress_seconds=recipe.run.progress_seconds,
                           fmt=recipe.run.format, beton=recipe.beton())
        except KeyboardInterrupt:
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            raise Interrupted(f"error: {what}; re-run the same command to resume",
                              143 if terminated else 130) from None
    for name, split in manifest["splits"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in split["rejected_by_reason"].items()) or "none"
        parts = [f"{len(split['shards'])} shard(s)"] if split["shards"] or "beton" not in split else []
        if "beton" in split:
            b = split["beton"]
            parts.append(f"{b['file']} ({b['jpg']} JPEG, {b['raw']} raw)")
        where = " and ".join(parts)
        click.echo(f"{name}: {split['num_written']}/{split['num_listed']} written in {where}, "
                   f"{split['num_repaired']} repaired, rejected: {reasons}")
    click.echo(f"manifest: {out / 'manifest.json'}")


def _convert_settings(ctx: click.Context, config_file: Path | None, options: dict) -> ConvertRecipe:
    """The settings file (or the defaults) with every option given on the command line on top;
    a bad file or value exits 2 with one line naming the key (and the option that set it)."""
    from mopro_fast.config import ConfigError

    given, layers = {}, []
    for name, value in options.items():
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        if name == "sources" and value is not None:
            value = [s.strip() for s in value.split(",") if s.strip()] or None
        section, key = OPTIONS[name]
        flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
        given[f"{section}.{key}"] = flag
        layers.append(({section: {key: str(value) if isinstance(value, Path) else value}}, f"from option {flag}"))
    try:
        return load_convert_config(config_file, layers)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        fail(f"{exc}" + (f" (set by {given[key]})" if key in given and given[key] not in str(exc) else ""))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list]:
    """While inside, SIGTERM stops the command like Ctrl-C does (workers stopped, temporary files
    removed, one line); the list it yields is non-empty once SIGTERM came."""
    came: list = []

    def handler(signum, _frame) -> None:
        came.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--no-decode", is_flag=True, help="Skip decoding every JPEG (checks hashes, counts, indexes only).")
@click.option("--progress-seconds", default=30.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help=PROGRESS_HELP)
def verify(out: Path, no_decode: bool, progress_seconds: float) -> None:
    """Re-read every shard under OUT and check it against OUT/manifest.json.

    Checks sizes, sha256, sample counts, fields, labels, DALI index files, and that every image
    decodes. Exit 0 only if everything holds; problems are listed on stderr.
    """
    from data_tools.verify import verify as run

    report = run(out, decode=not no_decode, progress=True, progress_seconds=progress_seconds)
    for problem in report.problems[:50]:
        click.echo(f"  {problem}", err=True)
    if len(report.problems) > 50:
        click.echo(f"  ... and {len(report.problems) - 50} more", err=True)
    click.echo(report.summary(out))
    sys.exit(0 if report.ok else 1)
