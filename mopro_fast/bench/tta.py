"""`mopro-fast bench tta`: time to accuracy of the fast recipe against a paper-style one, same data.

Both recipes train on the built-in data (600 training images, 10 classes, 40 % symmetric label
flips, 10 % OOD, colour a nuisance: the noise matrix's cell symmetric-n40-ood10-600; `--seeds`
data seeds), evaluated on val after every epoch. A run's clock is the trainer's
own `train_seconds` in each eval record: training wall time with evaluation and checkpoints left
out (`mopro_fast/training/train.py`), so the per-epoch evaluation this benchmark needs is not
charged to either recipe. For each run the report keeps val top-1 after every epoch, that clock,
images and pixels processed, and:

- target: `--target` (default 0.97) x the paper-style run's final val top-1 of the same seed;
- time to target: the clock at the first evaluation at or above the target (null: never reached);
- the ratio fast / paper-style of those times, and both final accuracies.

Medians and spreads over seeds; a PNG of val top-1 against the clock, both recipes, every seed.
The two runs of a seed train side by side (`--jobs 2`, one core each), so both see the same
machine; `--jobs 1` runs them one after the other with every core.

The paper-style recipe is the fast recipe's data, model and loader with the paper's schedule
shape (`paper_style`): constant resolution, step lr x0.1 at 4/9 and 8/9 of the run, prototypes from
1/90 and cleaning from 11/90 of the run (the paper: epochs 1 and 11 of 90), for `--paper-epochs`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from mopro_fast import RECIPES
from mopro_fast.bench.kit import environment, json_option
from mopro_fast.bench.runs import built_data, train_run
from mopro_fast.errors import MoproError

FAST = RECIPES / "demo_fast_cpu.yaml"
BASE = RECIPES / "small_data_cpu.yaml"
PER_CLASS, NOISE, OOD = 60, 0.4, 0.1  # the built-in data: 600 images, 40 % symmetric flips, 10 % OOD
QUICK_SET = ("model.width=8", "model.proj_hidden=32", "loader.resolution=32", "loader.eval_resize=36",
             "loader.eval_resolution=32", "mopro.queue_size=64", "loader.batch_size=32")


class TtaError(MoproError, ValueError):
    """The benchmark cannot run as asked (one line)."""


def paper_style(epochs: int) -> list[str]:
    """Overrides that give any recipe the paper's schedule shape over `epochs` epochs."""
    stones = sorted({min(epochs - 1, max(1, round(epochs * f))) for f in (4 / 9, 8 / 9)})
    return [f"schedule.epochs={epochs}", "schedule.kind=step", f"schedule.milestones=[{','.join(map(str, stones))}]",
            "schedule.gamma=0.1", "loader.min_resolution=null", f"mopro.proto_start_epoch={max(1, round(epochs / 90))}",
            f"mopro.start_clean_epoch={round(epochs * 11 / 90)}"]


