"""Settings of `mopro-fast convert` as typed sections, read like a training recipe.

    convert SRC OUT --config recipes/convert_webvision.yaml --workers 16

A settings file has up to four sections (every key optional; the defaults are below):
    shards:   how images are re-encoded and cut into shards (max_side, quality, shard_size, max_pixels, seed)
    listing:  which records are listed (subset, classes, sources, val_dir, imagenet_val, imagenet_labels)
    ffcv:     how the .beton files store them (write_mode, max_resolution, jpeg_quality, compress_probability)
    run:      how the command runs (workers, format, progress_seconds); never changes the output bytes
It is loaded by the recipes' own loader (mopro_fast/config/loading.py): an unknown key gets a
"did you mean", a value of the wrong type or out of range one line naming the dotted key, exit 2.
Each command-line option overrides its key of the file (`OPTIONS`); --overwrite is an option
only, so that clearing an OUT is always asked for on the command line.

These sections are the single source of the defaults: `ConvertSettings` (data_tools/convert.py,
what decides the shards' bytes and is recorded as the manifest's "settings") and `BetonSettings`
(data_tools/beton.py, recorded as the manifest's "ffcv.settings") take theirs from here. This
module imports no image or array library, so `mopro-fast --help` stays quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from omegaconf import OmegaConf

from mopro_fast.config import load_config, raise_first, spec, validate_fields

if TYPE_CHECKING:
    from data_tools.beton import BetonSettings
    from data_tools.convert import ConvertSettings


@dataclass
class ShardsSection:
    max_side: int = spec(256, ge=16)
    """Resize so the shorter side is at most this many pixels (never upscales)."""
    quality: int = spec(90, ge=1, le=100)
    """JPEG quality of re-encoded images."""
    shard_size: int = spec(2000, ge=1)
    """Samples per shard (about 40 MB at 256 px); a few shards per loader worker and rank."""
    max_pixels: int = spec(100_000_000, ge=1)
    """Reject images with more pixels than this, from the header, before decoding."""
    seed: int = 0
    """Seed of the one-time shuffle of the training records across shards (and of FFCV's proportion mode)."""


@dataclass
class ListingSection:
    subset: Literal["webvision", "mini"] = "webvision"
    """webvision: all classes, google+flickr. mini: mini-WebVision (google only, classes 0-49)."""
    classes: int | None = spec(None, ge=1)
    """Keep only classes 0..N-1 (after `subset`); null = all."""
    sources: list[str] | None = None
    """Training sources to keep, e.g. [google]; null = all."""
    val_dir: str = "val_images_256"
    """Folder under SRC holding the files of info/val_filelist.txt."""
    imagenet_val: str | None = None
    """ImageNet val folder (one sub-folder per wnid, or flat with `imagenet_labels`): adds the
    imagenet-val split; null = none. A relative path is relative to the current folder."""
    imagenet_labels: str | None = None
    """Labels file for a flat ImageNet val folder: '<file> <class id or wnid>' per line."""


@dataclass
class FfcvSection:
    write_mode: Literal["proportion", "jpg", "raw"] = "proportion"
    """How the .beton stores each image: jpg = the shard's JPEG bytes, raw = decoded RGB pixels,
    proportion = JPEG with probability `compress_probability`, else raw."""
    max_resolution: int = spec(0, ge=0)
    """Also bound the longer side in the .beton (px, at least 16); 0 = the shards' images unchanged."""
    jpeg_quality: int = spec(90, ge=1, le=100)
    """JPEG quality of images that `max_resolution` resized."""
    compress_probability: float = spec(0.5, ge=0, le=1)
    """proportion mode: share of images stored as JPEG (seeded per sample, so reproducible)."""


@dataclass
class ConvertRunSection:
    workers: int | None = spec(None, ge=1)
    """Processes converting shards in parallel; null = all cores. The output does not depend on it."""
    format: Literal["wds", "ffcv", "both"] = "wds"
    """wds: WebDataset shards (torch, dali, nvjpeg backends); ffcv: one .beton per split (ffcv
    backend); both: shards and .beton files, same records and images."""
    progress_seconds: float = spec(30.0, ge=0)
    """Without a terminal: one plain progress line on stderr every this many seconds; 0 = none."""


@dataclass
class ConvertRecipe:
    """A convert settings file: the root the loader reads it into."""

    shards: ShardsSection = field(default_factory=ShardsSection)
    listing: ListingSection = field(default_factory=ListingSection)
    ffcv: FfcvSection = field(default_factory=FfcvSection)
    run: ConvertRunSection = field(default_factory=ConvertRunSection)

    def settings(self) -> ConvertSettings:
        """What decides the shards' bytes (listing and shards sections, flat)."""
        from data_tools.convert import ConvertSettings

        listing = dataclasses.asdict(self.listing)
        listing["sources"] = None if self.listing.sources is None else tuple(self.listing.sources)
        return ConvertSettings(**listing, **dataclasses.asdict(self.shards))

    def beton(self) -> BetonSettings:
        from data_tools.beton import BetonSettings

        return BetonSettings(**dataclasses.asdict(self.ffcv))

    def to_yaml(self) -> str:
        """The resolved settings; `load_convert_config` reads them back to an equal recipe."""
        return OmegaConf.to_yaml(OmegaConf.structured(self))


DEFAULTS = ConvertRecipe()

# command-line option (click parameter name) -> (section, key) it overrides
OPTIONS = {
    "subset": ("listing", "subset"), "classes": ("listing", "classes"), "sources": ("listing", "sources"),
    "val_dir": ("listing", "val_dir"), "imagenet_val": ("listing", "imagenet_val"),
    "imagenet_labels": ("listing", "imagenet_labels"),
    "max_side": ("shards", "max_side"), "quality": ("shards", "quality"), "shard_size": ("shards", "shard_size"),
    "max_pixels": ("shards", "max_pixels"), "seed": ("shards", "seed"),
    "ffcv_write_mode": ("ffcv", "write_mode"), "ffcv_max_resolution": ("ffcv", "max_resolution"),
    "ffcv_jpeg_quality": ("ffcv", "jpeg_quality"), "ffcv_compress_probability": ("ffcv", "compress_probability"),
    "workers": ("run", "workers"), "fmt": ("run", "format"), "progress_seconds": ("run", "progress_seconds"),
}


def validate_convert(recipe: ConvertRecipe) -> None:
    """Field ranges and choices, then what involves more than one value."""
    validate_fields(recipe)
    f, listing = recipe.ffcv, recipe.listing
    raise_first([
        ("ffcv.max_resolution", f.max_resolution == 0 or f.max_resolution >= 16,
         f"must be 0 (off) or at least 16 px, got {f.max_resolution}"),
        ("listing.sources", listing.sources is None or len(listing.sources) > 0,
         "names no source; null keeps them all"),
        ("listing.imagenet_labels", listing.imagenet_labels is None or listing.imagenet_val is not None,
         "needs listing.imagenet_val (the folder the labels are for)"),
    ])


def load_convert_config(path: str | Path | None, values: Sequence[tuple[dict[str, Any], str]] = ()) -> ConvertRecipe:
    """The settings file (None: the defaults), then `values` layers (e.g. one per command-line
    option, with the phrase naming it), checked and validated; raises mopro_fast's ConfigError."""
    return load_config(path, (), root=ConvertRecipe, values=values, check=validate_convert)


def recipe_of(settings: ConvertSettings, beton: BetonSettings | None = None) -> ConvertRecipe:
    """The sections holding `settings` and `beton` (defaults for the rest), for `validate_convert`."""
    listing = {k: getattr(settings, k) for k in _names(ListingSection)}
    listing["sources"] = None if settings.sources is None else list(settings.sources)
    return ConvertRecipe(shards=ShardsSection(**{k: getattr(settings, k) for k in _names(ShardsSection)}),
                         listing=ListingSection(**listing),
                         ffcv=FfcvSection(**dataclasses.asdict(beton)) if beton is not None else FfcvSection())


def _names(section: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]
