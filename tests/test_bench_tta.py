"""`mopro-fast bench tta`: the paper-style schedule, times to target, and a quick run end to end."""

from __future__ import annotations

import json

from mopro_fast.bench.tta import compare, paper_style, time_to
from mopro_fast.config import derive, load_config
from mopro_fast import RECIPES
from tests.conftest import run_cli


def test_paper_style_schedule_shape():
    overrides = paper_style(90)
    assert overrides == ["schedule.epochs=90", "schedule.kind=step", "schedule.milestones=[40,80]", "schedule.gamma=0.1",
                         "loader.min_resolution=null", "mopro.proto_start_epoch=1", "mopro.start_clean_epoch=11"]
    cfg = load_config(RECIPES / "rn50_8gpu.yaml", overrides)  # = the paper recipe's own schedule
    paper = load_config(RECIPES / "rn50_8gpu.yaml", [])
    assert (cfg.schedule, cfg.mopro, cfg.loader) == (paper.schedule, paper.mopro, paper.loader)
    small = load_config(RECIPES / "small_data_cpu.yaml", paper_style(48))
    d = derive(small, 1, 600)
    assert small.schedule.milestones == [21, 43] and (d.proto_start_epoch, d.clean_start_epoch) == (1, 6)


def test_time_to_target_and_ratio():
    paper = {"val_top1": [10, 50, 80, 90], "train_seconds": [10, 20, 30, 40]}
    fast = {"val_top1": [20, 88, 89], "train_seconds": [4, 8, 12]}
    assert time_to(paper, 87.3) == 40 and time_to(fast, 87.3) == 8 and time_to(fast, 95) is None
    out = compare({0: {"paper": paper, "fast": fast}}, 0.97)
    seed = out["per_seed"][0]
    assert (seed["target"], seed["paper_seconds"], seed["fast_seconds"], seed["ratio"]) == (87.3, 40, 8, 0.2)
    assert out["final_gap"]["median"] == -1 and out["fast_reached"] == 1


def test_quick_tta_end_to_end(tmp_path):
    out = tmp_path / "tta"
    result = run_cli("bench", "tta", "--quick", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    runs = report["runs"]["0"]
    assert len(runs["paper"]["val_top1"]) == 4 and len(runs["fast"]["val_top1"]) == 2  # every epoch evaluated
    for run in runs.values():
        assert run["train_seconds"] == sorted(run["train_seconds"]) and run["train_seconds"][0] > 0
        assert run["images"] == sorted(run["images"]) and run["pixels"][-1] > 0
    # The fast run ramps 24 -> 32 px: fewer pixels per image than the paper-style run's constant 32 px.
    fast, paper = runs["fast"], runs["paper"]
    assert fast["pixels"][0] == fast["images"][0] * 24 * 24 and paper["pixels"][0] == paper["images"][0] * 32 * 32
    assert report["summary"]["per_seed"][0]["target"] == round(0.97 * paper["val_top1"][-1], 2)
    assert (out / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
