"""Every benchmark runs at tiny sizes and prints a valid JSON report comparing fast and baseline."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("args, keys", [
    (["convert", "--quick"], ["naive_img_s", "fast_1_worker_img_s", "fast_all_workers_img_s", "ratio_all_workers"]),
    (["proto", "--batch", "256", "--classes", "50", "--rounds", "2", "--warmup", "1"],
     ["loop_ms", "fused_ms", "ratio", "max_abs_err"]),
    (["ema", "--arch", "resnet18", "--rounds", "2", "--warmup", "1"], ["loop_ms", "fused_ms", "ratio", "max_abs_err"]),
    (["step", "--arch", "resnet18", "--res", "16", "--batch", "8", "--classes", "10", "--small-stem", "--rounds", "1",
      "--warmup", "0"], ["fast_img_s", "original_img_s", "ratio"]),
])
def test_bench_prints_json_with_ratio(args: list[str], keys: list[str]) -> None:
    result = run_cli("bench", *args, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for key in keys:
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    if "max_abs_err" in report:
        assert report["max_abs_err"] < 1e-4


def test_kit_times_paths_in_interleaved_rounds() -> None:
    from mopro_fast.bench.kit import interleaved

    calls: list[str] = []
    first, second = interleaved([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", rounds=2, warmup=1,
                                per_round=[1, 2], setup=lambda: calls.append("-"))
    assert calls == ["-", "a", "-", "b", "-", "b"] * 3  # warm-up round first, then alternating rounds
    assert len(first.times_ms) == 2 and len(second.times_ms) == 4
    assert first.median_ms > 0 and first.spread >= 0 and set(first.summary()) >= {"median_ms", "spread", "runs"}


def test_bench_arch_choices_are_the_model_archs() -> None:
    from mopro_fast.bench.kit import ArchChoice
    from mopro_fast.core.model import ARCHS

    assert ArchChoice().choices == ARCHS


def test_bench_step_builds_and_steps_with_the_trainer_functions(monkeypatch) -> None:
    """Both paths of `bench step` come from `train.build_model` and run `train.train_step`."""
    from mopro_fast.training import train
    from mopro_fast.bench.step import run_step_bench

    built, stepped = [], []
    real_build, real_step = train.build_model, train.train_step

    def build_model(cfg, *args, **kwargs):
        built.append((cfg.run.precision, cfg.run.channels_last, cfg.optim.impl))
        return real_build(cfg, *args, **kwargs)

    def train_step(*args, **kwargs):
        stepped.append(args[5])  # the GradScaler
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "build_model", build_model)
    monkeypatch.setattr(train, "train_step", train_step)
    result = run_step_bench("resnet18", 16, 4, 10, "cpu", "fp32", False, True, rounds=1, warmup=0)
    assert built == [("fp32", True, "auto"), ("fp32", False, "for_loop")]
    assert len(stepped) == 2 and all(hasattr(s, "scale") for s in stepped)
    assert result["fast_img_s"] > 0 and result["original_img_s"] > 0 and result["timings"]["fast"]["runs"] == 1
