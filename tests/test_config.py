"""Config: recipes load, overrides are typed, bad input fails with one line naming the key,
derived values and schedules have the expected numbers, and the resolved recipe round-trips."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from mopro_fast.config import (Config, ConfigError, DataConfig, LoaderConfig, MoproConfig, OptimConfig, RunConfig,
                               ScheduleConfig, derive, format_config_error, load_config, lr_at, mopro_switches,
                               resolution_at)

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")
                 if p.name != "crt.yaml" and not p.name.startswith(("convert_", "finetune_")))
# training recipes; crt.yaml is tested in tests/test_after_training.py, convert_*.yaml in tests/test_convert.py,
# finetune_*.yaml in tests/test_transfer.py
DEMO = next(p for p in RECIPES if p.name == "small_data_cpu.yaml")
RN50_8 = next(p for p in RECIPES if p.name == "rn50_8gpu.yaml")
RN50_1 = next(p for p in RECIPES if p.name == "rn50_1gpu.yaml")
TINY = next(p for p in RECIPES if p.name == "tiny_test.yaml")


def required(recipe: Path) -> list[str]:
    """Overrides for the required keys a recipe leaves unset (tiny_test.yaml: the tests pass them)."""
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    return [f"{section}.{key}={value}" for section, key, value in (("data", "shards", "s"), ("run", "out", "o"))
            if key not in (raw.get(section) or {})]


def load_recipe(recipe: Path, overrides: list[str] = ()) -> Config:
    return load_config(recipe, [*required(recipe), *overrides])


def error(recipe: Path | str, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg and msg == msg.strip()
    return msg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ---- recipes ------------------------------------------------------------------------------------

def test_all_recipes_present():
    assert {p.name for p in RECIPES} >= {"rn50_8gpu.yaml", "rn50_1gpu.yaml", "mini_webvision.yaml", "small_data_cpu.yaml",
                                         "tiny_test.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_sets_nothing_ignored(recipe):
    import yaml

    cfg = load_recipe(recipe)
    raw = yaml.safe_load(recipe.read_text())
    assert recipe.read_text().startswith("#"), "a recipe starts with a comment saying what it is for"
    assert len(recipe.read_text().splitlines()) <= 45
    if cfg.schedule.kind != "step":
        assert not {"milestones", "gamma"} & set(raw.get("schedule", {}))
    if cfg.loader.backend != "dali":
        assert "hw_decoder_load" not in raw.get("loader", {})
    assert derive(cfg, world_size=1, num_train=10_000).steps_per_epoch >= 1


def test_paper_recipe_is_the_default_setup():
    cfg = load_config(RN50_8, [])
    assert cfg.mopro == MoproConfig()  # defaults are the paper's numbers
    assert cfg.optim == OptimConfig()
    assert cfg.schedule == ScheduleConfig()
    assert (cfg.model.arch, cfg.loader.batch_size, cfg.run.precision, cfg.run.channels_last) == \
        ("resnet50", 32, "bf16", True)
    d = derive(cfg, world_size=8, num_train=2_400_000)
    assert (d.global_batch, d.lr, d.proto_start_epoch, d.clean_start_epoch) == (256, 0.1, 1, 11)


def test_demo_recipe():
    cfg = load_config(DEMO, [])
    assert (cfg.model.arch, cfg.loader.backend, cfg.run.precision) == ("resnet18", "dali", "fp32")
    assert cfg.loader.resolution == cfg.loader.eval_resolution < cfg.loader.eval_resize <= 96  # small CPU images
    assert (cfg.data.shards, cfg.data.truth, cfg.run.out) == ("demo/shards", "demo/fixture/truth.tsv", "runs/demo")
    assert cfg.schedule.kind == "cosine" and cfg.schedule.warmup_epochs > 0
    assert 0 < cfg.mopro.start_clean_epoch < cfg.schedule.epochs


def test_tiny_test_recipe():
    """What the tests' runs rely on (tests/conftest.py: TINY): the data and the run folder come from
    the test, a 2-epoch run reaches the prototype loss and cleaning, runs are reproducible."""
    assert error(TINY).startswith("data.shards: missing")
    assert error(TINY, ["data.shards=s"]).startswith("run.out: missing")
    cfg = load_recipe(TINY)
    assert (cfg.model.arch, cfg.loader.backend, cfg.run.precision) == ("resnet18", "torch", "fp32")
    assert (cfg.loader.resolution, cfg.loader.batch_size, cfg.model.proj_hidden, cfg.mopro.queue_size) == \
        (32, 32, 64, 128)
    assert cfg.mopro.queue_size % (2 * cfg.loader.batch_size) == 0  # the tests' 2-rank runs
    assert cfg.data.truth is None and cfg.run.deterministic and not cfg.run.tensorboard
    assert (cfg.run.log_every, cfg.run.eval_every) == (1, 1)
    assert cfg.mopro.proto_start_epoch <= cfg.mopro.start_clean_epoch < cfg.schedule.epochs == 2
    assert derive(cfg, world_size=1, num_train=96).steps_per_epoch == 3


# ---- overrides ----------------------------------------------------------------------------------

def test_overrides_apply_with_types():
    cfg = load_config(DEMO, ["optim.lr=0.2", "run.compile=true", "run.out=runs/x", "schedule.kind=step",
                             "schedule.milestones=[5, 9]", "loader.batch_size=16", "data.num_classes=10"])
    assert cfg.optim.lr == 0.2 and type(cfg.optim.lr) is float
    assert cfg.run.compile is True
    assert cfg.run.out == "runs/x"
    assert cfg.schedule.milestones == [5, 9] and all(type(m) is int for m in cfg.schedule.milestones)
    assert cfg.loader.batch_size == 16 and type(cfg.loader.batch_size) is int
    assert cfg.data.num_classes == 10


def test_int_given_for_a_float_becomes_a_float():
    cfg = load_config(DEMO, ["optim.lr=1", "optim.weight_decay=1e-4"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0 and cfg.optim.weight_decay == 1e-4


def test_later_override_wins():
    assert load_config(DEMO, ["optim.lr=0.2", "optim.lr=0.3"]).optim.lr == 0.3


def test_null_for_optional_fields():
    cfg = load_config(DEMO, ["data.truth=null", "data.num_classes=null"])
    assert cfg.data.truth is None and cfg.data.num_classes is None


# ---- errors: one line naming the dotted key ------------------------------------------------------

def test_unknown_key_in_file_with_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  shards: s\noptim:\n  lrr: 0.1\nrun:\n  out: o\n")
    assert error(path) == f"optim.lrr: unknown key in {path}; did you mean optim.lr?"


def test_unknown_key_in_override_with_suggestion():
    msg = "optim.lrr: unknown key in override 'optim.lrr=0.2'; did you mean optim.lr?"
    assert error(DEMO, ["optim.lrr=0.2"]) == msg


def test_unknown_section_and_misplaced_key():
    assert error(DEMO, ["optimm.lr=0.2"]).startswith("optimm: unknown section")
    assert error(DEMO, ["optimm.lr=0.2"]).endswith("did you mean optim?")
    assert error(DEMO, ["optim.epochs=3"]).endswith("did you mean schedule.epochs?")
    msg = error(DEMO, ["optim.zzz=3"])
    assert msg.startswith("optim.zzz: unknown key") and "lr, base_batch" in msg


@pytest.mark.parametrize("override, key, words", [
    ("loader.batch_size=abc", "loader.batch_size", "expected an integer"),
    ("loader.batch_size='32'", "loader.batch_size", "expected an integer"),
    ("loader.batch_size=32.5", "loader.batch_size", "expected an integer"),
    ("run.compile=1", "run.compile", "expected true or false"),
    ("mopro.enabled=0", "mopro.enabled", "expected true or false"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("optim.lr=true", "optim.lr", "expected a number"),
    ("run.device=on", "run.device", "expected a string"),
    ("schedule.milestones=3", "schedule.milestones", "expected a list"),
    ("schedule.milestones=[1, x]", "schedule.milestones", "item 1: expected an integer"),
    ("optim.lr=null", "optim.lr", "must not be null"),
    ("optim=3", "optim", "expected a mapping"),
])
def test_wrong_type(override, key, words):
    msg = error(DEMO, [override])
    assert msg.startswith(f"{key}: ") and words in msg and f"override '{override}'" in msg


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "data:\n  shards: s\nrun:\n  out: o\n  tensorboard: 1\n")
    assert error(path) == f"run.tensorboard: expected true or false, got int 1 in {path}"


@pytest.mark.parametrize("overrides, start", [
    (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
    (["optim.lr=0"], "optim.lr: must be > 0"),
    (["loader.batch_size=0"], "loader.batch_size: must be >= 1, got 0"),
    (["mopro.alpha=1.5"], "mopro.alpha: must be in [0, 1], got 1.5"),
    (["mopro.alpha=-0.1"], "mopro.alpha: must be in [0, 1]"),
    (["mopro.pseudo_threshold=0"], "mopro.pseudo_threshold: must be in (0, 1]"),
    (["mopro.pseudo_threshold=1.2"], "mopro.pseudo_threshold: must be in (0, 1]"),
    (["mopro.momentum=1"], "mopro.momentum: must be in [0, 1)"),
    (["mopro.temperature=0"], "mopro.temperature: must be > 0"),
    (["model.arch=resnet5"], "model.arch: 'resnet5' is not one of resnet50, resnet18"),
    (["loader.backend=pil"], "loader.backend: 'pil' is not one of torch, dali, ffcv, nvjpeg"),
    (["run.precision=fp8"], "run.precision: 'fp8' is not one of bf16, fp16, fp32"),
    (["optim.impl=cuda"], "optim.impl: 'cuda' is not one of"),
    (["schedule.epochs=14", "schedule.kind=step", "schedule.milestones=[5, 20]"],
     "schedule.milestones: [5, 20] must be increasing"),
    (["schedule.kind=step", "schedule.milestones=[8, 4]"], "schedule.milestones: [8, 4] must be increasing"),
    (["schedule.milestones=[0]"], "schedule.milestones[0]: must be >= 1"),
    (["schedule.epochs=12", "schedule.warmup_epochs=12"], "schedule.warmup_epochs: must be < schedule.epochs"),
    (["schedule.epochs=12", "mopro.start_clean_epoch=13"], "mopro.start_clean_epoch: 13 is beyond schedule.epochs (12)"),
    (["schedule.epochs=14", "mopro.proto_start_epoch=20"], "mopro.proto_start_epoch: 20 is beyond schedule.epochs"),
    (["loader.eval_resize=36", "loader.eval_resolution=40"],
     "loader.eval_resolution: 40 is larger than loader.eval_resize (36)"),
    (["loader.dali.hw_decoder_load=2"], "loader.dali.hw_decoder_load: must be in [0, 1]"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov: needs optim.momentum > 0"),
    (["data.eval_splits=[val, val]"], "data.eval_splits: lists a split twice"),
    (["run.eval_every=0"], "run.eval_every: must be >= 1"),
    (["data.num_classes=0"], "data.num_classes: must be >= 1"),
    (["data.shards=''"], "data.shards: missing"),
    (["loader.min_resolution=0"], "loader.min_resolution: must be >= 1"),
    (["loader.resolution=64", "loader.min_resolution=96", "loader.ramp_end_epoch=5"],
     "loader.min_resolution: 96 is larger than loader.resolution (64)"),
    (["loader.ramp_start_epoch=5", "loader.ramp_end_epoch=3"], "loader.ramp_end_epoch: 3 must be in"),
    (["schedule.epochs=40", "loader.ramp_end_epoch=41"], "loader.ramp_end_epoch: 41 must be in"),
    (["loader.min_resolution=32"], "loader.ramp_end_epoch: with loader.min_resolution set, must be >"),
    (["loader.resolution_step=0"], "loader.resolution_step: must be >= 1"),
])
def test_impossible_values(overrides, start):
    assert error(DEMO, overrides).startswith(start)


def test_cosine_ignores_milestones_and_disabled_mopro_ignores_start_epochs():
    load_config(DEMO, ["schedule.milestones=[50]"])  # kind=cosine: milestones unused
    load_config(DEMO, ["mopro.enabled=false", "mopro.start_clean_epoch=99"])


def test_missing_required_and_bad_files(tmp_path):
    assert error(write(tmp_path, "model:\n  arch: resnet18\n"), ["run.out=o"]).startswith("data.shards: missing")
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: recipe file not found"
    assert "not valid YAML" in error(write(tmp_path, "optim:\n  lr: [1\n"))
    assert "not valid YAML" in error(write(tmp_path, "optim:\n  lr: 1\n  lr: 2\n"))
    assert "must be a mapping of sections" in error(write(tmp_path, "- a\n- b\n"))
    assert error(DEMO, ["optim.lr"]) == "optim.lr: an override must look like section.key=value"


def test_format_config_error():
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["optim.lrr=1"])
    assert format_config_error(info.value).splitlines() == [f"config error: {info.value}"]
    assert str(ConfigError("a:\n  b")) == "a: b"


# ---- derived values -----------------------------------------------------------------------------

def base_config(**schedule) -> Config:
    """Paper defaults with a given schedule (cleaning at the last epoch when the run is short)."""
    clean = min(11, schedule.get("epochs", 90))
    return Config(data=DataConfig(shards="s"), run=RunConfig(out="o"), schedule=ScheduleConfig(**schedule),
                  mopro=MoproConfig(start_clean_epoch=clean))


def test_derive_paper_setup_on_one_and_two_nodes():
    cfg = load_config(RN50_8, [])
    d = derive(cfg, world_size=8, num_train=2_400_000)
    assert (d.global_batch, d.lr, d.steps_per_epoch, d.total_steps, d.warmup_steps) == (256, 0.1, 9375, 843_750, 0)
    assert d.milestone_steps == (375_000, 750_000) and d.num_classes == 1000 and not d.capped
    d = derive(cfg, world_size=16, num_train=2_400_000)
    assert (d.global_batch, d.lr, d.steps_per_epoch) == (512, 0.2, 4687)


def test_derive_scaling_cap_and_limits():
    d = derive(load_config(RN50_1, ["loader.batch_size=128"]), world_size=1, num_train=1000)
    assert (d.global_batch, d.lr, d.steps_per_epoch) == (128, 0.05, 7)
    d = derive(load_config(DEMO, ["run.max_steps_per_epoch=5", "schedule.epochs=12",
                                   "mopro.start_clean_epoch=5"]), world_size=2, num_train=1200)
    assert (d.global_batch, d.steps_per_epoch, d.total_steps, d.warmup_steps, d.capped) == (128, 5, 60, 5, True)
    assert derive(load_config(DEMO, []), world_size=1, num_train=64).steps_per_epoch == 1
    too_big = r"^loader.batch_size: global batch 128 \(64 x 2 ranks\) is more than the 100 training samples$"
    with pytest.raises(ConfigError, match=too_big):
        derive(load_config(DEMO, []), world_size=2, num_train=100)


def test_derive_num_classes_and_switches_off():
    cfg = load_config(DEMO, [])
    assert derive(cfg, 1, 1200, manifest_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match=r"^data.num_classes: 50, but the shards have 10 classes$"):
        derive(replace(cfg, data=replace(cfg.data, num_classes=50)), 1, 1200, manifest_classes=10)
    off = derive(load_config(DEMO, ["mopro.enabled=false"]), 1, 1200)
    assert off.proto_start_epoch is None and off.clean_start_epoch is None and "MoPro off" in off.describe()


def test_describe_is_one_paragraph():
    text = derive(load_config(RN50_8, []), 8, 2_400_000).describe()
    assert "\n" not in text and "global batch 256" in text and "9375 steps per epoch" in text
    d = derive(load_config(RN50_8, []), 8, 2_400_000)
    assert d.to_dict()["milestone_steps"] == (375_000, 750_000) and d.to_dict()["lr"] == 0.1
    assert "noise cleaning from epoch 11" in text


# ---- schedules ----------------------------------------------------------------------------------

def test_step_schedule_with_warmup():
    # 8 ranks x 32 = 256; 2560 samples / 256 = 10 steps per epoch; warm-up 0.5 epoch = 5 steps; decay at steps 40, 80
    d = derive(base_config(epochs=10, kind="step", milestones=[4, 8], gamma=0.1, warmup_epochs=0.5), 8, 2560)
    d = replace(d)  # frozen dataclass, copyable
    assert (d.warmup_steps, d.milestone_steps, d.total_steps) == (5, (40, 80), 100)
    expected = {0: 0.02, 1: 0.04, 4: 0.1, 5: 0.1, 39: 0.1, 40: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
    for step, lr in expected.items():
        assert lr_at(d, step) == pytest.approx(lr, abs=1e-12), step


def test_cosine_schedule_with_warmup():
    # 10 steps per epoch, warm-up 1 epoch = 10 steps, cosine over the remaining 90 steps to 0
    d = derive(base_config(epochs=10, kind="cosine", warmup_epochs=1.0), 8, 2560)
    expected = {0: 0.01, 4: 0.05, 9: 0.1, 10: 0.1, 40: 0.1 * 0.5 * (1 + math.cos(math.pi / 3)), 55: 0.05,
                100: 0.0, 150: 0.0}
    for step, lr in expected.items():
        assert lr_at(d, step) == pytest.approx(lr, abs=1e-12), step
    assert lr_at(d, 40) == pytest.approx(0.075, abs=1e-12)
    assert 0 < lr_at(d, 99) < 1e-3
    assert all(lr_at(d, s) >= lr_at(d, s + 1) for s in range(10, 100))


def test_linear_schedule_with_warmup():
    # 10 steps per epoch, warm-up 1 epoch = 10 steps, then a straight line from 0.1 at step 10 to 0 at step 100
    d = derive(base_config(epochs=10, kind="linear", warmup_epochs=1.0), 8, 2560)
    assert (d.schedule, d.warmup_steps, d.total_steps, d.milestone_steps) == ("linear", 10, 100, ())
    expected = {0: 0.01, 4: 0.05, 9: 0.1, 10: 0.1, 55: 0.05, 99: 0.1 / 90, 100: 0.0, 150: 0.0}
    for step, lr in expected.items():
        assert lr_at(d, step) == pytest.approx(lr, abs=1e-12), step
    drops = [lr_at(d, s) - lr_at(d, s + 1) for s in range(10, 99)]
    assert drops == pytest.approx([0.1 / 90] * 89, abs=1e-12)  # one slope, from warm-up end to the last step
    assert "linear decay to 0" in d.describe()
    none = derive(base_config(epochs=10, kind="linear"), 8, 2560)  # no warm-up: the peak at step 0
    assert (lr_at(none, 0), lr_at(none, 50)) == (pytest.approx(0.1), pytest.approx(0.05))


def test_lr_scales_with_global_batch_in_the_schedule():
    d = derive(base_config(epochs=2, kind="step", milestones=[1], gamma=0.5), world_size=4, num_train=4096)
    assert (d.global_batch, d.steps_per_epoch) == (128, 32)
    assert lr_at(d, 0) == pytest.approx(0.05) and lr_at(d, 32) == pytest.approx(0.025)
    with pytest.raises(ValueError):
        lr_at(d, -1)


# ---- MoPro switches -----------------------------------------------------------------------------

def test_mopro_switches_at_boundaries():
    cfg = base_config()  # paper: prototype loss from epoch 1, cleaning from epoch 11
    d = derive(cfg, 8, 2560)
    assert mopro_switches(d, 0) == (False, False)
    assert mopro_switches(d, 1) == (True, False)
    assert mopro_switches(d, 10) == (True, False)
    assert mopro_switches(d, 11) == (True, True)
    assert mopro_switches(d, 89) == (True, True)
    off = derive(replace(cfg, mopro=replace(cfg.mopro, enabled=False)), 8, 2560)
    assert mopro_switches(off, 50) == (False, False)


def test_mopro_schedule_in_fractions_and_momentum_per_image():
    """A 24-epoch run at global batch 1024 with the paper's schedule given as fractions (1/90, 11/90 of the
    epochs) and the momentum given for 256 images: prototype loss from round(24/90) = 0, cleaning from
    round(24 x 11/90) = 3, key momentum 0.999^4 per step (the same decay per image seen); the prototype
    momentum is per sample already and stays."""
    cfg = load_config(RN50_8, ["schedule.epochs=24", "schedule.milestones=[10, 20]", "loader.batch_size=128",
                               f"mopro.proto_start_fraction={1 / 90}", f"mopro.clean_start_fraction={11 / 90}",
                               "mopro.momentum_batch=256"])
    d = derive(cfg, world_size=8, num_train=1_000_000)
    assert (d.global_batch, d.proto_start_epoch, d.clean_start_epoch) == (1024, 0, 3)
    assert d.key_momentum == 0.999 ** 4 and d.proto_momentum == 0.999
    assert [mopro_switches(d, e) for e in (0, 2, 3)] == [(True, False), (True, False), (True, True)]
    assert "key-encoder momentum 0.996006 per step" in d.describe()
    same = derive(load_config(RN50_8, [f"mopro.proto_start_fraction={1 / 90}", f"mopro.clean_start_fraction={11 / 90}",
                                       "mopro.momentum_batch=256"]), world_size=8, num_train=2_400_000)
    assert (same.proto_start_epoch, same.clean_start_epoch, same.key_momentum) == (1, 11, 0.999)  # the paper's run
    small = derive(load_config(RN50_8, ["mopro.momentum_batch=256", "loader.batch_size=8"]), 8, 2_400_000)
    assert small.key_momentum == 0.999 ** 0.25  # a smaller batch: closer to 1 per step


def test_mopro_start_fractions_win_and_are_checked():
    # the fraction wins over the epoch, which is then not checked against the run's length
    cfg = load_config(RN50_8, ["schedule.epochs=30", "schedule.milestones=[10, 20]", "mopro.start_clean_epoch=50",
                               "mopro.clean_start_fraction=0.5", "mopro.proto_start_epoch=7",
                               "mopro.proto_start_fraction=0.05"])
    d = derive(cfg, 8, 2560)
    assert (d.proto_start_epoch, d.clean_start_epoch) == (2, 15)  # 0.05 x 30 = 1.5 -> 2; 0.5 x 30 = 15
    short = load_config(RN50_8, ["schedule.epochs=10", "schedule.milestones=[4, 8]", "mopro.proto_start_fraction=0.25",
                                 "mopro.clean_start_fraction=0.5"])
    assert derive(short, 8, 2560).proto_start_epoch == 3  # 2.5 rounds half up (Python's round would give 2)
    assert derive(load_config(RN50_8, ["mopro.clean_start_fraction=1"]), 8, 2560).clean_start_epoch == 90  # never
    assert derive(load_config(RN50_8, ["mopro.proto_start_fraction=0"]), 8, 2560).proto_start_epoch == 0
    assert error(RN50_8, ["schedule.epochs=30", "schedule.milestones=[10, 20]", "mopro.start_clean_epoch=50"]) == \
        "mopro.start_clean_epoch: 50 is beyond schedule.epochs (30)"
    assert error(RN50_8, ["mopro.clean_start_fraction=1.5"]) == "mopro.clean_start_fraction: must be in [0, 1], got 1.5"
    assert error(RN50_8, ["mopro.proto_start_fraction=-0.1"]).startswith("mopro.proto_start_fraction: must be in [0, 1]")
    assert error(RN50_8, ["mopro.momentum_batch=0"]) == "mopro.momentum_batch: must be >= 1, got 0"
    assert error(RN50_8, ["mopro.momentum_batch=2.5"]).startswith("mopro.momentum_batch: expected an integer")


# ---- resolution schedule ------------------------------------------------------------------------

def test_resolution_is_constant_by_default():
    loader = load_config(RN50_8, []).loader
    assert loader.min_resolution is None
    assert {resolution_at(loader, e) for e in range(0, 90)} == {224}
    for recipe in RECIPES:  # every recipe without progressive resizing keeps its constant crop size
        cfg = load_recipe(recipe)
        if cfg.loader.min_resolution is not None:  # rn50_fast_8gpu.yaml: tests/test_plan.py
            continue
        assert resolution_at(cfg.loader, 0) == resolution_at(cfg.loader, cfg.schedule.epochs - 1) == cfg.loader.resolution


def test_progressive_resolution_like_ffcv_imagenet():
    # ffcv-imagenet style: 160 -> 192 px over epochs 10..76, multiples of 32
    loader = LoaderConfig(resolution=192, min_resolution=160, ramp_start_epoch=10, ramp_end_epoch=76)
    sides = [resolution_at(loader, e) for e in range(90)]
    assert sides[0] == sides[10] == 160 and sides[76] == sides[89] == 192
    assert sides[42] == 160 and sides[43] == 192  # halfway (epoch 43) rounds up to the next multiple of 32
    assert all(a <= b for a, b in zip(sides, sides[1:]))
    assert set(sides) == {160, 192}


def test_progressive_resolution_rounding_and_bounds():
    loader = LoaderConfig(resolution=224, min_resolution=100, ramp_start_epoch=0, ramp_end_epoch=10, resolution_step=16)
    sides = [resolution_at(loader, e) for e in range(12)]
    assert sides[0] == 100 and sides[10] == sides[11] == 224
    assert all(s % 16 == 0 for s in sides[1:10]) and all(100 <= s <= 224 for s in sides)
    assert sides[5] == 160  # 100 + 0.5 * 124 = 162 -> 160
    assert all(a <= b for a, b in zip(sides, sides[1:]))
    odd = LoaderConfig(resolution=200, min_resolution=170, ramp_start_epoch=0, ramp_end_epoch=4, resolution_step=128)
    assert [resolution_at(odd, e) for e in range(5)] == [170, 170, 170, 200, 200]  # 128 and 256 clamped to [min, max]
    jump = LoaderConfig(resolution=128, min_resolution=64, ramp_start_epoch=3, ramp_end_epoch=4)
    assert [resolution_at(jump, e) for e in range(6)] == [64, 64, 64, 64, 128, 128]
    with pytest.raises(ValueError):
        resolution_at(loader, -1)


def test_progressive_resolution_from_a_recipe():
    cfg = load_config(DEMO, ["loader.min_resolution=32", "loader.ramp_start_epoch=2", "loader.ramp_end_epoch=20",
                             "loader.resolution_step=16"])
    assert [resolution_at(cfg.loader, e) for e in (0, 2, 11, 20, 39)] == [32, 32, 48, 64, 64]


def test_choices_are_literal_types():
    """A choice is expressed once, as a Literal type: no choices in field metadata."""
    import dataclasses
    from typing import Literal, get_origin, get_type_hints

    from mopro_fast.config import CrtRecipe

    for root in (Config, CrtRecipe):
        for section, cls in get_type_hints(root).items():
            for f in dataclasses.fields(cls):
                assert "choices" not in f.metadata, f"{section}.{f.name}"
    assert get_origin(get_type_hints(LoaderConfig)["backend"]) is Literal
    cfg = load_config(DEMO, [])  # a choice set in Python, not loaded, is checked too
    with pytest.raises(ConfigError, match=r"^loader.backend: 'pil' is not one of torch, dali, ffcv, nvjpeg$"):
        derive(replace(cfg, loader=replace(cfg.loader, backend="pil")), 1, 1200)


# ---- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_resolved_config_round_trips(recipe, tmp_path):
    cfg = load_recipe(recipe, ["optim.lr=0.2", "run.compile=true", "data.truth=t.tsv"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(saved, [])
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert set(cfg.to_dict()) == {"data", "model", "mopro", "optim", "schedule", "loader", "run"}
    assert cfg.to_dict()["optim"]["lr"] == 0.2


def unread_keys(skip: tuple[str, ...] = ()) -> list[str]:
    """Config keys that no code reads: not as `.section.key` in the package (the config package
    aside, where validation reads every key), nor in config/derive.py or config/schedules.py, which
    turn keys into derived values and schedules."""
    import dataclasses

    package = Path(__file__).resolve().parents[1] / "mopro_fast"
    config = package / "config"
    code = "\n".join(p.read_text() for p in package.rglob("*.py") if config not in p.parents and p.name not in skip)
    derived_code = "\n".join((config / name).read_text() for name in ("derive.py", "schedules.py"))
    cfg = load_config(DEMO, [])
    unread = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            if f".{section.name}.{f.name}" not in code and f".{f.name}" not in derived_code:
                unread.append(f"{section.name}.{f.name}")
    return unread


def test_every_recipe_key_is_read_by_the_code():
    """STYLE.md: a recipe key the code never reads, passed silently, is a flaw."""
    assert unread_keys() == []
    assert "loader.prefetch" in unread_keys(skip=("base.py",))  # the check can fail (loader_spec reads it)
