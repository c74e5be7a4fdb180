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
