"""`mopro-fast plan RECIPE --gpus N --img-s-per-gpu VALUE|REPORT`: the click front of
`mopro_fast.plan` (a predicted wall time; errors: one line each, by the group in cli/__init__)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mopro_fast.errors import InputError


class Number(click.ParamType):
    """An int or float option whose unparsable value is a one-line InputError (not click's usage text)."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.name = "integer" if kind is int else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(str(value).replace("_", "").replace(",", "") if self.kind is int else value)
        except ValueError:
            name = param.opts[0] if param is not None else "value"
            raise InputError(f"{name} {value}: expected {'an' if self.kind is int else 'a'} {self.name}") from None


@click.command("plan", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--gpus", required=True, type=Number(int), help="GPUs of the run (ranks of one data-parallel run).")
@click.option("--img-s-per-gpu", "throughput", required=True, metavar="VALUE|REPORT.json",
              help="Training images/s on one GPU: a number, for the recipe's final loader.resolution, or the JSON "
                   "of `bench res` (figures at several sides), `bench all`, `bench step --json` or `bench e2e --json`.")
@click.option("--train-images", type=Number(int), default=None,
              help="Training images [default: 2,439,574, the WebVision 1.0 training set].")
@click.option("--val-images", type=Number(int), default=None,
              help="Images per evaluation, all eval splits [default: 50,000 per split: WebVision 1.0 val, "
                   "ILSVRC 2012 val (imagenet-val)].")
@click.option("--scaling", type=Number(float), default=None,
              help="Data-parallel scaling efficiency in (0, 1] [default: 0.9 with several GPUs, 1 with one].")
@click.option("--eval-factor", type=Number(float), default=3.0, show_default=True,
              help="Evaluation img/s per GPU as a multiple of the training img/s per GPU at the same side.")
@click.option("--ckpt-seconds", type=Number(float), default=10.0, show_default=True,
              help="Seconds one checkpoint save takes.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(recipe: Path, overrides: tuple[str, ...], gpus: int, throughput: str, train_images: int | None,
                 val_images: int | None, scaling: float | None, eval_factor: float, ckpt_seconds: float,
                 as_json: bool) -> None:
    """Predict the wall time of training RECIPE on --gpus GPUs from measured step throughput.

    \b
    Per training epoch: its crop side (loader.resolution, or the progressive ramp of
    loader.min_resolution / ramp_start_epoch / ramp_end_epoch), its images (steps per epoch x
    global batch), at img/s per GPU x GPUs x scaling. Sides not measured take the nearest
    measured one scaled by pixels. Plus evaluation (after every run.eval_every epochs and the
    last) and one checkpoint per epoch. Prints a table per phase and the assumptions made.

    \b
    Examples:
      mopro-fast plan recipes/rn50_8gpu.yaml --gpus 8 --img-s-per-gpu 3000
      mopro-fast bench res --out res.json      # step figures at 160, 192 and 224 px on this GPU
      mopro-fast plan recipes/rn50_fast_8gpu.yaml --gpus 8 --img-s-per-gpu res.json --json
    """
    from mopro_fast.config import load_config
    from mopro_fast.plan import Setup, figures_from_option, predict

    cfg = load_config(recipe, list(overrides))
    setup = Setup(gpus=gpus, scaling=scaling, train_images=train_images, val_images=val_images,
                  eval_factor=eval_factor, ckpt_seconds=ckpt_seconds)
    setup.check()
    figures = figures_from_option(throughput, cfg.model.arch, cfg.model.small_stem, cfg.run.compile,
                                  cfg.loader.resolution)
    result = predict(cfg, figures, setup, recipe=str(recipe))
    click.echo(json.dumps(result.to_dict(), indent=1) if as_json else result.table())
