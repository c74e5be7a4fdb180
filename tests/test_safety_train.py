"""Training never loses or mixes data (issue 12): run-folder lock, no new run over an old one,
finished runs left alone, one log after a resume, full disks, SIGTERM saves, progress in logs.

Every case runs the real CLI in a fresh interpreter on real shards and checks the files it leaves.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_tools.fixture import FixtureSpec
from mopro_fast.training.checkpoint import PATTERN, list_checkpoints
from mopro_fast.training.observe import read_log
from tests.conftest import REPO, TINY, digest as digest_files, one_line, tiny_args
from tests.conftest import train as train_tiny

# 96 training images of 4 classes at 32 px: 3 steps per epoch at batch 32; no ImageNet-val split
DATA = FixtureSpec(classes=4, train_per_class=24, val_per_class=4, imagenet_per_class=0, image_size=32, seed=5)


@pytest.fixture(scope="module")
def data(build_data) -> dict[str, Path]:
    return build_data(DATA, shard_size=50, imagenet_val=False)


def tiny(data: dict[str, Path], out: Path, epochs: int = 2, **extra) -> list[str]:
    """The tiny recipe on this data (seconds per epoch), evaluated on val only: the data set has no
    ImageNet-val split, and its note would be a second stderr line."""
    return tiny_args(data["shards"], out, epochs, **{"data.eval_splits": "[val]", **extra})


def train(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return train_tiny(*args, timeout=timeout, **kwargs)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", "train", str(TINY), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lock file's content is the last holder's pid)."""
    return digest_files(folder, ignore=(".lock",))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(run)[0], map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, worst


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run: the weights every interrupted run must end with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(*tiny(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])  # the closing JSON block
    assert summary["eval"]["val"]["samples"] == 16 and summary["run_dir"] == str(out)
    return out


def test_new_run_over_an_old_one_is_refused_unless_asked(data, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "notes.txt").write_text("mine\n")
    before = digest(run)
    refused = one_line(train(*tiny(data, run)), 2, str(run), "already holds a run", "--resume auto", "--overwrite-run")
    assert "2 checkpoint(s)" in refused
    assert digest(run) == before

    replaced = train(*tiny(data, run, epochs=1), "--overwrite-run")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert (run / "notes.txt").read_text() == "mine\n"  # not a file a run writes: left alone
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-e0001-s00000003.pt"]
    assert {r["epoch"] for r in read_log(run / "metrics.jsonl")} == {0}


