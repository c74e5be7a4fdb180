"""`mopro-fast bench noise`: is MoPro the safer choice on data it was not tuned on?

A matrix of built-in data variants (`data_tools/fixture.py` with `hue_coded=False`: colour is a
nuisance, so the strong view's hue jitter cannot destroy the class cue), each trained with MoPro
and with plain cross-entropy (`mopro.enabled=false`) under the same recipe:

- noise kind: symmetric (the other class uniform), pair (the query's one confusable class, as web
  noise is), mix (half of the flips each way);
- noise rate 20 % and 40 %; OOD share 0 % and 10 %; data size about 600 and 1,600 images;
- `--seeds` data seeds per cell (the recipe's `run.seed` stays as it is).

The recipe's schedule is given for `--reference-size` training images. A cell of another size
trains for the same number of optimiser steps (epochs scaled by reference / size, rounded) with
the warm-up, the MoPro switches and step milestones at the same fractions of the run: the stated
rule that makes one recipe mean the same on every size.
`--size-rule epochs` trains every size for the recipe's own epochs instead (runs and report
named -epochs): on the 1,600-image cells the steps rule's 18 epochs starve MoPro (README).

Per run: the final val top-1 (the clean-label WebVision-style split). Per MoPro run also the noise
detection of the final model against the planted truth (`mopro-fast clean`: relabelled or dropped
counts as flagged; precision, recall, F1). Per cell: both methods' medians over seeds, the median
of the per-seed differences, its spread (min, max), the detection medians. The summary checks the
issue's bar: median difference over the cells >= 3 points, no cell's median difference below -1,
detection F1 >= 0.7 in every 40 % cell. A heat map of the per-cell median difference
(heatmap.png) goes next to report.json.

Runs are subprocesses of `mopro-fast train` (`--jobs` at a time, the cores split between them;
`mopro_fast/bench/runs.py`); each run folder keeps a `bench.json` with its exact command line and the
sha256 of the recipe's content, so an interrupted matrix re-run with the same options reuses every finished run.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from mopro_fast import RECIPES
from mopro_fast.bench.kit import environment, json_option
from mopro_fast.bench.runs import built_data, cli, train_run
from mopro_fast.errors import MoproError

KINDS = {"symmetric": 0.0, "pair": 1.0, "mix": 0.5}  # share of the flips that show the confusable class
CLASSES = 10
VAL_PER_CLASS = 50
RECIPE = RECIPES / "small_data_cpu.yaml"
BAR = {"median_diff": 3.0, "worst_cell": -1.0, "f1_at_40": 0.7}  # the issue's "Done when"


class NoiseBenchError(MoproError, ValueError):
    """The matrix cannot run as asked (one line)."""


@dataclass(frozen=True)
class Cell:
    """One data variant of the matrix."""

    kind: str  # a key of KINDS
    rate: float  # share of the listed images that show another class
    ood: float  # share that shows no class
    size: int  # training images (CLASSES x per class)

    @property
    def name(self) -> str:
        return f"{self.kind}-n{round(self.rate * 100)}-ood{round(self.ood * 100)}-{self.size}"

    def spec(self, seed: int):
        from data_tools.fixture import FixtureSpec

        return FixtureSpec(classes=CLASSES, train_per_class=self.size // CLASSES, val_per_class=VAL_PER_CLASS,
                           imagenet_per_class=0, noise=self.rate, pair=KINDS[self.kind], ood=self.ood, seed=seed,
                           hue_coded=False)


FULL = tuple(Cell(k, r, o, s) for s in (600, 1600) for o in (0.0, 0.1) for k in KINDS for r in (0.2, 0.4))
QUICK = (Cell("pair", 0.4, 0.1, 200), Cell("symmetric", 0.2, 0.0, 200))
QUICK_SET = ("schedule.epochs=3", "mopro.proto_start_epoch=1", "mopro.start_clean_epoch=2", "schedule.warmup_epochs=0",
             "model.width=8", "model.proj_hidden=32", "loader.resolution=32", "loader.eval_resize=36",
             "loader.eval_resolution=32", "mopro.queue_size=64", "loader.batch_size=32")


SIZE_RULES = ("steps", "epochs")


def schedule_overrides(recipe: Path, size: int, reference: int, extra: list[str], rule: str = "steps") -> list[str]:
    """The recipe's schedule for `reference` images -> the same number of steps for `size` images
    (rule "steps"), or the recipe's own epochs whatever the size (rule "epochs")."""
    from mopro_fast.config import load_config

    cfg = load_config(recipe, ["run.out=unused", "data.shards=unused", *extra])
    epochs = cfg.schedule.epochs
    scaled = max(1, round(epochs * reference / size)) if rule == "steps" else epochs
    at = lambda e: min(scaled, max(0, round(e * scaled / epochs)))  # noqa: E731 - same fraction of the run
    out = [f"schedule.epochs={scaled}", f"mopro.proto_start_epoch={at(cfg.mopro.proto_start_epoch)}",
           f"mopro.start_clean_epoch={at(cfg.mopro.start_clean_epoch)}",
           f"schedule.warmup_epochs={cfg.schedule.warmup_epochs * scaled / epochs:g}"]
    if cfg.schedule.kind == "step":
        stones = sorted({min(scaled - 1, max(1, at(m))) for m in cfg.schedule.milestones})
        out.append(f"schedule.milestones=[{','.join(map(str, stones))}]")
    if cfg.loader.min_resolution is not None:
        out += [f"loader.ramp_start_epoch={at(cfg.loader.ramp_start_epoch)}",
                f"loader.ramp_end_epoch={max(at(cfg.loader.ramp_end_epoch), at(cfg.loader.ramp_start_epoch) + 1)}"]
    return out


