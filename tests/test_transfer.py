"""Transfer evaluation (mopro_fast/transfer): the VOC "all points" AP against a literal loop and scikit-learn,
the readers on the built-in VOC/Places/ImageNet-shaped data, `transfer svm` and `transfer knn` on the
session's trained MoPro checkpoint against a random encoder, and `finetune` killed and resumed exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.fixture import class_name, wnid
from data_tools.transfer_fixture import TransferSpec, make_transfer_fixture
from mopro_fast.training.checkpoint import list_checkpoints
from mopro_fast.transfer.ap import voc_ap
from tests.conftest import REPO, TRAINED, cli, one_line

FINETUNE = REPO / "recipes" / "finetune_in1k_1pct.yaml"
# The trained run's classes and cues; 40 px images seen through its 36 -> 32 px eval view.
SPEC = TransferSpec(classes=TRAINED.classes, per_class=24, test_per_class=16, image_size=40, seed=0,
                    hue_coded=TRAINED.hue_coded, corrupt=True)
IMAGENET = dataclasses.replace(SPEC, per_class=40)  # 240 training images: --fraction 0.1 keeps 24, 3 steps of 8


@pytest.fixture(scope="module")
def transfer_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    return {kind: make_transfer_fixture(root / kind, kind, IMAGENET if kind == "imagenet" else SPEC)
            for kind in ("voc07", "places205", "imagenet")}


# ----------------------------------------------------------------------------------------------- AP

def literal_voc_ap(targets, scores) -> float:
    """The VOC devkit's VOCap rule written as loops, one rank at a time."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, as ap.py's
    n_pos = sum(1 for t in targets if t > 0)
    tp = fp = 0
    rec, prec = [0.0], [0.0]
    for i in ranked:
        if targets[i] > 0:
            tp += 1
        else:
            fp += 1
        rec.append(tp / n_pos)
        prec.append(tp / (tp + fp))
    rec.append(1.0)
    prec.append(0.0)
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    return sum((rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1])


