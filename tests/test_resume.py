"""A conversion killed with SIGKILL (whole process group) and re-run equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.convert import ConvertSettings, convert
from data_tools.fixture import FixtureSpec, make_fixture

ARGS = ["--shard-size", "16", "--workers", "2"]


@pytest.fixture(scope="module")
def larger_fixture(tmp_path_factory) -> Path:
    # Big enough images (resized to 256) that a 2-worker conversion takes a few seconds.
    root = tmp_path_factory.mktemp("resume") / "src"
    make_fixture(root, FixtureSpec(classes=8, train_per_class=80, val_per_class=4, imagenet_per_class=0,
                                   image_size=360, seed=5, corrupt=True))
    return root


@pytest.fixture(scope="module")
def reference(larger_fixture: Path, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("resume") / "reference"
    convert(larger_fixture, out, ConvertSettings(shard_size=16), workers=2, progress=False)
    return tree_bytes(out)


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def start(src: Path, out: Path) -> subprocess.Popen:
    # A new session makes the converter and its pool workers one process group, killed together.
    return subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", "convert", str(src), str(out), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL the whole process group as soon as `ready()` holds."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, "conversion finished before it could be killed; make the data set larger"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finished(out: Path) -> int:
    return len(list((out / ".state").glob("*-0*.json"))) if (out / ".state").is_dir() else 0


@pytest.mark.parametrize("moment", ["first partial tar", "one shard done", "a third done"])
def test_killed_and_resumed_equals_uninterrupted(larger_fixture: Path, reference: dict[str, bytes],
                                                 tmp_path: Path, moment: str) -> None:
    out = tmp_path / "out"
    shards = sum(1 for name in reference if name.endswith(".tar"))
    ready = {"first partial tar": lambda: any(out.glob("train/*.tar.tmp-*")),
             "one shard done": lambda: finished(out) >= 1,
             "a third done": lambda: finished(out) >= shards // 3}[moment]
    kill_when(start(larger_fixture, out), ready)
    assert not (out / "manifest.json").exists(), "killed run must not have finished"

    resumed = subprocess.run([sys.executable, "-m", "mopro_fast.cli", "convert", str(larger_fixture), str(out),
                              *ARGS], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = tree_bytes(out)
    assert got.keys() == reference.keys()
    assert [name for name in got if got[name] != reference[name]] == []
    assert not list(out.rglob("*.tmp-*"))