def make_data(work: Path, cell: Cell, seed: int) -> Path:
    """The cell's fixture and shards under WORK/data (reused when already converted)."""
    return built_data(work / "data" / f"{cell.name}-s{seed}", cell.spec(seed))


def train_one(work: Path, data: Path, name: str, recipe: Path, overrides: list[str], threads: int,
              detect: bool) -> dict[str, Any]:
    """One training run (+ `clean` for MoPro), reused when its bench.json matches; returns its figures."""

    def measure(run_dir: Path) -> dict[str, Any]:
        summary = json.loads((run_dir / "summary.json").read_text())
        result: dict[str, Any] = {"val_top1": summary["eval"]["val"]["top1"]}
        if detect:
            checkpoint = sorted(run_dir.glob("ckpt-*.pt"))[-1]
            cli(["clean", str(checkpoint), "--out", str(run_dir / "clean")], run_dir.parent / f"{name}.clean.log",
                threads)
            truth = json.loads((run_dir / "clean" / "summary.json").read_text())["truth"]
            p, r = truth["precision"], truth["recall"]
            result.update(precision=round(p, 4), recall=round(r, 4), f1=round(2 * p * r / (p + r), 4) if p + r else 0.0,
                          flagged=truth["flagged"], noisy=truth["noisy"])
        return result

    return train_run(work / "runs" / name, recipe, data, overrides, threads, measure)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "values": values}