CRAFTED = [  # (targets with VOC's 1 / 0 / -1, scores)
    ([1, -1, 1, -1, -1, 1], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
    ([-1, 1, 1, -1, 1, 0], [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]),  # a difficult (0) counts as a negative
    ([1, 1, -1, -1], [0.5, 0.5, 0.5, 0.5]),  # all tied: input order
    ([-1, -1, 1], [0.1, 0.2, 0.3]),  # perfect
    ([1, -1, -1], [0.1, 0.2, 0.3]),  # worst
]


@pytest.mark.parametrize("targets,scores", CRAFTED)
def test_voc_ap_equals_the_literal_rule(targets, scores) -> None:
    assert voc_ap(np.array(targets), np.array(scores)) == pytest.approx(literal_voc_ap(targets, scores), abs=1e-12)


def test_voc_ap_literal_rule_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        targets = rng.choice([1, 0, -1], size=int(rng.integers(2, 40)), p=[0.3, 0.1, 0.6])
        targets[0] = 1
        scores = rng.normal(size=targets.size).round(1)  # rounding makes ties
        assert voc_ap(targets, scores) == pytest.approx(literal_voc_ap(list(targets), list(scores)), abs=1e-12)
    assert np.isnan(voc_ap(np.array([-1, 0]), np.array([0.3, 0.2])))  # no positive


def test_voc_ap_against_sklearn() -> None:
    from sklearn.metrics import average_precision_score as sk_ap

    # They agree when the envelope changes nothing (precision at the hits never rises later) and no score ties.
    agree = [([1, 1, -1, 1, -1, -1], [6, 5, 4, 3, 2, 1]), ([1, -1, -1], [3, 2, 1]), ([-1, 1, 1], [1, 2, 3])]
    for targets, scores in agree:
        assert voc_ap(np.array(targets), np.array(scores, float)) == pytest.approx(
            sk_ap(np.array(targets) > 0, scores), abs=1e-12)
    # Where a later precision is higher (hits at ranks 1, 4, 5: precision 1, 1/2, 3/5), the envelope lifts
    # the second hit's 1/2 to 3/5: this AP is above sklearn's.
    targets, scores = np.array([1, -1, -1, 1, 1]), np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert voc_ap(targets, scores) == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert sk_ap(targets > 0, scores) == pytest.approx((1 + 0.5 + 0.6) / 3)
    rng = np.random.default_rng(1)
    for _ in range(50):
        targets = rng.choice([1, -1], size=30)
        targets[:2] = [1, -1]
        scores = rng.normal(size=30)  # no ties
        assert voc_ap(targets, scores) >= sk_ap(targets > 0, scores) - 1e-12


# ------------------------------------------------------------------------------------------- readers

def test_readers_on_the_built_in_layouts(transfer_data) -> None:
    from mopro_fast.transfer.datasets import read_image_folder, read_places, read_voc

    K = SPEC.classes
    trainval, test = read_voc(transfer_data["voc07"], "trainval"), read_voc(transfer_data["voc07"], "test")
    assert (len(trainval), len(test)) == (K * SPEC.per_class, K * SPEC.test_per_class)
    assert trainval.multilabel and trainval.labels.shape == (len(trainval), K) and len(trainval.classes) == K
    assert set(np.unique(trainval.labels)) == {-1, 0, 1}  # difficult second objects are kept as 0
    assert trainval.classes == sorted(class_name(c) for c in range(K))  # the class files, sorted (VOC's order)
    main = [trainval.classes.index(class_name(i % K)) for i in range(len(trainval))]  # image i shows class i mod K
    assert (trainval.labels[np.arange(len(trainval)), main] == 1).all()
    places = read_places(transfer_data["places205"], "train")
    assert len(places) == K * SPEC.per_class and places.classes == [str(c) for c in range(K)]
    assert all((places.root / p).parent.is_dir() for p in places.paths)
    imagenet = read_image_folder(transfer_data["imagenet"] / "train")
    assert len(imagenet) == K * IMAGENET.per_class
    val = read_image_folder(transfer_data["imagenet"] / "val", imagenet.classes)
    assert len(imagenet.classes) == K and len(val) == K * SPEC.test_per_class and val.classes == imagenet.classes


def invoke(*args):
    """`mopro-fast ARGS` in this process (click's CliRunner): for the checks that end before any training."""
    from click.testing import CliRunner

    from mopro_fast.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_bad_transfer_input_is_one_line(trained_ckpt, transfer_data, tmp_path: Path) -> None:
    for args, words in ((["svm", trained_ckpt, "--dataset", "voc07", "--root", tmp_path], "not a VOC2007 folder"),
                        (["svm", trained_ckpt, "--dataset", "places205", "--root", tmp_path],
                         "trainvalsplit_places205"),
                        (["knn", tmp_path / "nope.pt", "--train", tmp_path, "--val", tmp_path], "no such checkpoint"),
                        (["knn", trained_ckpt, "--train", transfer_data["imagenet"] / "val", "--val",
                          transfer_data["voc07"]], "is not a class of the training folder"),
                        (["svm", trained_ckpt, "--dataset", "voc07", "--root", transfer_data["voc07"], "--shots", "0"],
                         "positive integers")):
        result = invoke("transfer", *args)
        if "positive integers" in words:  # click's own usage error: exit 2, its usage lines
            assert result.exit_code == 2 and words in result.output
            continue
        one_line(result, 2, words, prefix="error: ")


def test_missing_scikit_learn_says_what_to_install(monkeypatch) -> None:
    from mopro_fast.transfer import svm
    from mopro_fast.transfer.datasets import TransferError

    monkeypatch.setitem(sys.modules, "sklearn.svm", None)  # import sklearn.svm now raises ImportError
    with pytest.raises(TransferError, match=r"pip install 'mopro-fast\[transfer\]'"):
        svm.linear_svc()


# -------------------------------------------------------------------------------------------- svm, knn

# mAP points of the trained encoder over a random one: at every k, and on average over the k's. Seen: 7.9-20 at
# one k (the smallest at k = 16, where a random encoder's colour features catch up most), 11.9-17 on average.
MARGIN, MEAN_MARGIN = 5.0, 8.0


def test_svm_on_voc_beats_a_random_encoder_and_grows_with_k(trained_ckpt, transfer_data, tmp_path: Path) -> None:
    out = tmp_path / "svm"
    result = invoke("transfer", "svm", trained_ckpt, "--dataset", "voc07", "--root", transfer_data["voc07"],
                    "--workers", "0", "--out", out)  # the protocol's k = 1..16, 5 draws
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads((out / "svm-voc07.json").read_text())
    assert "k = 16" in result.output and str(out / "svm-voc07.json") in result.output
    ours, chance = (report["encoders"][n]["per_k"] for n in ("checkpoint", "random"))
    means = [ours[str(k)]["mean"] for k in report["shots"]]
    gaps = [ours[str(k)]["mean"] - chance[str(k)]["mean"] for k in report["shots"]]
    assert min(gaps) >= MARGIN and np.mean(gaps) >= MEAN_MARGIN, (gaps, ours, chance)
    assert all(len(ours[str(k)]["runs"]) == 5 for k in report["shots"])
    # grows with k: never down by more than the draws' noise (std 2-7 points at k <= 4), up 8+ from k=1 to 16
    assert all(b >= a - 3.0 for a, b in zip(means, means[1:])) and means[-1] >= means[0] + 8.0, means
    assert report["published"]["mopro_webvision_v1_rn50"] == [59.5, 71.3, 76.5, 81.4, 83.7]
    # the two planted bad trainval files were found, skipped and reported, for both encoders
    for name in ("checkpoint", "random"):
        assert sorted(report["encoders"][name]["bad_files"]["train"]) == ["000001.jpg", "000002.jpg"]
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "checkpoint-voc07-test.npz", "checkpoint-voc07-trainval.npz", "random-voc07-test.npz",
        "random-voc07-trainval.npz"]


