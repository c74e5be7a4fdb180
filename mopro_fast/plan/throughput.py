"""Training images/s on one GPU by crop side: from one number, or from a benchmark report.

A report is any JSON a benchmark writes: one `bench step` or `bench e2e` result (it has a
`"bench"` key), or a report of several (`bench all`, `bench res`: a `"results"` mapping of such
results). Entries of another network than the recipe's (`settings.arch`, `settings.small_stem`)
are left out. Per measured side (`settings.res`) one figure is kept, the first there is of:

1. `bench step` with the recipe's `run.compile`: `fast_img_s` (mopro-fast's full MoPro training
   step on a batch held on the device: no loader);
2. `bench step` with the other compile setting: `fast_img_s`;
3. `bench e2e`: `img_s` (loader and step together).

A side that was not measured takes the nearest measured side m (a tie: the smaller) scaled by
pixels, img/s(r) = img/s(m) x (m / r)^2. That is an assumption: a ResNet's work grows with the
pixel count, while a GPU runs small inputs a little less efficiently, so a figure scaled to a
larger side errs slow and one scaled to a smaller side errs fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mopro_fast.errors import MoproError


class PlanError(MoproError):
    """A throughput figure, report or planning option that cannot be used; one line saying why."""


@dataclass(frozen=True)
class Figure:
    """One measured (or given) training throughput."""

    res: int  # crop side (px) it holds for
    img_s: float  # training images/s on one GPU
    source: str  # "--img-s-per-gpu", or the report entry and field: "step_160.fast_img_s"
    batch: int | None = None  # per-GPU batch of the measurement (reports only)
    precision: str | None = None  # its autocast dtype (reports only)


@dataclass(frozen=True)
class Figures:
    """The figures of one source, one per measured side, by increasing side."""

    items: tuple[Figure, ...]
    origin: str  # "--img-s-per-gpu 3000" or the report's path

    def nearest(self, res: int) -> Figure:
        """The figure measured nearest to side `res` (a tie: the smaller side)."""
        return min(self.items, key=lambda f: (abs(f.res - res), f.res))

    def at(self, res: int) -> float:
        """Training images/s on one GPU at side `res`: the nearest figure scaled by pixels."""
        f = self.nearest(res)
        return f.img_s * (f.res / res) ** 2


def _number(value: Any) -> float | None:
    """`value` as a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def figures_from_option(text: str, arch: str, small_stem: bool = False, compiled: bool = False,
                        res: int = 224) -> Figures:
    """What `--img-s-per-gpu` says: a number (images/s per GPU at side `res`, the recipe's final
    `loader.resolution`) or the path of a report, read for the recipe's network (`read_report`)."""
    try:
        value: float | None = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value) or value <= 0:
            raise PlanError(f"--img-s-per-gpu {text}: must be a positive number of images/s per GPU")
        return Figures((Figure(res, value, "--img-s-per-gpu"),), f"--img-s-per-gpu {text}")
    path = Path(text)
    if not path.is_file():
        raise PlanError(f"--img-s-per-gpu {text}: neither a number of images/s per GPU nor a report file "
                        f"(`mopro-fast bench res --out FILE`, `bench all`, `bench step --json > FILE`)")
    return read_report(path, arch, small_stem, compiled)


def _entries(raw: Any) -> list[tuple[str, dict]]:
    """(name, result) of every benchmark result in a parsed report."""
    if not isinstance(raw, dict):
        return []
    if "bench" in raw:
        return [(str(raw["bench"]), raw)]
    results = raw.get("results")
    if not isinstance(results, dict):
        return []
    return [(str(name), entry) for name, entry in results.items() if isinstance(entry, dict)]


def _figure(name: str, entry: dict, compiled: bool) -> tuple[int, Figure] | None:
    """(rank, figure) of one step or e2e result (lower rank = preferred), None when it has none."""
    settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    kind = entry.get("bench")
    if kind == "step":
        field, rank = "fast_img_s", 0 if bool(settings.get("compile")) == compiled else 1
    elif kind == "e2e":
        field, rank = "img_s", 2
    else:
        return None
    value, res = _number(entry.get(field)), settings.get("res")
    if value is None or value <= 0 or isinstance(res, bool) or not isinstance(res, int) or res <= 0:
        return None
    batch = settings.get("batch")
    return rank, Figure(res, value, f"{name}.{field}", batch if isinstance(batch, int) else None,
                        settings.get("precision") if isinstance(settings.get("precision"), str) else None)


def read_report(path: Path, arch: str, small_stem: bool = False, compiled: bool = False) -> Figures:
    """The figures of a report (module docstring) for network `arch` (with `small_stem`), preferring
    step results with `compiled` as `run.compile`; PlanError when it has none."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise PlanError(f"{path}: cannot read it as a JSON report: {type(exc).__name__}: {exc}") from None
    entries = _entries(raw)
    if not entries:
        raise PlanError(f"{path}: no benchmark results in it (expected the JSON of `bench step`, `bench e2e`, "
                        f"`bench all` or `bench res`)")
    best: dict[int, tuple[int, Figure]] = {}
    other: list[str] = []
    for name, entry in entries:
        found = _figure(name, entry, compiled)
        if found is None:
            continue
        settings = entry.get("settings") or {}
        if settings.get("arch") != arch or bool(settings.get("small_stem")) != small_stem:
            stem = " small stem" if settings.get("small_stem") else ""
            other.append(f"{name}: {settings.get('arch')}{stem} at {found[1].res} px")
            continue
        rank, figure = found
        if figure.res not in best or rank < best[figure.res][0]:
            best[figure.res] = (rank, figure)
    if not best:
        wanted = f"{arch}{' small stem' if small_stem else ''}"
        has = "; it has " + ", ".join(other) if other else "; it has no step or e2e result with img/s and settings.res"
        raise PlanError(f"{path}: no usable throughput figure for the recipe's {wanted}{has}")
    return Figures(tuple(best[res][1] for res in sorted(best)), str(path))
