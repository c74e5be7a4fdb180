"""Shared test fixtures: a small built-in data set (with planted broken files) and its shards.

Everything is real files in temporary folders: JPEGs written, converted, read back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.convert import ConvertSettings, convert
from data_tools.fixture import FixtureSpec, make_fixture

SMALL = FixtureSpec(classes=6, train_per_class=30, val_per_class=6, imagenet_per_class=5, image_size=48,
                    seed=3, corrupt=True)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `mopro-fast ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "mopro_fast.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="session")
def small_fixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixture") / "webvision"
    make_fixture(root, SMALL)
    return root


@pytest.fixture(scope="session")
def small_shards(small_fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    convert(small_fixture, out, ConvertSettings(shard_size=40, imagenet_val=str(small_fixture / "imagenet_val")),
            workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def ffcv_shards(small_fixture, tmp_path_factory) -> Path:
    """`small_shards`' data converted with --format both: the webdataset shards and a .beton per split."""
    pytest.importorskip("ffcv", reason="ffcv is not importable: apt-get install pkg-config libopencv-dev "
                                       "libturbojpeg0-dev, then pip install -e .[ffcv]")
    out = tmp_path_factory.mktemp("ffcv") / "out"
    convert(small_fixture, out, ConvertSettings(shard_size=40, imagenet_val=str(small_fixture / "imagenet_val")),
            workers=1, progress=False, fmt="both")
    return out


@pytest.fixture(scope="session")
def truth(small_shards: Path) -> dict[str, dict[int, int]]:
    """split -> {sid: label}, read with the writer's own tar reader."""
    from data_tools.shards import read_samples
    from mopro_fast.data.manifest import read_manifest

    out: dict[str, dict[int, int]] = {}
    manifest = read_manifest(small_shards)
    for split in manifest.splits:
        out[split] = {int.from_bytes(f["sid"], "little", signed=True): int.from_bytes(f["lbl"], "little", signed=True)
                      for shard in manifest.shards(split) for _key, f in read_samples(shard.path)}
    return out


def train_loader(shards: Path, backend: str, split: str = "train", resolution: int = 32,
                 steps_per_epoch: int | None = None, options=None, **spec):
    """A training loader on CPU with the tests' small defaults (batch 8, 1 worker, buffer 32, seed 0)."""
    from mopro_fast.data import LoaderSpec, build_train_loader

    spec = LoaderSpec(**{**dict(shards=shards, batch_size=8, workers=1, shuffle_buffer=32, seed=0), **spec})
    return build_train_loader(backend, spec, split=split, resolution=resolution, steps_per_epoch=steps_per_epoch,
                              options=options)


def eval_loader(shards: Path, backend: str, split: str, resolution: int = 32, resize: int = 36, options=None,
                **spec):
    from mopro_fast.data import LoaderSpec, build_eval_loader

    spec = LoaderSpec(**{**dict(shards=shards, batch_size=4, workers=1), **spec})
    return build_eval_loader(backend, spec, split=split, resolution=resolution, resize=resize, options=options)


def demo_run(backend: str, shards: Path, fixture: Path, out: Path, epochs: int = 2) -> subprocess.CompletedProcess:
    """`mopro-fast train recipes/demo_cpu.yaml` on the small data with `backend`, tiny settings."""
    repo = Path(__file__).resolve().parents[1]
    overrides = {"data.shards": shards, "data.truth": fixture / "truth.tsv", "run.out": out,
                 "model.small_stem": "false", "model.proj_hidden": 64, "mopro.queue_size": 64,
                 "loader.resolution": 32, "loader.eval_resize": 36, "loader.eval_resolution": 32,
                 "loader.batch_size": 32, "loader.workers": 1, "loader.backend": backend, "schedule.epochs": epochs,
                 "schedule.warmup_epochs": 0, "mopro.proto_start_epoch": 1, "mopro.start_clean_epoch": 1,
                 "optim.lr": 0.05, "optim.base_batch": 32, "run.log_every": 2}
    return run_cli("train", repo / "recipes" / "demo_cpu.yaml", *[f"{k}={v}" for k, v in overrides.items()],
                   cwd=repo)
