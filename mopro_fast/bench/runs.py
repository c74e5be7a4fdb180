"""Training runs for the benchmarks that train (`bench noise`, `bench tta`): built-in data sets and
`mopro-fast train` subprocesses, each reusable.

- `built_data(root, spec)`: a fixture (`data_tools/fixture.py`) and its shards under ROOT, reused once
  converted when the fixture is complete and of this very spec (else it is the bench's own output, redone);
- `train_run(...)`: one `mopro-fast train` in a fresh interpreter, as a user runs it, with
  OMP_NUM_THREADS and the loader workers set to its share of the cores; `measure(run_dir)` turns the
  finished run folder into the figures the benchmark keeps. The run folder's `bench.json` holds the
  command line, the sha256 of the recipe's content (`recipe_fingerprint`: keys and values, not
  comments) and those figures: the same call again returns them without
  training (an interrupted matrix goes on where it stopped), anything else trains anew;
- `cli(args, log, threads)`: any other `mopro-fast` command the same way (`clean` after a run).
A failing run ends the benchmark with one line naming its log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mopro_fast.errors import MoproError


class BenchRunError(MoproError, RuntimeError):
    """A run of a training benchmark failed; the message names its log."""


def built_data(root: Path, spec: Any, shard_size: int = 400) -> Path:
    """ROOT/fixture (the built-in data of `spec`) and ROOT/shards; returns ROOT."""
    from data_tools.convert import ConvertSettings, convert
    from data_tools.fixture import make_fixture, written_spec

    if written_spec(root / "fixture") != spec or not (root / "shards" / "manifest.json").is_file():
        if (root / "fixture").exists():
            shutil.rmtree(root / "fixture")  # half-written, or of another spec: the bench's own output
        make_fixture(root / "fixture", spec)
        convert(root / "fixture", root / "shards", ConvertSettings(shard_size=shard_size), workers=1, overwrite=True,
                progress=False)
    return root


def cli(args: list[str], log: Path, threads: int) -> None:
    """`mopro-fast ARGS` in a fresh interpreter with `threads` compute threads; output to LOG."""
    cmd = [sys.executable, "-m", "mopro_fast.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise BenchRunError(f"{' '.join(args[:2])} failed (exit {code}): {tail[0][:200]}; full log: {log}")


def recipe_fingerprint(recipe: Path) -> str:
    """sha256 of the recipe's content (keys and values, sorted), so that comments and layout do not
    count: an edited comment reuses the runs, a changed value trains anew."""
    import yaml

    content = yaml.safe_load(Path(recipe).read_text())
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def train_run(run_dir: Path, recipe: Path, data: Path, overrides: list[str], threads: int,
              measure: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Train `recipe` on DATA/shards (truth: DATA/fixture/truth.tsv, eval on val) into RUN_DIR; the
    figures `measure` reads from the run folder, plus `seconds` (wall time of the whole call)."""
    args = ["train", str(recipe), f"data.shards={data / 'shards'}", f"data.truth={data / 'fixture' / 'truth.tsv'}",
            "data.eval_splits=[val]", f"run.out={run_dir}", "run.tensorboard=false", "run.progress_seconds=0",
            f"loader.workers={threads}", *overrides]
    stamp = run_dir / "bench.json"
    key = {"command": args, "recipe_content_sha256": recipe_fingerprint(Path(recipe))}
    if stamp.is_file() and all(json.loads(stamp.read_text()).get(k) == v for k, v in key.items()):
        return json.loads(stamp.read_text())["result"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cli([*args, "--overwrite-run"], run_dir.parent / f"{run_dir.name}.log", threads)
    result = {**measure(run_dir), "seconds": round(time.perf_counter() - start, 1)}
    stamp.write_text(json.dumps({**key, "result": result}, indent=1) + "\n")
    return result