def test_places_svm_and_knn_in_process_reuse_the_feature_cache(trained_ckpt, transfer_data, tmp_path: Path) -> None:
    from mopro_fast.transfer.features import FeatureCache
    from mopro_fast.transfer.run import run_knn, run_svm

    over = ["run.device=cpu"]
    report = run_svm(trained_ckpt, "places205", transfer_data["places205"], tmp_path, (1, 4), 1, overrides=over,
                     workers=0)
    ours, chance = (report["encoders"][n]["per_k"] for n in ("checkpoint", "random"))
    assert ours["4"]["mean"] > chance["4"]["mean"] and 0 <= ours["1"]["mean"] <= 100
    planted = {"r/red_plain_circle/train_000000.jpg", "o/orange_hstriped_square_white_edge/train_000001.jpg"}
    # only the drawn images are read: a planted bad file is found (and replaced) only when a draw picks it
    assert set(report["encoders"]["checkpoint"]["bad_files"]["train"]) <= planted
    cache = tmp_path / "features" / "checkpoint-places205-val.npz"
    before = cache.stat().st_mtime_ns
    again = run_svm(trained_ckpt, "places205", transfer_data["places205"], tmp_path, (1, 4), 1,
                    reference=trained_ckpt, overrides=over, workers=0)  # the same weights as the reference
    assert cache.stat().st_mtime_ns == before  # every feature of the checkpoint came from the cache
    assert again["encoders"]["checkpoint"]["per_k"] == ours == again["encoders"]["reference"]["per_k"]

    import torchvision

    torchvision_sd = tmp_path / "rn18-torchvision.pt"  # --reference as a plain torchvision state dict
    torch.save(torchvision.models.resnet18().state_dict(), torchvision_sd)
    knn = run_knn(trained_ckpt, transfer_data["imagenet"] / "train", transfer_data["imagenet"] / "val", tmp_path,
                  reference=torchvision_sd, overrides=over, workers=0)
    assert set(knn["encoders"]) == {"checkpoint", "random", "reference"}
    assert 0 <= knn["encoders"]["reference"]["top1"] <= knn["encoders"]["reference"]["top5"] <= 100
    assert knn["encoders"]["checkpoint"]["top1"] > knn["encoders"]["random"]["top1"]
    assert knn["encoders"]["checkpoint"]["top5"] >= knn["encoders"]["checkpoint"]["top1"]
    assert len(knn["encoders"]["checkpoint"]["bad_files"]["train"]) == 2
    assert FeatureCache(tmp_path / "features", *_encoder_and_listing(trained_ckpt, transfer_data)).loaded
    assert (tmp_path / "features" / "checkpoint-folder-train.npz").is_file()


def _encoder_and_listing(ckpt: Path, data: dict[str, Path]):
    from mopro_fast.transfer.datasets import read_image_folder
    from mopro_fast.transfer.features import checkpoint_encoder

    encoder, trained = checkpoint_encoder(ckpt, ["run.device=cpu"])
    listing = read_image_folder(data["imagenet"] / "val", read_image_folder(data["imagenet"] / "train").classes,
                                name="folder-val")
    return encoder, listing, trained.cfg, trained.device


# -------------------------------------------------------------------------------------------- finetune

TINY_FT = ["loader.batch_size=8", "loader.workers=0", "loader.resolution=32", "loader.eval_resize=36",
           "loader.eval_resolution=32", "loader.shuffle_buffer=1000", "run.precision=fp32", "run.channels_last=false",
           "run.deterministic=true", "run.tensorboard=false", "schedule.epochs=2", "schedule.milestones=[1]",
           "run.log_every=1", "run.ckpt_every_steps=3"]  # 2 steps per epoch: saves at steps 2, 3 (mid-epoch 1), 4


def finetune_args(ckpt: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", ckpt, FINETUNE, "--root", root, "--fraction", "0.1", "--workers", "1", "--no-progress",
            f"run.out={out}", *TINY_FT, *extra]


