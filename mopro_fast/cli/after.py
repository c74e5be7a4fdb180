"""After training: `mopro-fast clean`, `retrain`, `export`, `import` and `report` (click fronts).

Bad input (a missing or corrupt checkpoint, shards that do not match, a labels file from other
data, an unknown key) raises a MoproError, which the `mopro-fast` group prints as one line with
exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mopro_fast import RECIPES
from mopro_fast.errors import fail

CONTEXT = {"help_option_names": ["-h", "--help"]}


def need_file(path: Path, what: str = "checkpoint file") -> None:
    """One line, exit 2, unless `path` is a file; a run folder gets the name of its newest checkpoint."""
    if path.is_file():
        return
    if not path.is_dir():
        fail(f"{path}: no such {what}")
    from mopro_fast.training.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    if found:
        fail(f"{path} is a folder, not a {what}; give one of its checkpoints, e.g. {found[0]}")
    fail(f"{path} is a folder with no checkpoints (ckpt-*.pt) in it; give a {what}")


def _write_state(output: Path, state: dict) -> None:
    """torch.save `state` to `output` atomically: on any failure the previous file stays, no temporary is left."""
    from mopro_fast.safe_io import OutputError, output_dir
    from mopro_fast.after.trained import torch_bytes, write_outputs

    if output.is_dir():
        raise OutputError(f"{output} is a folder; give the path of the file to write")
    output_dir(output.parent, f"the folder of {output.name}")
    write_outputs(output.parent, {output.name: torch_bytes(state)})


@click.command("clean", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--data", "shards", type=click.Path(path_type=Path), default=None,
              help="Shards folder (same as data.shards=...) [default: the checkpoint's].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: clean/ next to the checkpoint].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def clean_command(checkpoint: Path, overrides: tuple[str, ...], shards: Path | None, out: Path | None,
                  no_progress: bool) -> None:
    """Apply MoPro's noise-correction rule with the final model to every training sample.

    Each sample's eval view goes through the checkpoint's query network; its classifier and
    prototype scores decide, as in training (DESIGN.md section 1 step 4): relabelled, kept, or
    out-of-distribution. Writes OUT/labels.jsonl (per sample: key, path, web label, corrected
    label or null for OOD, status, both scores) and OUT/summary.json (counts overall and per
    class; with data.truth set, noise-detection precision/recall next to their chance values).
    Overrides change the stored config, as in `eval` (e.g. data.truth=fixture/truth.tsv,
    loader.backend=dali). Runs under torchrun too, with the same result.

    \b
    Example:
      mopro-fast clean runs/demo-mopro/ckpt-e0014-s00000252.pt
    """
    from mopro_fast import dist
    from mopro_fast.after.clean import clean

    need_file(checkpoint, "checkpoint file")
    overrides = (*overrides, *([f"data.shards={shards}"] if shards else []))
    try:
        summary = clean(checkpoint, out, list(overrides), progress=not no_progress and sys.stderr.isatty())
    finally:
        dist.destroy()
    if summary:
        shown = {k: summary[k] for k in ("out", "samples", "counts", "fractions") if k in summary}
        if "truth" in summary:
            shown["truth"] = {k: round(v, 4) for k, v in summary["truth"].items()}
        click.echo(json.dumps(shown, indent=1))


@click.command("retrain", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Output of `mopro-fast clean` (its folder or labels.jsonl).")
@click.option("--recipe", type=click.Path(path_type=Path), default=RECIPES / "crt.yaml",
              show_default=True, help="cRT recipe.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: crt/ next to the checkpoint].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def retrain_command(checkpoint: Path, overrides: tuple[str, ...], labels: Path, recipe: Path, out: Path | None,
                    no_progress: bool) -> None:
    """cRT: re-train only the classifier on cleaned labels, the encoder frozen.

    Class-balanced sampling (a sample of class c drawn with weight n_c^-0.5), OOD samples left
    out, SGD lr 0.01 with steps at epochs 5 and 10, 15 epochs, no weight decay (recipes/crt.yaml).
    Then top-1/top-5 on the eval splits before and after, and OUT/crt.pt: the checkpoint with
    the new classifier (eval, clean and export take it). `crt.key=value` overrides change the
    recipe; other overrides change the checkpoint's config, as in `eval`. One process only.

    \b
    Example:
      mopro-fast retrain runs/x/ckpt-e0090-s00841500.pt --labels runs/x/clean crt.epochs=15
    """
    from mopro_fast.after.crt import retrain

    need_file(checkpoint, "checkpoint file")
    summary = retrain(checkpoint, labels, recipe, out, list(overrides), progress=not no_progress and sys.stderr.isatty())
    click.echo(json.dumps({k: summary[k] for k in ("out", "samples", "excluded", "eval", "seconds")}, indent=1))


@click.command("export", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["torchvision"]), default="torchvision", show_default=True,
              help="Layout to write.")
@click.option("--with-classifier", is_flag=True, help="Also write our classifier as torchvision's fc.")
@click.option("--network", type=click.Choice(["query", "key"]), default="query", show_default=True,
              help="Which encoder: the trained query network or its momentum (key) copy.")
def export_command(checkpoint: Path, output: Path, target: str, with_classifier: bool, network: str) -> None:
    """Write a checkpoint's encoder as a plain torchvision ResNet state dict.

    \b
      sd = torch.load("OUT.pt"); m = torchvision.models.resnet50()
      m.load_state_dict(sd, strict=False)   # missing: fc.weight, fc.bias only
    With --with-classifier, load it into resnet50(num_classes=K) with strict=True. Models
    trained with model.small_stem=true have no torchvision layout and are refused.
    """
    from mopro_fast.training.checkpoint import load_checkpoint
    from mopro_fast.config import config_from_dict
    from mopro_fast.after.interop import torchvision_state_dict

    need_file(checkpoint, "checkpoint file")
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    sd = torchvision_state_dict(state["model"], cfg.model.small_stem, with_classifier, network)
    _write_state(output, sd)
    classes = state["model"][f"{network}.classifier.weight"].shape[0]
    click.echo(json.dumps({"out": str(output), "layout": target, "arch": cfg.model.arch, "tensors": len(sd),
                           "num_classes": classes if with_classifier else None,
                           "load_with": f"torchvision.models.{cfg.model.arch}("
                                        f"{f'num_classes={classes}' if with_classifier else ''})"
                                        f".load_state_dict(sd{'' if with_classifier else ', strict=False'})",
                           "missing_keys": [] if with_classifier else ["fc.weight", "fc.bias"],
                           **({"note": "trained with model.blurpool=true: the weights load into torchvision's "
                                       "ResNet, which lacks the blur (mopro_fast.core.blurpool)"}
                              if cfg.model.blurpool else {})}, indent=1))


@click.command("import", context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--recipe", type=click.Path(path_type=Path), default=RECIPES / "rn50_8gpu.yaml",
              show_default=True, help="Recipe whose data, loader and MoPro settings the new checkpoint carries.")
def import_command(source: Path, output: Path, overrides: tuple[str, ...], recipe: Path) -> None:
    """Convert a checkpoint of the original MoPro code (github.com/salesforce/MoPro) to ours.

    Reads its `module.encoder_q.*` / `module.encoder_k.*` (trunk, `classifier`, `fc1`, `fc2`),
    `module.queue`, `module.queue_ptr` and `module.prototypes`; architecture, class count,
    embedding and projection widths and queue length come from the tensors, the rest from RECIPE
    and the overrides. Then `mopro-fast eval OUT data.shards=...`, `mopro-fast clean OUT` and
    `mopro-fast train RECIPE --init OUT` (fine-tuning) work from it.

    \b
    Example:
      mopro-fast import MoPro_V1_epoch90.tar runs/orig/mopro-v1.pt data.shards=/data/shards
    """
    from mopro_fast.after.interop import import_original

    need_file(source, "checkpoint file")
    state = import_original(source, recipe, list(overrides))
    _write_state(output, state)
    click.echo(json.dumps({"out": str(output), **{k: v for k, v in state["imported_from"].items() if k != "path"}},
                          indent=1))


@click.command("report", context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--clean", "clean_dir", type=click.Path(path_type=Path), default=None,
              help="Clean output to show [default: RUN/clean].")
@click.option("--run-clean/--no-run-clean", default=True, show_default=True,
              help="Without a clean output, run `clean` with the run's newest checkpoint first.")
@click.option("--gallery", default=24, show_default=True, type=click.IntRange(0, 500),
              help="Images per gallery.")
def report_command(run: Path, clean_dir: Path | None, run_clean: bool, gallery: int) -> None:
    """Write RUN/report/report.html: curves, noise fractions, per-class counts, image galleries.

    One self-contained page (every image embedded): training loss and accuracy, relabelled and
    OOD fractions per epoch, final top-1/top-5, the clean output's counts per class and, with
    the planted truth, its precision/recall; galleries of relabelled images (old -> new label),
    images dropped as OOD and the most confident clean ones; cRT before/after when RUN/crt exists.
    The extra plots are also written as PNG files next to the page.
    """
    from mopro_fast.after.report import build_report

    if not run.is_dir():
        fail(f"{run}: no such run folder")
    path = build_report(run, clean_dir, gallery, run_clean, progress=sys.stderr.isatty())
    click.echo(str(path))
