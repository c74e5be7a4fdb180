"""`mopro-fast transfer svm|knn|fixture` and `mopro-fast finetune`: click fronts of mopro_fast/transfer
(errors: one line each, by the group in cli/__init__)."""

from __future__ import annotations

import json
from pathlib import Path

import click

CTX = {"help_option_names": ["-h", "--help"]}


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(","))
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise click.BadParameter(f"expected a comma-separated list of positive integers, got {text!r}")
    return shots


@click.group("transfer", context_settings=CTX)
def transfer() -> None:
    """Transfer evaluation of a checkpoint's frozen encoder: low-shot SVMs, kNN (and `mopro-fast finetune`).

    \b
    Examples:
      mopro-fast transfer svm RUN/ckpt-e0048-s00000432.pt --dataset voc07 --root data/VOC2007
      mopro-fast transfer svm CKPT --dataset places205 --root data/places205 --reference rn50_in1k.pt
      mopro-fast transfer knn CKPT --train data/imagenet/train --val data/imagenet/val
      mopro-fast transfer fixture voc07 data/voc07    # built-in VOC-shaped data (also places205, imagenet)
    """


def _feature_options(fn):
    """The options `transfer svm` and `transfer knn` share: a reference encoder, where reports and
    feature caches go, and how the frozen features are computed."""
    for option in reversed([
            click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="Also evaluate this encoder: a mopro-fast checkpoint or a torchvision ResNet "
                              "state dict."),
            click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                         help="Report and feature caches [default: CKPT's folder/transfer]."),
            click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1)),
            click.option("--workers", default=4, show_default=True, type=click.IntRange(0),
                         help="Image decoding processes.")]):
        fn = option(fn)
    return fn


@transfer.command("svm", context_settings=CTX)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--dataset", type=click.Choice(["voc07", "places205"]), required=True)
@click.option("--root", type=click.Path(path_type=Path), required=True,
              help="VOC2007 folder (JPEGImages/, ImageSets/Main/; or the folder holding VOCdevkit/) or the "
                   "Places205 root (trainvalsplit_places205/, data/vision/torralba/deeplearning/images256/).")
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Images per class k, comma-separated.")
@click.option("--draws", default=5, show_default=True, type=click.IntRange(1), help="Random draws per k.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the draws.")
@_feature_options
def svm_command(checkpoint: Path, overrides: tuple[str, ...], dataset: str, root: Path, shots: str, draws: int,
                seed: int, reference: Path | None, out: Path | None, batch_size: int, workers: int) -> None:
    """Low-shot linear SVMs on the frozen features of CHECKPOINT, beside a random encoder (the chance floor).

    VOC07: one binary LinearSVC per class on k trainval images per class, mAP on test ("all points" AP);
    Places205: one multiclass LinearSVC, top-1 on val. Mean and std over the draws, per k. Overrides change
    the checkpoint's stored config (e.g. run.device=cpu, loader.eval_resize=256 loader.eval_resolution=224).
    Needs scikit-learn: pip install 'mopro-fast[transfer]'.
    """
    from mopro_fast.cli.after import need_file
    from mopro_fast.transfer.run import run_svm, svm_table

    need_file(checkpoint)
    report = run_svm(checkpoint, dataset, root, out, _shots(shots), draws, reference, list(overrides), batch_size,
                     workers, seed)
    click.echo(svm_table(report))
    click.echo(f"report: {report['report']}")


@transfer.command("knn", context_settings=CTX)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--train", "train_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Labelled folder (one sub-folder per class), or a VOC2007 folder (its trainval split).")
@click.option("--val", "val_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to classify, same layout (VOC: its test split).")
@click.option("--k", "k", default=20, show_default=True, type=click.IntRange(1), help="Neighbours.")
@click.option("--temperature", default=0.07, show_default=True, type=click.FloatRange(min=0, min_open=True))
@_feature_options
def knn_command(checkpoint: Path, overrides: tuple[str, ...], train_dir: Path, val_dir: Path, k: int,
                temperature: float, reference: Path | None, out: Path | None, batch_size: int, workers: int) -> None:
    """Weighted cosine kNN (k neighbours vote exp(cos / T)) of --val on --train with CHECKPOINT's frozen
    features, beside a random encoder: top-1/top-5 (mAP for VOC-style multi-label folders)."""
    from mopro_fast.cli.after import need_file
    from mopro_fast.transfer.run import knn_table, run_knn

    need_file(checkpoint)
    report = run_knn(checkpoint, train_dir, val_dir, out, k, temperature, reference, list(overrides), batch_size,
                     workers)
    click.echo(knn_table(report))
    click.echo(f"report: {report['report']}")


