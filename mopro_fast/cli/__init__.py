"""The `mopro-fast` command line: one click group, one sub-command per job, one error handler.

The commands' click fronts live in this package (data.py: make-fixture, convert, verify; train.py:
train, eval; after.py: clean, retrain, export, import, report; demo.py; plan.py; transfer.py: transfer
svm|knn|fixture, finetune) and `mopro_fast/bench` (the bench group). They keep heavy imports inside the command bodies, so `mopro-fast --help`
stays fast (no torch, DALI or FFCV import until a command runs).

Every expected failure is a `mopro_fast.errors.MoproError`: commands raise it, and `MoproGroup`
here, the one place that does, turns it into its one line on stderr and its exit code (2 unless
the error says otherwise; see mopro_fast/errors.py). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from mopro_fast import __version__
from mopro_fast.bench import bench
from mopro_fast.cli.after import clean_command, export_command, import_command, report_command, retrain_command
from mopro_fast.cli.data import convert, make_fixture, verify
from mopro_fast.cli.demo import demo
from mopro_fast.cli.plan import plan_command
from mopro_fast.cli.train import eval_command, train_command
from mopro_fast.cli.transfer import finetune_command, transfer
from mopro_fast.errors import MoproError


class MoproGroup(click.Group):
    """A click group whose commands end an expected failure with one line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoproError as exc:
            click.echo(exc.line(), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=MoproGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mopro-fast")
def main() -> None:
    """mopro-fast: train MoPro (momentum prototypes) on noisy web images, fast.

    \b
    Typical flow:
      mopro-fast make-fixture data/fixture          # a small WebVision-shaped data set
      mopro-fast convert data/fixture data/shards   # -> WebDataset shards + manifest.json
      mopro-fast verify data/shards                 # re-read and check every shard
      mopro-fast bench convert --json               # measure conversion speed
      mopro-fast demo                               # all of the above on the built-in data
      mopro-fast train recipes/small_data_cpu.yaml        # train (see recipes/)
      mopro-fast clean RUN/ckpt-....pt              # cleaned labels of the training set
      mopro-fast retrain RUN/ckpt-....pt --labels RUN/clean    # cRT on them
      mopro-fast report RUN                         # HTML page: curves, counts, galleries
      mopro-fast transfer svm CKPT --dataset voc07 --root DIR   # low-shot SVMs on the frozen encoder
      mopro-fast finetune CKPT recipes/finetune_in1k_1pct.yaml --root IMAGENET   # 1 % of ImageNet's labels
      mopro-fast plan recipes/rn50_8gpu.yaml --gpus 8 --img-s-per-gpu 3000   # predicted wall time

    \b
    Exit codes (every command): 0 done; 2 an expected failure, explained in one line on stderr
    (bad recipe, input, data, checkpoint, run folder or output); 3 training stopped on a NaN
    loss; 130 / 143 stopped by SIGINT / SIGTERM; verify: 1 when it found problems.
    """


for command in (make_fixture, convert, verify, bench, demo, train_command, eval_command, clean_command,
                retrain_command, export_command, import_command, report_command, plan_command, transfer,
                finetune_command):
    main.add_command(command)
