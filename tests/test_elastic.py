"""Elastic restarts under torchrun (DESIGN.md section 5): a rank SIGKILLed mid-epoch makes torchrun
(`--max-restarts=1`) restart the group, the restarted ranks resume from the newest checkpoint by
themselves (`after_restart`: --resume auto), and the final weights equal an uninterrupted run's
bit for bit (CPU, 2 ranks, gloo, the tiny recipe; a checkpoint every 2 steps).

The test kills the worker from outside, as the OOM killer or a lost node would: it waits for the
first mid-epoch checkpoint, finds torchrun's child whose environment says RANK=1 on attempt 0
(/proc), and sends it SIGKILL. Nothing in the trainer knows about the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_tools.fixture import FixtureSpec
from mopro_fast.training.checkpoint import checkpoint_name, list_checkpoints, write_checkpoint
from mopro_fast.training.resume import after_restart
from mopro_fast.training.runfolder import RunFolder
from tests.conftest import REPO, TINY, tiny_args

# test_train.py's data (built once per session): 400 images of 8 classes, 6 steps per epoch on 2 ranks
DATA = FixtureSpec(classes=8, train_per_class=50, val_per_class=10, imagenet_per_class=5, image_size=48, seed=11)
EVERY = 2  # run.ckpt_every_steps: checkpoints at steps 2 and 4 of the first epoch (of 6)


@pytest.fixture(scope="module")
def data(build_data) -> dict[str, Path]:
    return build_data(DATA, shard_size=100)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(data: dict[str, Path], out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "mopro_fast.cli", "train",
           str(TINY), *tiny_args(data["shards"], out, 1, **{"run.ckpt_every_steps": EVERY, "loader.workers": 0}),
           "data.eval_splits=[]", *extra]  # (no loader processes, no evaluation: what is compared is the weights)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def worker_pid(agent: int, rank: int, attempt: int) -> int | None:
    """The pid of torchrun `agent`'s worker process for `rank` on restart `attempt`, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == agent and env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(attempt):
            return int(entry.name)
    return None


def final_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(out)[0], map_location="cpu", weights_only=False)["model"]


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the worker through /proc")
def test_rank_killed_mid_epoch_restarts_and_resumes_to_the_same_weights(data, tmp_path: Path) -> None:
    reference = torchrun(data, tmp_path / "ref")  # uninterrupted, run alongside (the runs share nothing)
    out = tmp_path / "elastic"
    proc = torchrun(data, out)
    first = out / checkpoint_name(0, EVERY)
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    victim = worker_pid(proc.pid, rank=1, attempt=0)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = max(int(p.name.split("-s")[1][:8]) for p in list_checkpoints(out))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    ref_log, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_log[-3000:]
    assert killed_at < 6, "rank 1 was killed after the epoch's last step: not mid-epoch"
    assert "torchrun restart 1: resuming from the newest checkpoint" in log, log[-3000:]
    assert "resumed from" in log and "(epoch 0, step " in log, log[-3000:]
    assert worker_pid(proc.pid, rank=1, attempt=0) is None

    a, b = final_model(tmp_path / "ref"), final_model(out)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_restart_resumes_auto_and_never_overwrites(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert after_restart(None, True, tmp_path) == (None, True)  # the first attempt: as given
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert after_restart(None, True, tmp_path) == ("auto", False)
    assert after_restart("other/ckpt.pt", False, tmp_path) == ("other/ckpt.pt", False)  # nothing here yet
    write_checkpoint(tmp_path / checkpoint_name(0, 2), {"step": 2})
    assert after_restart("other/ckpt.pt", False, tmp_path) == ("auto", False)


def test_a_write_killed_midway_never_becomes_the_newest(tmp_path: Path) -> None:
    """SIGKILL during torch.save leaves only the temporary name (safe_io.atomic_write renames a
    finished, fsynced file): the newest checkpoint is still the last whole one, and the next
    claim of the folder removes the dead writer's partial file."""
    done = write_checkpoint(tmp_path / checkpoint_name(0, 2), {"step": 2})
    script = ("import os, signal, sys, torch\n"
              "from pathlib import Path\n"
              "from mopro_fast.training.checkpoint import write_checkpoint\n"
              "real = torch.save\n"
              "def save(obj, fh):\n"
              "    fh.write(b'PK' + bytes(4096)); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "torch.save = save\n"
              "write_checkpoint(Path(sys.argv[1]), {'step': 4})\n")
    target = tmp_path / checkpoint_name(0, 4)
    killed = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not target.exists() and len(list(tmp_path.glob(".ckpt-*.tmp-*"))) == 1
    assert list_checkpoints(tmp_path) == [done]
    folder = RunFolder(tmp_path).claim()
    folder.release()
    assert list(tmp_path.glob(".ckpt-*.tmp-*")) == [] and done.is_file()