@transfer.command("fixture", context_settings=CTX)
@click.argument("kind", type=click.Choice(["voc07", "places205", "imagenet"]))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=6, show_default=True, type=click.IntRange(2),
              help="Classes 0..N-1 of the built-in training data (make-fixture's shapes).")
@click.option("--per-class", default=16, show_default=True, type=click.IntRange(1),
              help="Training (VOC: trainval) images per class.")
@click.option("--test-per-class", default=10, show_default=True, type=click.IntRange(1),
              help="Test (Places, ImageNet: val) images per class.")
@click.option("--image-size", default=40, show_default=True, type=click.IntRange(16, 1024))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--hue-coded/--hue-nuisance", default=True, show_default=True,
              help="As make-fixture's: match the data the checkpoint was trained on.")
@click.option("--corrupt", is_flag=True, help="Plant a truncated and an empty image in the training split.")
def fixture_command(kind: str, out: Path, classes: int, per_class: int, test_per_class: int, image_size: int,
                    seed: int, hue_coded: bool, corrupt: bool) -> None:
    """Write a small KIND-shaped data set (voc07, places205, imagenet) with the built-in classes into OUT."""
    from data_tools.transfer_fixture import TransferSpec, make_transfer_fixture
    from mopro_fast.errors import fail

    spec = TransferSpec(classes, per_class, test_per_class, image_size, seed, hue_coded, corrupt=corrupt)
    try:
        make_transfer_fixture(out, kind, spec)
    except (ValueError, FileExistsError) as exc:
        fail(f"transfer fixture {out}: {exc}")
    click.echo(json.dumps({"kind": kind, "out": str(out), **{k: getattr(spec, k) for k in
                                                              ("classes", "per_class", "test_per_class")}}))


@click.command("finetune", context_settings=CTX)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="ImageNet folder holding train/<wnid>/ and val/<wnid>/ (= finetune.root).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Share of the training images (= finetune.fraction; the paper: 0.01, 0.1).")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue the run in run.out: its subset.txt is reused, then as `train --resume`.")
@click.option("--overwrite-run", is_flag=True, help="Replace an earlier run in run.out (a new subset is drawn).")
@click.option("--workers", default=None, type=click.IntRange(1), help="Conversion processes [default: CPUs].")
@click.option("--no-progress", is_flag=True, help="No progress bar and no plain progress lines.")
def finetune_command(checkpoint: Path, recipe: Path, overrides: tuple[str, ...], root: Path | None,
                     fraction: float | None, resume: str | None, overwrite_run: bool, workers: int | None,
                     no_progress: bool) -> None:
    """Fine-tune CHECKPOINT's whole network on a seeded fraction of an ImageNet train folder, with the
    trainer (loop, checkpoints, --resume, logs), as RECIPE says (recipes/finetune_in1k_1pct.yaml).

    \b
    Example:
      mopro-fast finetune RUN/ckpt-e0090-s00450000.pt recipes/finetune_in1k_1pct.yaml --root /data/imagenet
    The subset is written to RUN/subset.txt (reused on --resume), the converted images to RUN/data,
    the starting weights to RUN/init.pt; top-1/top-5 on the val folder to RUN/finetune.json.
    """
    from mopro_fast import dist
    from mopro_fast.cli.after import need_file
    from mopro_fast.errors import Interrupted, fail
    from mopro_fast.transfer.finetune import finetune

    need_file(checkpoint)
    if resume and overwrite_run:
        fail("--resume and --overwrite-run exclude each other")
    try:
        report = finetune(checkpoint, recipe, list(overrides), fraction, root, resume, overwrite_run,
                          not no_progress, workers)
    except KeyboardInterrupt:
        raise Interrupted("interrupted before a checkpoint could be saved; continue with --resume auto", 130) from None
    finally:
        dist.destroy()
    if "train_images" in report:  # rank 0 of a run that trained (not a finished run resumed)
        click.echo(json.dumps({k: report[k] for k in ("eval", "train_images", "listed_images", "head", "subset",
                                                      "run_dir")}, indent=1))
