"""WebVision 2.0 (5,000 classes, the same info/ files, no ImageNet-1k eval split): a built-in folder of
that shape (one 24 px training image per class) lists with --subset and --classes, converts, and
trains for one tiny epoch; nothing on the way assumes 1,000 classes or ImageNet synsets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from data_tools.convert import ConvertSettings, convert
from data_tools.fixture import FixtureSpec, make_fixture, wnid
from data_tools.webvision import list_webvision
from mopro_fast.config import load_config
from mopro_fast.training.checkpoint import list_checkpoints
from mopro_fast.training.train import train as run_training
from tests.conftest import TINY, tiny_args

K = 5000
SPEC = FixtureSpec(classes=K, train_per_class=1, val_per_class=0, imagenet_per_class=0, image_size=24, noise=0.0,
                   ood=0.0, seed=2, layout="2.0")


@pytest.fixture(scope="module")
def webvision2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("webvision2")
    make_fixture(root / "src", SPEC, workers=2)
    convert(root / "src", root / "shards", ConvertSettings(shard_size=1000), workers=2, progress=False)
    return {"src": root / "src", "shards": root / "shards", "root": root}


def test_layout_is_webvision2(webvision2) -> None:
    info = webvision2["src"] / "info"
    assert len((info / "synsets.txt").read_text().splitlines()) == K
    lines = (info / "train_filelist_google.txt").read_text().splitlines()
    assert all(re.fullmatch(r"google/q\d{5}/\d{6}\.jpg \d+", line) for line in lines)
    assert not (webvision2["src"] / "imagenet_val").exists()
    with pytest.raises(ValueError, match="no ImageNet-1k eval split"):
        FixtureSpec(classes=K, imagenet_per_class=1, layout="2.0").validate()
    with pytest.raises(ValueError, match="classes must be in 1..2520"):
        FixtureSpec(classes=K).validate()  # the 1.0 layout keeps every class distinct


def test_subset_and_classes_on_5000_classes(webvision2) -> None:
    train = list_webvision(webvision2["src"])["train"]
    assert sorted(r.label for r in train.records) == list(range(K))
    assert {r.query for r in train.records} <= set(range(1, 2 * K + 1))
    some = list_webvision(webvision2["src"], classes=3000)["train"]
    assert sorted(r.label for r in some.records) == list(range(3000))
    mini = list_webvision(webvision2["src"], subset="mini")["train"]
    assert {r.source for r in mini.records} == {"google"} and max(r.label for r in mini.records) < 50


def test_converts_and_trains_one_tiny_epoch(webvision2) -> None:
    manifest = json.loads((webvision2["shards"] / "manifest.json").read_text())
    assert manifest["num_classes"] == K and len(manifest["classes"]) == K
    assert manifest["classes"][K - 1] == {"id": K - 1, "wnid": wnid(K - 1), "name": manifest["classes"][K - 1]["name"]}
    assert set(manifest["splits"]) == {"train", "val"}  # no imagenet-val
    train = manifest["splits"]["train"]
    assert train["num_written"] == K and train["class_counts"] == [1] * K

    out = webvision2["root"] / "run"
    # resnet18 at width 8, 16 px, batch 256: 19 steps over 4,864 of the 5,000 images (equal batches drop
    # the rest), in this process on one thread (the machine is shared; torch is imported already)
    cfg = load_config(TINY, tiny_args(webvision2["shards"], out, 1, **{
        "model.width": 8, "loader.batch_size": 256, "mopro.queue_size": 256, "loader.resolution": 16,
        "loader.eval_resolution": 16, "loader.eval_resize": 20}) + ["data.eval_splits=[]"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_training(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    derived = json.loads((out / "derived.json").read_text())
    assert derived["num_classes"] == K and derived["steps_per_epoch"] == K // 256
    assert summary["global_step"] == K // 256
    model = torch.load(list_checkpoints(out)[0], map_location="cpu", weights_only=False)["model"]
    assert model["prototypes.weight"].shape[0] == K and model["query.classifier.weight"].shape[0] == K
    # each image seen is of its own class (no noise, no cleaning in epoch 0): that many prototypes moved
    assert int((model["prototypes.weight"].norm(dim=1) > 0).sum()) == (K // 256) * 256
