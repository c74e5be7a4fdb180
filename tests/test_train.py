"""`mopro-fast train` end to end on the built-in data: learning, outputs, exact resume, DDP, multi-node."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mopro_fast.config import load_config

from data_tools.fixture import FixtureSpec
from mopro_fast.training.checkpoint import find_resumable, list_checkpoints
from mopro_fast.training.observe import read_log
from tests.conftest import REPO, TINY, cli, one_line, tiny_args, train

# 400 training images of 8 classes at 48 px: 12 steps per epoch at batch 32, 6 on 2 ranks
DATA = FixtureSpec(classes=8, train_per_class=50, val_per_class=10, imagenet_per_class=5, image_size=48, seed=11)


@pytest.fixture(scope="module")
def data(build_data) -> dict[str, Path]:
    return build_data(DATA, shard_size=100)


def tiny(data: dict[str, Path], out: Path, epochs: int = 2, **extra) -> list[str]:
    """The tiny recipe on this data, with its planted truth (noise precision/recall in the log)."""
    return tiny_args(data["shards"], out, epochs, **{"data.truth": data["truth"], **extra})


def torchrun(*args, timeout: float = 600) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def two_epoch_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "two"
    result = train(*tiny(data, out, epochs=2, **{"run.tensorboard": "true"}))  # the test below checks its events
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_config_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    for override, message in (("optim.lrr=0.1", "optim.lrr: unknown key"), ("run.compile=1", "run.compile"),
                              ("loader.batch_size=big", "loader.batch_size")):
        one_line(train(*tiny_args(tmp_path, tmp_path / "r"), override), 2, message)
    missing = train(recipe=tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "not found" in missing.stderr
    unset = train()  # the tiny recipe leaves the data to its caller
    one_line(unset, 2, "data.shards: missing")
    no_shards = train(*tiny_args(tmp_path, tmp_path / "r"))
    assert no_shards.returncode == 2 and "manifest.json" in no_shards.stderr and "Traceback" not in no_shards.stderr


def test_run_learns_and_writes_metrics_tensorboard_plots_checkpoints(two_epoch_run: Path) -> None:
    records = read_log(two_epoch_run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert evals[-1]["val/top1"] > evals[0]["val/top1"], [r["val/top1"] for r in evals]
    assert evals[-1]["val/top1"] > 100 / 8 * 1.5  # well above chance (8 classes)
    for key in ("loss", "loss_inst", "loss_proto", "acc_inst", "lr", "images_per_s", "data_wait",
                "frac_relabelled", "frac_ood", "noise_precision", "noise_recall"):
        assert key in train[-1], key
    assert all(0 <= r["data_wait"] <= 1 for r in train)
    assert train[0]["loss_proto"] == 0 and train[-1]["loss_proto"] > 0  # prototype loss from epoch 1
    assert list((two_epoch_run / "tb").glob("events.out.tfevents.*"))
    for png in ("loss.png", "accuracy.png", "noise.png"):
        assert (two_epoch_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list_checkpoints(two_epoch_run)) == 2
    summary = json.loads((two_epoch_run / "summary.json").read_text())
    assert summary["eval"]["imagenet-val"]["samples"] == 8 * 5
    assert (two_epoch_run / "config.yaml").is_file() and (two_epoch_run / "derived.json").is_file()
    # Time-to-accuracy bookkeeping in every eval record: training seconds (evaluation and checkpoints left
    # out), images and pixels seen so far.
    derived = json.loads((two_epoch_run / "derived.json").read_text())
    side = load_config(two_epoch_run / "config.yaml", []).loader.resolution
    per_epoch = derived["steps_per_epoch"] * derived["global_batch"]
    assert [r["images_seen"] for r in evals] == [per_epoch, 2 * per_epoch]
    assert [r["pixels_seen"] for r in evals] == [per_epoch * side * side, 2 * per_epoch * side * side]
    assert 0 < evals[0]["train_seconds"] < evals[1]["train_seconds"] <= summary["seconds"]


def test_truncated_checkpoint_is_skipped_on_resume(two_epoch_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    newest, older = list_checkpoints(run)[:2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    path, state = find_resumable(run)
    assert path == older and state["epoch"] == 1
    warning = capsys.readouterr().err  # one plain line, not a Python warning with a source location
    assert warning.startswith(f"warning: skipping checkpoint {newest.name}: unreadable") and warning.count("\n") == 1


# Killed after a mid-epoch checkpoint (ckpt_every_steps; 12 steps per epoch), so the resume skips into
# an epoch; two epochs keep it short (test_safety_train covers SIGTERM saves and epoch-boundary resumes).
KILLED = {"torch": ({"run.ckpt_every_steps": "5"}, "ckpt-e0000-s00000005.pt"),
          "dali": ({"loader.backend": "dali", "run.ckpt_every_steps": "5"}, "ckpt-e0000-s00000005.pt")}


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    importlib.util.find_spec("nvidia.dali") is None, reason="DALI is not installed"))])
def test_killed_run_resumes_to_the_same_weights(data, tmp_path: Path, backend: str) -> None:
    extra, wait_for = KILLED[backend]
    settings = {"run.deterministic": "true", "run.tensorboard": "true", **extra}  # the resume appends to the events too
    args = tiny(data, tmp_path / "ref", epochs=2, **settings)
    reference = train(*args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    args = tiny(data, out, epochs=2, **settings)
    proc = subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", "train", str(TINY), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(wait_for)):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("ckpt-e0002-*.pt"))

    resumed = train(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert "cannot resume mid-epoch exactly" not in resumed.stderr  # both backends declare exact_resume
    a = weights(list_checkpoints(tmp_path / "ref")[0])
    b = weights(list_checkpoints(out)[0])
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, worst


def test_torchrun_two_ranks_equal_batches_and_eval(data, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = torchrun("--nproc_per_node=2", "--master_port", free_port(), "-m", "mopro_fast.cli", "train",
                    TINY, *tiny(data, out, epochs=2, **{"run.tensorboard": "true"}))  # rank 0 writes the events
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == [ranks[0]["steps_per_epoch"]] * 2
    assert ranks[0]["steps_per_epoch"] == 400 // 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["val"]["samples"] == 80


def test_two_nodes_c10d_rendezvous_train_together(data, tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    port = free_port()
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=mopro-test", "-m", "mopro_fast.cli", "train", TINY, *tiny(data, out, epochs=1)]
    nodes = [torchrun(*common), torchrun(*common)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_eval_of_a_fixed_model_is_the_same_on_one_and_two_ranks(two_epoch_run: Path) -> None:
    ckpt = list_checkpoints(two_epoch_run)[0]
    one = cli("eval", ckpt)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = torchrun("--nproc_per_node=2", "--master_port", free_port(), "-m", "mopro_fast.cli", "eval", ckpt)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    single = json.loads(one.stdout)["eval"]
    double = json.loads(log[log.index("{"):log.rindex("}") + 1])
    assert double["world_size"] == 2
    for split in ("val", "imagenet-val"):
        assert double["eval"][split]["samples"] == single[split]["samples"]
        assert double["eval"][split]["top1"] == pytest.approx(single[split]["top1"])
        assert double["eval"][split]["top5"] == pytest.approx(single[split]["top5"])


def test_nan_loss_stops_with_one_line_and_saves_nothing_new(data, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    result = train(*tiny(data, out, epochs=1, **{"optim.lr": 1e12, "optim.weight_decay": 0}))
    line = one_line(result, 3).lower()
    assert "loss is nan" in line or "loss is inf" in line
    assert list_checkpoints(out) == []


def test_bad_truth_file_is_one_line(data, tmp_path: Path) -> None:
    bad = tmp_path / "truth.tsv"
    bad.write_text("path\tweb_label\ttruth\ngoogle/q0001/000001.jpg\t0\tmaybe\n")
    for truth, message in ((tmp_path / "missing.tsv", "cannot read"), (bad, "truth.tsv:2")):
        one_line(train(*tiny(data, tmp_path / "run", epochs=1, **{"data.truth": truth})), 2, message)


def test_the_trainer_uses_the_derived_momenta_and_start_epochs(data, tmp_path: Path, monkeypatch) -> None:
    """`train` builds the model with `Derived`'s momenta (mopro.momentum_batch) and its loop gets the start
    epochs resolved from mopro.*_fraction (also in derived.json); stopped before the first step, in this process."""
    from mopro_fast.config import load_config
    from mopro_fast.training import train as trainer

    class Stop(Exception):
        pass

    seen = {}

    def loop(run, *args):
        seen.update(momenta=(run.mopro.momentum, run.mopro.proto_momentum),
                    starts=(run.derived.proto_start_epoch, run.derived.clean_start_epoch))
        raise Stop

    monkeypatch.setattr(trainer, "_loop", loop)
    cfg = load_config(TINY, tiny(data, tmp_path / "run", epochs=4, **{
        "mopro.momentum_batch": 8, "mopro.proto_start_fraction": 0.5, "mopro.clean_start_fraction": 1.0,
        "run.deterministic": "false", "run.tensorboard": "false"}))  # (deterministic: global, for this process)
    with pytest.raises(Stop):
        trainer.train(cfg, progress=False)
    assert seen["momenta"] == (cfg.mopro.momentum ** 4, cfg.mopro.proto_momentum)  # global batch 32 = 4 x 8
    assert seen["starts"] == (2, 4)
    derived = json.loads((tmp_path / "run" / "derived.json").read_text())
    assert (derived["key_momentum"], derived["proto_start_epoch"], derived["clean_start_epoch"]) == \
        (cfg.mopro.momentum ** 4, 2, 4)