def summarize_cell(cell: Cell, runs: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Medians and spreads of one cell over its seeds."""
    seeds = sorted(runs)
    mopro = [runs[s]["mopro"]["val_top1"] for s in seeds]
    ce = [runs[s]["ce"]["val_top1"] for s in seeds]
    out = {**asdict(cell), "name": cell.name, "seeds": seeds, "mopro_top1": _stats(mopro), "ce_top1": _stats(ce),
           "diff": _stats([round(m - c, 2) for m, c in zip(mopro, ce)])}
    for key in ("precision", "recall", "f1"):
        values = [runs[s]["mopro"][key] for s in seeds if key in runs[s]["mopro"]]
        if values:
            out[key] = _stats(values)
    return out


def verdict(cells: list[dict]) -> dict[str, Any]:
    """The issue's bar over the cells' medians."""
    diffs = [c["diff"]["median"] for c in cells]
    worst = min(cells, key=lambda c: c["diff"]["median"])
    f1_40 = [c["f1"]["median"] for c in cells if c["rate"] >= 0.4 and "f1" in c]
    out = {"median_diff": round(statistics.median(diffs), 2), "mean_diff": round(statistics.fmean(diffs), 2),
           "worst_cell": worst["name"], "worst_diff": worst["diff"]["median"],
           "cells_mopro_ahead": sum(d > 0 for d in diffs), "cells": len(diffs),
           "min_f1_at_40": round(min(f1_40), 3) if f1_40 else None,
           "median_f1_at_40": round(statistics.median(f1_40), 3) if f1_40 else None}
    out["bar"] = {"median_diff_ge_3": out["median_diff"] >= BAR["median_diff"],
                  "no_cell_below_minus_1": out["worst_diff"] >= BAR["worst_cell"],
                  "f1_ge_0.7_at_40": f1_40 != [] and min(f1_40) >= BAR["f1_at_40"]}
    return out


def heat_map(cells: list[dict], path: Path, title: str) -> None:
    """PNG: rows kind x rate, columns size x OOD; colour = median MoPro - CE val top-1, text adds F1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(c["kind"], c["rate"]) for c in cells}, key=lambda r: (list(KINDS).index(r[0]), r[1]))
    cols = sorted({(c["size"], c["ood"]) for c in cells})
    grid = [[None] * len(cols) for _ in rows]
    for c in cells:
        grid[rows.index((c["kind"], c["rate"]))][cols.index((c["size"], c["ood"]))] = c
    values = [[g["diff"]["median"] if g else float("nan") for g in row] for row in grid]
    span = max(5.0, max(abs(v) for row in values for v in row if v == v))
    fig, ax = plt.subplots(figsize=(1.7 * len(cols) + 2.2, 0.75 * len(rows) + 1.6), dpi=110)
    image = ax.imshow(values, cmap="RdYlGn", vmin=-span, vmax=span, aspect="auto")
    for i, row in enumerate(grid):
        for j, g in enumerate(row):
            if g:
                f1 = f"\nF1 {g['f1']['median']:.2f}" if "f1" in g else ""
                ax.text(j, i, f"{g['diff']['median']:+.1f}{f1}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{s} img\nOOD {round(o * 100)} %" for s, o in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{k} {round(r * 100)} %" for k, r in rows], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="MoPro - CE, val top-1 (points)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_matrix(cells: tuple[Cell, ...], seeds: int, recipe: Path, work: Path, jobs: int, reference: int,
               extra: list[str], log=print, tag: str = "", size_rule: str = "steps") -> dict[str, Any]:
    """Every (cell, seed, method) run, `jobs` at a time; the report (also written to WORK/report.json).

    `tag` names a variant (an ablation): its MoPro runs are `...-mopro-TAG` and its report
    report-TAG.json / heatmap-TAG.png; the cross-entropy runs are shared when the variant only
    changes mopro.* keys. `size_rule` "epochs" names every run, both methods, and the report with
    "-epochs": its runs are never mixed with those of the steps rule."""
    rule = "-epochs" if size_rule == "epochs" else ""
    suffix = rule + (f"-{tag}" if tag else "")
    schedules = {c: schedule_overrides(recipe, c.size, reference, extra, size_rule) for c in cells}  # bad overrides: one line, now
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plan = []
    ce_extra = [o for o in extra if not o.startswith("mopro.")]
    for cell in cells:
        schedule = schedules[cell]
        for seed in range(seeds):
            data = make_data(work, cell, seed)
            plan.append((cell, seed, "mopro", data, [*extra, *schedule]))
            # mopro.* settings mean nothing to cross-entropy: left out, an ablation of them reuses its runs
            plan.append((cell, seed, "ce", data, [*ce_extra, *schedule, "mopro.enabled=false"]))
    results: dict[tuple[str, int], dict[str, dict]] = {}
    done, lock, start = [0], threading.Lock(), time.perf_counter()

    def one(item) -> None:
        cell, seed, method, data, overrides = item
        name = f"{cell.name}-s{seed}-{method}" + (suffix if method == "mopro" else rule)
        result = train_one(work, data, name, recipe, overrides, threads, method == "mopro")
        with lock:
            results.setdefault((cell.name, seed), {})[method] = result
            done[0] += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / done[0] * (len(plan) - done[0])
            log(f"[{done[0]}/{len(plan)}] {cell.name} seed {seed} {method}: val top-1 {result['val_top1']:.1f}"
                + (f", F1 {result['f1']:.2f}" if "f1" in result else "") + f"  ({elapsed:.0f} s, ETA {eta:.0f} s)")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for future in [pool.submit(one, item) for item in plan]:
            future.result()  # the first failure ends the bench with its one line
    summaries = [summarize_cell(c, {s: results[c.name, s] for s in range(seeds)}) for c in cells]
    report = {"bench": "noise", "recipe": str(recipe), "settings": {
        "seeds": seeds, "jobs": jobs, "reference_size": reference, "size_rule": size_rule, "classes": CLASSES, "val_per_class": VAL_PER_CLASS,
        "overrides": extra, "tag": tag, "hue_coded": False, "kinds": KINDS}, "cells": summaries, "summary": verdict(summaries),
        "seconds": round(time.perf_counter() - start, 1), "env": environment("cpu")}
    (work / f"report{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    s = report["summary"]
    heat_map(summaries, work / f"heatmap{suffix}.png", f"{Path(recipe).name}, median of {seeds} data seed(s) per cell\n"
                                              f"over the cells: median {s['median_diff']:+.1f}, worst {s['worst_diff']:+.1f}")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The README table of a report: one row per cell, medians over seeds, spread of the difference."""
    seeds = report["settings"]["seeds"]
    lines = [f"| cell (kind, noise, OOD, images) | MoPro | CE | MoPro - CE (min, max over {seeds} seeds) | "
             f"detection P / R / F1 |", "|---|---|---|---|---|"]
    for c in report["cells"]:
        det = (f"{c['precision']['median']:.2f} / {c['recall']['median']:.2f} / {c['f1']['median']:.2f}"
               if "f1" in c else "-")
        lines.append(f"| {c['kind']}, {round(c['rate'] * 100)} %, {round(c['ood'] * 100)} %, {c['size']} | "
                     f"{c['mopro_top1']['median']:.1f} | {c['ce_top1']['median']:.1f} | "
                     f"**{c['diff']['median']:+.1f}** ({c['diff']['min']:+.1f}, {c['diff']['max']:+.1f}) | {det} |")
    s = report["summary"]
    lines.append("")
    lines.append(f"Over the {s['cells']} cells: median difference **{s['median_diff']:+.1f}** points (mean "
                 f"{s['mean_diff']:+.1f}), MoPro ahead in {s['cells_mopro_ahead']}; worst cell {s['worst_cell']} "
                 f"{s['worst_diff']:+.1f}; detection F1 in the 40 % cells: median {s['median_f1_at_40']}, "
                 f"min {s['min_f1_at_40']}.")
    return "\n".join(lines)


@click.command("noise")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=str(RECIPE),
              show_default=True, help="Training recipe; MoPro and cross-entropy both use it.")
@click.option("--out", "work", type=click.Path(file_okay=False, path_type=Path), default="runs/bench-noise",
              show_default=True, help="Folder for the generated data, the runs, report.json and heatmap.png "
                                      "(finished runs are reused).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Data seeds per cell.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Runs at a time; the cores are split between them.")
@click.option("--reference-size", type=click.IntRange(min=1), default=600, show_default=True,
              help="Training images the recipe's schedule is given for; other sizes keep its number of steps "
                   "(--size-rule steps).")
@click.option("--size-rule", type=click.Choice(SIZE_RULES), default="steps", show_default=True,
              help="How a cell of another size trains: the recipe's number of optimiser steps, or its number of "
                   "epochs (runs and report named -epochs).")
@click.option("--cells", "only", default=None, help="Comma-separated cell names to run (default: all 24).")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Recipe override for every run (repeatable).")
@click.option("--tag", default="", help="Name of a variant (e.g. an ablation with --set mopro.KEY=VALUE): its MoPro runs "
              "and report-TAG.json / heatmap-TAG.png sit next to the default's; cross-entropy runs are shared.")
@click.option("--quick", is_flag=True, help="CI-sized: 2 cells of 200 images, 1 seed, a tiny model for 3 epochs.")
@click.option("--table", "table", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Print the markdown table of an existing report.json and exit (nothing is run).")
@json_option
def noise_bench(recipe: Path, work: Path, seeds: int, jobs: int, reference_size: int, size_rule: str, only: str | None,
                extra: tuple[str, ...], tag: str, quick: bool, table: Path | None, as_json: bool) -> None:
    """MoPro vs. cross-entropy on a matrix of noisy built-in data (noise kind x rate x OOD x size x seeds).

    Writes OUT/report.json (per cell: val top-1 of both, the difference, noise-detection precision / recall /
    F1 of MoPro's final model against the planted truth, medians and spreads) and OUT/heatmap.png; prints the
    report. The full matrix is 144 runs: about an hour on 2 cores with the default recipe.
    """
    if table is not None:
        click.echo(markdown(json.loads(table.read_text())))
        return
    cells = QUICK if quick else FULL
    if only:
        names = {c.name: c for c in FULL + QUICK}
        unknown = [n for n in only.split(",") if n not in names]
        if unknown:
            raise NoiseBenchError(f"--cells: unknown cell {unknown[0]}; cells are named like {FULL[0].name} "
                                  f"(kind-n<rate %>-ood<OOD %>-<images>)")
        cells = tuple(names[n] for n in only.split(","))
    if quick:
        seeds, reference_size, extra = 1, 200, (*QUICK_SET, *extra)
    log = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    if tag and not tag.replace("-", "").replace("_", "").isalnum():
        raise NoiseBenchError(f"--tag {tag!r}: use letters, digits, - and _ only (it becomes part of file names)")
    report = run_matrix(cells, seeds, recipe, work, jobs, reference_size, list(extra), log, tag, size_rule)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"{'cell':<26}{'MoPro':>8}{'CE':>8}{'diff':>8}  spread        F1")
    for c in report["cells"]:
        f1 = f"{c['f1']['median']:.2f}" if "f1" in c else "-"
        click.echo(f"{c['name']:<26}{c['mopro_top1']['median']:8.1f}{c['ce_top1']['median']:8.1f}"
                   f"{c['diff']['median']:+8.1f}  [{c['diff']['min']:+.1f}, {c['diff']['max']:+.1f}]  {f1}")
    s = report["summary"]
    click.echo(f"median difference {s['median_diff']:+.2f}, worst cell {s['worst_cell']} {s['worst_diff']:+.1f}, "
               f"min F1 at 40 % {s['min_f1_at_40']}; bar: {s['bar']}")
    suffix = ("-epochs" if size_rule == "epochs" else "") + (f"-{tag}" if tag else "")
    click.echo(f"report: {work / f'report{suffix}.json'}, heat map: {work / f'heatmap{suffix}.png'}")
