"""`mopro-fast train RECIPE [section.key=value ...]` and `mopro-fast eval CKPT`: click fronts of
`mopro_fast.training.train` and `mopro_fast.training.evaluate` (errors: one line each, by the group in cli/__init__)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="auto: continue from the newest usable checkpoint in run.out (broken ones are skipped); "
                   "or a checkpoint file.")
@click.option("--init", "init", default=None, metavar="PATH", type=click.Path(dir_okay=False, path_type=Path),
              help="Fine-tune: start from the model weights of this checkpoint (e.g. from `mopro-fast import`); "
                   "optimiser and schedule start fresh, tensors whose shape differs stay fresh.")
@click.option("--overwrite-run", is_flag=True,
              help="Start a new run in a run.out that holds an earlier run: its checkpoints, metrics, plots and "
                   "summary are removed first (other files are left alone). Without it such a run.out is refused.")
@click.option("--no-progress", is_flag=True,
              help="No progress bar and no plain progress lines (metrics still go to RUN/metrics.jsonl).")
def train_command(recipe: Path, overrides: tuple[str, ...], resume: str | None, init: Path | None,
                  overwrite_run: bool, no_progress: bool) -> None:
    """Train MoPro as RECIPE says (a YAML file in recipes/), with dotted overrides.

    \b
    Examples:
      mopro-fast train recipes/small_data_cpu.yaml
      mopro-fast train recipes/rn50_8gpu.yaml optim.lr=0.2 run.out=runs/x
      torchrun --nproc_per_node=8 -m mopro_fast.cli train recipes/rn50_8gpu.yaml
      mopro-fast train recipes/small_data_cpu.yaml mopro.enabled=false   # cross-entropy baseline

    The run folder (run.out) gets the resolved config, checkpoints, metrics.jsonl, TensorBoard
    events (tb/), PNG plots and summary.json. It is locked while the run writes it; a new run into
    a folder that holds an earlier run is refused (use --resume auto, another run.out, or
    --overwrite-run). A finished run resumed says so and changes nothing.

    \b
    Elastic: under torchrun --max-restarts=N, a rank that dies makes torchrun restart all ranks;
    the restarted ranks resume from the newest checkpoint (as --resume auto) by themselves.

    \b
    Progress: a bar on a terminal; otherwise (nohup, SLURM, CI) one plain line on stderr every
    run.progress_seconds (default 30): step/total, images/s, ETA, loss, data wait.
    Ctrl-C or SIGTERM saves a checkpoint at the current step, then exits 130 / 143; a second
    Ctrl-C stops at once. A checkpoint is also written every run.ckpt_every_minutes (30).

    \b
    Exit codes: 0 done (or nothing left to do), 2 bad recipe, data, checkpoint, run folder or
    output (full disk, read-only), 3 stopped on a NaN/inf loss (nothing saved), 130 / 143
    stopped by SIGINT / SIGTERM after saving a checkpoint.
    """
    from mopro_fast import dist
    from mopro_fast.config import load_config
    from mopro_fast.errors import Interrupted, fail
    from mopro_fast.safe_io import OutputError, describe
    from mopro_fast.training.resume import after_restart
    from mopro_fast.training.train import train

    cfg = load_config(recipe, list(overrides))
    if resume and init:
        fail("--resume and --init exclude each other: --resume continues a run, --init starts a new one from weights")
    if resume and overwrite_run:
        fail("--resume and --overwrite-run exclude each other: --resume continues the run in run.out, "
             "--overwrite-run replaces it")
    if init is not None and not init.is_file():
        fail(f"--init {init}: no such checkpoint file")
    resume, overwrite_run = after_restart(resume, overwrite_run, Path(cfg.run.out))  # torchrun --max-restarts
    try:
        summary = train(cfg, resume=resume, progress=not no_progress, init=str(init) if init else None,
                        overwrite_run=overwrite_run)
    except OSError as exc:  # an I/O failure outside our own writers (e.g. a shard unreadable mid-run)
        raise OutputError(describe(exc, Path(exc.filename or cfg.run.out), what="use")) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop
        raise Interrupted(f"interrupted before a checkpoint could be saved; continue with --resume auto "
                          f"(run folder {cfg.run.out})", 130) from None
    finally:
        dist.destroy()
    if "finished" in summary:
        return  # a finished run resumed: the line saying so is printed, nothing else changed
    if summary.get("eval") is not None and "plots" in summary:
        click.echo(json.dumps({k: summary[k] for k in ("eval", "images_per_s", "data_wait", "seconds", "run_dir")
                               if k in summary}, indent=1))


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--split", "splits", multiple=True, help="Split to evaluate (repeatable) [default: data.eval_splits].")
def eval_command(checkpoint: Path, overrides: tuple[str, ...], splits: tuple[str, ...]) -> None:
    """Top-1/top-5 of a checkpoint on the eval splits of the config stored in it (JSON).

    Overrides change the stored config, e.g. data.shards=/other/shards loader.backend=torch.
    Runs under torchrun too; the result does not depend on the number of ranks.
    """
    from mopro_fast import dist
    from mopro_fast.cli.after import need_file
    from mopro_fast.training.evaluate import evaluate_checkpoint

    need_file(checkpoint)  # one line for a missing file or a run folder (naming its newest checkpoint)
    result = evaluate_checkpoint(checkpoint, list(overrides), list(splits) or None)
    if dist.is_main():
        click.echo(json.dumps(result, indent=1))