def test_finetune_trains_resumes_exactly_after_a_kill_and_reuses_its_subset(trained_ckpt, transfer_data,
                                                                          tmp_path: Path) -> None:
    root = transfer_data["imagenet"]
    reference = cli(*finetune_args(trained_ckpt, root, tmp_path / "ref"), threads=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    report = json.loads((tmp_path / "ref" / "finetune.json").read_text())
    listed = SPEC.classes * IMAGENET.per_class
    assert report["listed_images"] == listed and report["train_images"] == int(0.1 * listed)
    assert report["rejected"] == {"train": 1, "val": 0}  # a planted bad file was drawn: counted and skipped
    assert json.loads((tmp_path / "ref" / "derived.json").read_text())["steps_per_epoch"] == 2  # 23 images, batch 8
    assert report["head"] == "checkpoint's classifier"  # the fixture's wnids are the trained run's classes
    assert 0 <= report["eval"]["val"]["top1"] <= report["eval"]["val"]["top5"] <= 100
    assert report["eval"]["val"]["samples"] == SPEC.classes * SPEC.test_per_class
    subset = (tmp_path / "ref" / "subset.txt").read_text().splitlines()
    assert len(subset) == 1 + report["train_images"] and '"fraction": 0.1' in subset[0]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", *map(str, finetune_args(trained_ckpt, root, out))],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.monotonic() + 300
    while not (out / "ckpt-e0001-s00000003.pt").exists():  # then killed in the middle of epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "finetune.json").exists()
    drawn = (out / "subset.txt").read_bytes()
    assert drawn == (tmp_path / "ref" / "subset.txt").read_bytes()  # same recipe, same seed: the same draw

    other = invoke(*finetune_args(trained_ckpt, root, out, "finetune.seed=1"), "--resume", "auto")
    one_line(other, 2, "subset.txt was drawn for another subset", "seed 0 -> 1", prefix="error: ")
    fresh = invoke(*finetune_args(trained_ckpt, root, out))
    one_line(fresh, 2, "holds a fine-tune run", "--resume auto", prefix="error: ")

    resumed = cli(*finetune_args(trained_ckpt, root, out), "--resume", "auto", threads=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"subset: reusing {out / 'subset.txt'}" in resumed.stdout and "resumed from" in resumed.stdout
    assert (out / "subset.txt").read_bytes() == drawn
    a = torch.load(list_checkpoints(tmp_path / "ref")[0], map_location="cpu", weights_only=False)["model"]
    b = torch.load(list_checkpoints(out)[0], map_location="cpu", weights_only=False)["model"]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, worst
    assert json.loads((out / "finetune.json").read_text())["eval"] == report["eval"]


def test_finetune_recipe_is_the_protocol_and_strict(tmp_path: Path) -> None:
    from mopro_fast.config import ConfigError
    from mopro_fast.transfer.finetune import load_recipe

    model = {"arch": "resnet18", "proj_hidden": 64}  # the checkpoint's model section
    cfg, ft = load_recipe(FINETUNE, [f"run.out={tmp_path}"], model, None, tmp_path)
    assert (cfg.optim.lr, cfg.optim.base_batch, cfg.optim.momentum, cfg.optim.weight_decay) == (0.005, 256, 0.9, 0.0)
    assert (cfg.schedule.epochs, cfg.schedule.milestones, cfg.schedule.gamma) == (40, [20, 30], 0.2)
    assert not cfg.mopro.enabled and ft.fraction == 0.01 and cfg.model.arch == model["arch"]
    assert cfg.data.shards == str(tmp_path / "data") and ft.root == str(tmp_path)
    assert load_recipe(FINETUNE, [], model, 0.1, tmp_path)[1].fraction == 0.1
    with pytest.raises(ConfigError, match="finetune.fractoin"):
        load_recipe(FINETUNE, ["finetune.fractoin=0.1"], model, None, tmp_path)
    with pytest.raises(ConfigError, match="finetune.fraction"):
        load_recipe(FINETUNE, ["finetune.fraction=0"], model, None, tmp_path)


def test_finetune_keeps_the_classifier_only_for_the_checkpoints_classes(trained_data, transfer_data,
                                                                       tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mopro_fast.transfer.finetune import FinetuneError, class_order

    ckpt_cfg = SimpleNamespace(data=SimpleNamespace(shards=str(trained_data["shards"])))
    order, keep = class_order(ckpt_cfg, transfer_data["imagenet"] / "train", "auto", TRAINED.classes)
    assert keep and order == [wnid(c) for c in range(TRAINED.classes)]  # the manifest's class-id order
    other = tmp_path / "train"
    for name in ("n01440764", "n01443537"):
        (other / name).mkdir(parents=True)
    assert class_order(ckpt_cfg, other, "auto", TRAINED.classes) == (None, False)  # other classes: a fresh head
    assert class_order(ckpt_cfg, transfer_data["imagenet"] / "train", "fresh", TRAINED.classes)[1] is False
    with pytest.raises(FinetuneError, match="finetune.head=keep"):
        class_order(ckpt_cfg, other, "keep", TRAINED.classes)
