"""The paper recipe stays the paper recipe: recipes/rn50_8gpu.yaml resolves to the same config, the
same derived values and the same lr at every step as before the time-to-accuracy switches (issue 15)
were added. The expected values were computed from the tree before those switches and pasted here;
a new key must sit at its default, which must leave all of this unchanged."""

from __future__ import annotations

import math
from pathlib import Path

from mopro_fast.config import derive, load_config, lr_at

RN50_8 = Path(__file__).resolve().parent.parent / "recipes" / "rn50_8gpu.yaml"

BEFORE = {  # load_config(RN50_8, []).to_dict() before issue 15
    "data": {"shards": "data/webvision-shards", "train_split": "train", "eval_splits": ["val", "imagenet-val"],
             "num_classes": 1000, "truth": None},
    "model": {"arch": "resnet50", "small_stem": False, "width": 64, "proj_dim": 128, "proj_hidden": 2048},
    "mopro": {"enabled": True, "queue_size": 8192, "temperature": 0.1, "momentum": 0.999, "proto_momentum": 0.999,
              "alpha": 0.5, "pseudo_threshold": 0.8, "ood_threshold": None, "w_inst": 1.0, "w_proto": 1.0,
              "proto_start_epoch": 1, "start_clean_epoch": 11},
    "optim": {"lr": 0.1, "base_batch": 256, "momentum": 0.9, "weight_decay": 0.0001, "nesterov": False,
              "impl": "auto"},
    "schedule": {"epochs": 90, "kind": "step", "milestones": [40, 80], "gamma": 0.1, "warmup_epochs": 0.0},
    "loader": {"backend": "dali", "batch_size": 32, "workers": 8, "resolution": 224, "min_resolution": None,
               "ramp_start_epoch": 0, "ramp_end_epoch": 0, "resolution_step": 32, "eval_resolution": 224,
               "eval_resize": 256, "shuffle_buffer": 1024, "prefetch": 2,
               "dali": {"hw_decoder_load": 0.65, "decode": "once"}},
    "run": {"out": "runs/rn50_8gpu", "device": "auto", "precision": "bf16", "channels_last": True, "compile": False,
            "cudnn_benchmark": True, "tf32": True, "seed": 0, "deterministic": False, "eval_every": 1,
            "ckpt_every_steps": 0, "ckpt_every_minutes": 30.0, "keep_last": 3, "log_every": 50, "tensorboard": True,
            "progress_seconds": 30.0, "max_steps_per_epoch": 0},
}

DERIVED_BEFORE = {  # derive(cfg, 8, 2560).to_dict() before issue 15
    "world_size": 8, "num_train": 2560, "num_classes": 1000, "global_batch": 256, "lr": 0.1, "steps_per_epoch": 10,
    "epochs": 90, "total_steps": 900, "warmup_steps": 0, "schedule": "step", "milestone_steps": (400, 800),
    "gamma": 0.1, "proto_start_epoch": 1, "clean_start_epoch": 11, "capped": False,
}

NEW_KEYS = {  # issues 15 and 18 (data.cache_dir): new keys at their defaults, leaving the paper recipe as it was
    "data": {"cache_dir": None},
    "model": {"blurpool": False},
    "mopro": {"proto_start_fraction": None, "clean_start_fraction": None, "momentum_batch": None},
    "optim": {"label_smoothing": 0.0, "no_bn_weight_decay": False},
}
NEW_DERIVED = {"key_momentum": 0.999, "proto_momentum": 0.999}


def without(tree: dict, drop: dict) -> dict:
    """`tree` less the keys of `drop` (a two-level {section: {key: value}}), each checked to hold its value."""
    out = {section: dict(keys) for section, keys in tree.items()}
    for section, keys in drop.items():
        for key, value in keys.items():
            if key in out[section]:
                assert out[section].pop(key) == value, f"{section}.{key} is not at its default"
    return out


def test_paper_recipe_resolves_as_before():
    resolved = load_config(RN50_8, []).to_dict()
    assert without(resolved, NEW_KEYS) == BEFORE


def test_paper_recipe_derives_as_before():
    derived = derive(load_config(RN50_8, []), world_size=8, num_train=2560).to_dict()
    for key, value in NEW_DERIVED.items():
        if key in derived:
            assert derived.pop(key) == value, key
    assert derived == DERIVED_BEFORE


def test_paper_recipe_lr_at_every_step_as_before():
    """Step decay: 0.1, x0.1 from epoch 40 (step 400), x0.01 from epoch 80 (step 800); no warm-up."""
    d = derive(load_config(RN50_8, []), world_size=8, num_train=2560)
    expected = [0.1 * 0.1 ** ((s >= 400) + (s >= 800)) for s in range(900)]
    assert [lr_at(d, s) for s in range(900)] == expected  # exact, not approximately


def test_cosine_with_warmup_lr_at_every_step_as_before():
    """The cosine schedule of the current code, written out: warm-up (s + 1) / 15 over 15 steps (1.5 epochs)
    times a half cosine from step 15 to 0 at step 300."""
    d = derive(load_config(RN50_8, ["schedule.kind=cosine", "schedule.epochs=30", "schedule.warmup_epochs=1.5",
                                    "schedule.milestones=[10]", "mopro.start_clean_epoch=11"]), 8, 2560)
    assert (d.warmup_steps, d.total_steps) == (15, 300)
    expected = []
    for s in range(300):
        lr = 0.1 * 0.5 * (1.0 + math.cos(math.pi * min(max(s - 15, 0) / 285, 1.0)))
        expected.append(lr * ((s + 1) / 15) if s < 15 else lr)
    assert [lr_at(d, s) for s in range(300)] == expected
