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