def curve(run_dir: Path) -> dict[str, Any]:
    """Per evaluation: epoch, val top-1, training seconds, images and pixels seen."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("kind") == "eval" and "val/top1" in r]
    return {"epochs": [r["epoch"] for r in evals], "val_top1": [r["val/top1"] for r in evals],
            "train_seconds": [r["train_seconds"] for r in evals], "images": [r["images_seen"] for r in evals],
            "pixels": [r["pixels_seen"] for r in evals]}


def time_to(run: dict[str, Any], target: float) -> float | None:
    """The clock at the first evaluation at or above `target`; None if never."""
    return next((t for t, acc in zip(run["train_seconds"], run["val_top1"]) if acc >= target), None)


def _stats(values: list[float]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "values": values}


def compare(seeds: dict[int, dict[str, dict]], fraction: float) -> dict[str, Any]:
    """Per seed and over seeds: targets, times to target, their ratio, final accuracies."""
    per_seed = []
    for seed, runs in sorted(seeds.items()):
        target = round(fraction * runs["paper"]["val_top1"][-1], 2)
        t_paper, t_fast = time_to(runs["paper"], target), time_to(runs["fast"], target)
        per_seed.append({"seed": seed, "target": target, "paper_seconds": t_paper, "fast_seconds": t_fast,
                         "ratio": round(t_fast / t_paper, 3) if t_fast is not None and t_paper else None,
                         "paper_final": runs["paper"]["val_top1"][-1], "fast_final": runs["fast"]["val_top1"][-1],
                         "paper_total_seconds": runs["paper"]["train_seconds"][-1],
                         "fast_total_seconds": runs["fast"]["train_seconds"][-1]})
    final_gap = [s["fast_final"] - s["paper_final"] for s in per_seed]
    return {"per_seed": per_seed, "ratio": _stats([s["ratio"] for s in per_seed]),
            "paper_seconds": _stats([s["paper_seconds"] for s in per_seed]),
            "fast_seconds": _stats([s["fast_seconds"] for s in per_seed]),
            "final_gap": _stats([round(g, 2) for g in final_gap]),
            "fast_reached": sum(s["fast_seconds"] is not None for s in per_seed), "seeds": len(per_seed)}


def plot(seeds: dict[int, dict[str, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, colour in (("paper", "tab:blue"), ("fast", "tab:orange")):
        for i, (seed, runs) in enumerate(sorted(seeds.items())):
            run = runs[name]
            ax.plot(run["train_seconds"], run["val_top1"], color=colour, alpha=0.8, lw=1.2,
                    label=f"{name}-style" if name == "paper" and i == 0 else (name if i == 0 else None))
    ax.set_xlabel("training wall time (s, evaluation left out)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command("tta")
@click.option("--fast", "fast", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=str(FAST),
              show_default=True, help="The fast recipe.")
@click.option("--paper-recipe", "paper", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=str(BASE), show_default=True,
              help="Recipe the paper-style run takes its data, model and loader from (its schedule is replaced).")
@click.option("--paper-epochs", type=click.IntRange(min=2), default=None,
              help="Epochs of the paper-style run [default: the --paper-recipe's].")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True, help="Data seeds.")
@click.option("--target", "fraction", type=click.FloatRange(0, 1, min_open=True), default=0.97, show_default=True,
              help="Target = this x the paper-style run's final val top-1 (same seed).")
@click.option("--jobs", type=click.IntRange(min=1, max=2), default=2, show_default=True,
              help="2: a seed's two runs side by side, one core each; 1: one after the other.")
@click.option("--out", "work", type=click.Path(file_okay=False, path_type=Path), default="runs/bench-tta",
              show_default=True, help="Folder for the data, the runs, report.json and tta.png (finished runs are reused).")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Override for both recipes (repeatable).")
@click.option("--quick", is_flag=True, help="CI-sized: 100 images, a tiny model, 4 paper-style epochs, 1 seed.")
@json_option
def tta_bench(fast: Path, paper: Path, paper_epochs: int | None, seeds: int, fraction: float, jobs: int, work: Path,
              extra: tuple[str, ...], quick: bool, as_json: bool) -> None:
    """Time to accuracy: the fast recipe vs a paper-style schedule on the built-in data.

    Writes OUT/report.json (per recipe and seed: val top-1 after every epoch, training seconds, images and
    pixels; the time each first reaches the target, their ratio, the final accuracies; medians and spreads
    over seeds) and OUT/tta.png (val top-1 against training time); prints the report.
    """
    from data_tools.fixture import FixtureSpec
    from mopro_fast.config import load_config

    per_class, extra = PER_CLASS, list(extra)
    if quick:
        seeds, per_class, paper_epochs = 1, 10, 4
        extra = [*QUICK_SET, *extra]
    base_epochs = load_config(paper, ["data.shards=unused", "run.out=unused", *extra]).schedule.epochs
    paper_epochs = paper_epochs or base_epochs
    fast_set = [*extra, "run.eval_every=1"]
    if quick:
        fast_set += ["schedule.epochs=2", "mopro.proto_start_epoch=1", "mopro.start_clean_epoch=1",
                     "schedule.warmup_epochs=0", "loader.min_resolution=24", "loader.ramp_start_epoch=0",
                     "loader.ramp_end_epoch=1", "loader.resolution_step=8"]
    paper_set = [*extra, *paper_style(paper_epochs), "run.eval_every=1"] + (["schedule.warmup_epochs=0"] if quick else [])
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    start, results = time.perf_counter(), {}
    for seed in range(seeds):
        spec = FixtureSpec(train_per_class=per_class, noise=NOISE, ood=OOD, val_per_class=50 if not quick else 5,
                           imagenet_per_class=0, seed=seed, hue_coded=False)
        data = built_data(work / "data" / f"demo-s{seed}", spec)
        plan = {"paper": (paper, paper_set), "fast": (fast, fast_set)}
        with ThreadPoolExecutor(jobs) as pool:
            futures = {name: pool.submit(train_run, work / "runs" / f"{name}-s{seed}", recipe, data, overrides,
                                         threads, curve) for name, (recipe, overrides) in plan.items()}
            results[seed] = {name: f.result() for name, f in futures.items()}
        r = results[seed]
        log(f"seed {seed}: paper-style {r['paper']['val_top1'][-1]:.1f} in {r['paper']['train_seconds'][-1]:.0f} s, "
            f"fast {r['fast']['val_top1'][-1]:.1f} in {r['fast']['train_seconds'][-1]:.0f} s")
    summary = compare(results, fraction)
    report = {"bench": "tta", "fast_recipe": str(fast), "paper_style": {"recipe": str(paper), "overrides": paper_set},
              "settings": {"seeds": seeds, "target_fraction": fraction, "jobs": jobs, "overrides": extra,
                           "data": {"train_per_class": per_class, "noise": NOISE, "ood": OOD, "hue_coded": False}},
              "summary": summary, "runs": {str(s): r for s, r in results.items()},
              "seconds": round(time.perf_counter() - start, 1), "env": environment("cpu")}
    work.mkdir(parents=True, exist_ok=True)
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    ratio = summary["ratio"]
    plot(results, work / "tta.png", f"{fast.name} vs paper-style, {seeds} data seed(s); time to "
                                    f"{fraction:.0%} of paper-style final: ratio "
                                    f"{'n/a' if ratio is None else format(ratio['median'], '.2f')}")
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    for s in summary["per_seed"]:
        click.echo(f"seed {s['seed']}: target {s['target']:.1f}; paper-style {s['paper_seconds']} s, fast "
                   f"{s['fast_seconds']} s (ratio {s['ratio']}); final {s['paper_final']:.1f} vs {s['fast_final']:.1f}")
    click.echo(f"median ratio {None if ratio is None else ratio['median']}, fast reached the target in "
               f"{summary['fast_reached']}/{summary['seeds']} seed(s); report {work / 'report.json'}, plot {work / 'tta.png'}")
