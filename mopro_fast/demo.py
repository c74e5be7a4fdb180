"""`mopro-fast demo`: the main job on the built-in data, end to end, on whatever machine this is.

Steps: make the built-in WebVision-shaped data set, convert it to shards, verify them, print a
summary. (Training and evaluation join here when the trainer lands.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the data set (OUT/fixture) and the shards (OUT/shards); reused when present.")
@click.option("--seed", default=0, show_default=True, help="Seed of the built-in data set.")
def demo(out: Path, seed: int) -> None:
    """Built-in data -> WebDataset shards -> verify, with a short summary."""
    from data_tools.convert import ConvertError, ConvertSettings, convert
    from data_tools.fixture import FixtureSpec, make_fixture
    from data_tools.verify import verify

    progress = sys.stderr.isatty()
    fixture, shards = out / "fixture", out / "shards"
    start = time.perf_counter()
    if not (fixture / "README.txt").is_file():
        click.echo(f"[1/3] writing the built-in data set to {fixture} ...")
        if fixture.exists():
            import shutil

            shutil.rmtree(fixture)  # a half-written fixture from an interrupted demo
        make_fixture(fixture, FixtureSpec(seed=seed, corrupt=True), progress=progress)
    else:
        click.echo(f"[1/3] built-in data set already at {fixture}")
    click.echo(f"[2/3] converting to shards in {shards} ...")
    try:
        manifest = convert(fixture, shards, ConvertSettings(imagenet_val=str(fixture / "imagenet_val"),
                                                            shard_size=200),
                           workers=os.cpu_count(), overwrite=True, progress=progress)
    except ConvertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("[3/3] verifying every shard ...")
    report = verify(shards, progress=progress)
    click.echo(report.summary(shards))
    summary = {name: {k: split[k] for k in ("num_listed", "num_written", "num_rejected", "rejected_by_reason",
                                            "num_repaired")} | {"shards": len(split["shards"])}
               for name, split in manifest["splits"].items()}
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"demo finished in {time.perf_counter() - start:.1f} s; manifest: {shards / 'manifest.json'}")
    if not report.ok:
        sys.exit(1)
