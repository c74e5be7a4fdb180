"""The `mopro-fast` command line: one click group, one sub-command per job.

Commands live next to the code they drive; this module only assembles them, so
`mopro-fast --help` stays fast (no torch, DALI or FFCV import until a command runs).
"""

from __future__ import annotations

import click

from data_tools.cli import convert, make_fixture, verify
from mopro_fast import __version__
from mopro_fast.after_cli import clean_command, export_command, import_command, report_command, retrain_command
from mopro_fast.bench import bench
from mopro_fast.demo import demo
from mopro_fast.train_cli import eval_command, train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
      mopro-fast train recipes/demo_cpu.yaml        # train (see recipes/)
      mopro-fast clean RUN/ckpt-....pt              # cleaned labels of the training set
      mopro-fast retrain RUN/ckpt-....pt --labels RUN/clean    # cRT on them
      mopro-fast report RUN                         # HTML page: curves, counts, galleries
    """


main.add_command(make_fixture)
main.add_command(convert)
main.add_command(verify)
main.add_command(bench)
main.add_command(demo)
main.add_command(train_command)
main.add_command(eval_command)
main.add_command(clean_command)
main.add_command(retrain_command)
main.add_command(export_command)
main.add_command(import_command)
main.add_command(report_command)

if __name__ == "__main__":
    main()