def test_resuming_a_finished_run_changes_nothing(data, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = digest(run)
    result = train(*tiny(data, run), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to do" in result.stdout and "epoch 2 of 2" in result.stdout
    assert digest(run) == before  # summary.json with its final evaluation included


def test_training_into_a_locked_run_folder_is_refused(data, reference, tmp_path: Path) -> None:
    """The lock is an OS flock on RUN/.lock: held here by this test process, as another training
    would hold it; the OS releases it when the holder exits or is killed."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = digest(run)
    with open(run / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        for args in (tiny(data, run, epochs=3), tiny(data, run, epochs=3) + ["--resume", "auto"]):
            one_line(train(*args), 2, str(run), "in use by another training", f"pid {os.getpid()}")
    assert digest(run) == before
    resumed = train(*tiny(data, run, epochs=3), "--resume", "auto")  # lock released: the run goes on
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_log(run / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 10))


def test_sigterm_saves_the_current_step_and_resume_gives_the_same_weights(data, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(*tiny(data, run, epochs=2))
    wait_for(lambda: '"step": 4,' in _text(run / "metrics.jsonl"), proc, "step 4")  # mid-epoch 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err and "--resume auto" in err
    saved = list_checkpoints(run)[0]
    step = int(PATTERN.search(saved.name).group(2))
    assert step in (4, 5)  # the step in flight when the signal came, not the last epoch end (3)
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, step - 3, step)

    resumed = train(*tiny(data, run), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(reference), final_weights(run))
    # The log reads as one run: every step once, in order, the same eval records as the reference.
    steps = [r["step"] for r in read_log(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 7))
    evals = [(r["epoch"], r["val/top1"]) for r in read_log(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [(r["epoch"], r["val/top1"]) for r in read_log(reference / "metrics.jsonl") if r["kind"] == "eval"]


def test_resumed_run_logs_each_step_once(data, reference, tmp_path: Path) -> None:
    """A run killed after its epoch-1 checkpoint (step 3) had logged steps 4-6 and half a line."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    list_checkpoints(run)[0].unlink()  # ckpt-e0002: not written yet when it was killed
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "epo')  # the half line a killed write can leave
    resumed = train(*tiny(data, run), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "ckpt-e0001-s00000003.pt" in resumed.stdout
    steps = [r["step"] for r in read_log(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 7))
    assert [r["epoch"] for r in read_log(run / "metrics.jsonl") if r["kind"] == "eval"] == [0, 1]
    assert_same_weights(final_weights(reference), final_weights(run))


def test_non_tty_progress_lines_and_time_based_checkpoints(data, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(*tiny(data, run, epochs=1, **{"run.progress_seconds": 0.05, "run.ckpt_every_minutes": 0.0001}))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert lines, result.stderr[-2000:]
    assert all(" step (" in line and "img/s" in line and "ETA " in line for line in lines)
    assert any("loss " in line and "wait " in line for line in lines)
    assert "\r" not in result.stderr  # plain lines for a log file, no bar
    mid_epoch = [p for p in list_checkpoints(run) if int(PATTERN.search(p.name).group(2)) % 3]
    assert mid_epoch, [p.name for p in list_checkpoints(run)]  # every few ms: checkpoints inside epochs too


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temp_file(data, reference, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    ckpt_mb = list_checkpoints(reference)[0].stat().st_size / 1e6
    if not _mount_tmpfs(disk, f"{int(ckpt_mb * 1.6)}m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = disk / "run"
        full = train(*tiny(data, run, epochs=2, **{"run.keep_last": 2}))
        err = one_line(full, 2, "No space left on device", "ckpt-e0002-s00000006.pt", "free there")
        assert "needs about" in err
        assert [p.name for p in list_checkpoints(run)] == ["ckpt-e0001-s00000003.pt"]
        assert not [p for p in run.iterdir() if ".tmp-" in p.name]
        kept = digest(run)["ckpt-e0001-s00000003.pt"]
        subprocess.run(["mount", "-o", f"remount,size={int(ckpt_mb * 3)}m", str(disk)], check=True)
        resumed = train(*tiny(data, run, epochs=2, **{"run.keep_last": 2}), "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert digest(run)["ckpt-e0001-s00000003.pt"] == kept
        assert_same_weights(final_weights(reference), final_weights(run))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("where", ["/proc/x", "file", "under-file", "read-only"])
def test_unwritable_run_folder_is_one_line(data, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    readonly = tmp_path / "ro"
    if where == "read-only" and not _mount_tmpfs(readonly, "1m", "ro"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    out = {"/proc/x": Path("/proc/x"), "file": blocker, "under-file": blocker / "run", "read-only": readonly / "run"}[where]
    try:
        one_line(train(*tiny(data, out)), 2, "run.out", str(out))
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
    assert blocker.read_text() == "x"


def test_resume_with_another_model_width_names_the_tensor_and_the_key(data, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = digest(run)
    one_line(train(*tiny(data, run, epochs=3, **{"model.proj_hidden": 48}), "--resume", "auto"), 2,
             "does not fit", "query.projection.0.weight", "[64, 512]", "[48, 512]", "model.proj_hidden 64 -> 48")
    assert digest(run) == before  # config.yaml of the old run not replaced


def test_cuda_asked_without_cuda_is_one_line(data, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line(train(*tiny(data, tmp_path / "run", **{"run.device": "cuda"})), 2, "run.device", "no CUDA device")


def test_eval_split_without_samples_is_an_error_and_a_missing_one_a_note(data, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"].update(num_written=0, shards=[], num_rejected=manifest["splits"]["val"]["num_listed"])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    one_line(train(*tiny({"shards": shards}, tmp_path / "a")), 2, "split 'val'", "0 samples", "rejected")
    noted = train(*tiny(data, tmp_path / "b", epochs=1, **{"data.eval_splits": "[val,imagenet-val]"}))
    assert noted.returncode == 0, noted.stderr[-3000:]
    assert [line for line in noted.stderr.splitlines() if line.startswith("note: ")] == [
        f"note: eval split(s) imagenet-val not in {data['shards'] / 'manifest.json'} (it has train, val); skipped"]


def test_relative_shards_from_another_folder_suggest_an_absolute_path(data, reference, tmp_path: Path) -> None:
    ckpt = list_checkpoints(reference)[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "mopro_fast.cli", "eval", str(ckpt), "data.shards=shards"],
                            capture_output=True, text=True, cwd=elsewhere, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    one_line(result, 2, "relative", "data.shards=/")
    folder = subprocess.run([sys.executable, "-m", "mopro_fast.cli", "eval", str(reference)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    one_line(folder, 2, "is a folder, not a checkpoint file", ckpt.name)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
