"""`mopro-fast bench noise`: the schedule rule, the verdict, and a real (quick) matrix end to end."""

from __future__ import annotations

import json
import time

from mopro_fast import RECIPES
from mopro_fast.bench.noise import FULL, Cell, schedule_overrides, summarize_cell, verdict
from tests.conftest import one_line, run_cli

SMALL = RECIPES / "small_data_cpu.yaml"


def test_matrix_covers_the_issue():
    assert len(FULL) == 24 and len({c.name for c in FULL}) == 24
    assert {(c.kind, c.rate, c.ood, c.size) for c in FULL} == {
        (k, r, o, s) for k in ("symmetric", "pair", "mix") for r in (0.2, 0.4) for o in (0.0, 0.1) for s in (600, 1600)}
    spec = Cell("mix", 0.4, 0.1, 1600).spec(seed=2)
    assert (spec.train_per_class, spec.pair, spec.noise, spec.ood, spec.seed, spec.hue_coded) == (160, 0.5, 0.4, 0.1, 2, False)


def test_schedule_keeps_steps_and_fractions():
    # The recipe: 48 epochs for 600 images, prototypes from epoch 4, cleaning from 16, 1 warm-up epoch.
    assert schedule_overrides(SMALL, 600, 600, []) == [
        "schedule.epochs=48", "mopro.proto_start_epoch=4", "mopro.start_clean_epoch=16", "schedule.warmup_epochs=1"]
    assert schedule_overrides(SMALL, 1600, 600, []) == [  # 18 x 25 steps ~ 48 x 9; the switches at 1/12 and 1/3
        "schedule.epochs=18", "mopro.proto_start_epoch=2", "mopro.start_clean_epoch=6", "schedule.warmup_epochs=0.375"]
    step = schedule_overrides(SMALL, 1200, 600, ["schedule.kind=step", "schedule.milestones=[24,40]"])
    assert step[0] == "schedule.epochs=24" and step[-1] == "schedule.milestones=[12,20]"
    # --size-rule epochs: the recipe's own 48 epochs and switches at every size.
    assert schedule_overrides(SMALL, 1600, 600, [], "epochs") == schedule_overrides(SMALL, 600, 600, [])


def test_verdict_reads_the_bar_from_cell_medians():
    def cell(name_kind: str, rate: float, mopro: list[float], ce: list[float], f1: list[float]) -> dict:
        runs = {s: {"mopro": {"val_top1": m, "precision": 1.0, "recall": 1.0, "f1": f}, "ce": {"val_top1": c}}
                for s, (m, c, f) in enumerate(zip(mopro, ce, f1))}
        return summarize_cell(Cell(name_kind, rate, 0.0, 600), runs)

    good = [cell("pair", 0.4, [60, 70, 65], [50, 60, 62], [0.8, 0.7, 0.75]), cell("symmetric", 0.2, [80, 81, 82], [79, 82, 80], [0.5, 0.5, 0.5])]
    assert good[0]["diff"] == {"median": 10.0, "min": 3.0, "max": 10.0, "values": [10.0, 10.0, 3.0]}
    v = verdict(good)
    assert (v["median_diff"], v["worst_diff"], v["min_f1_at_40"]) == (5.5, 1.0, 0.75)
    assert v["bar"] == {"median_diff_ge_3": True, "no_cell_below_minus_1": True, "f1_ge_0.7_at_40": True}
    bad = verdict([good[0], cell("mix", 0.4, [50, 50, 50], [52, 53, 50], [0.6, 0.6, 0.6])])
    assert bad["worst_cell"] == "mix-n40-ood0-600" and bad["worst_diff"] == -2.0
    assert bad["bar"]["no_cell_below_minus_1"] is False and bad["bar"]["f1_ge_0.7_at_40"] is False


def test_quick_matrix_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "noise"
    start = time.perf_counter()
    first = run_cli("bench", "noise", "--quick", "--out", str(out), "--json")
    took = time.perf_counter() - start
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads(first.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["cells"]] == ["pair-n40-ood10-200", "symmetric-n20-ood0-200"]
    for c in report["cells"]:
        assert 0 <= c["mopro_top1"]["median"] <= 100 and 0 <= c["ce_top1"]["median"] <= 100
        assert c["diff"]["median"] == round(c["mopro_top1"]["median"] - c["ce_top1"]["median"], 2)
        assert 0 <= c["f1"]["median"] <= 1 and 0 <= c["precision"]["median"] <= 1
    assert set(report["summary"]["bar"]) == {"median_diff_ge_3", "no_cell_below_minus_1", "f1_ge_0.7_at_40"}
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == [f"{c}-s0-{m}" for c in ("pair-n40-ood10-200", "symmetric-n20-ood0-200") for m in ("ce", "mopro")]
    assert (out / "runs" / "pair-n40-ood10-200-s0-mopro" / "clean" / "summary.json").is_file()
    # The same command again reuses every finished run (bench.json matches): same figures, a fraction of the time.
    start = time.perf_counter()
    again = run_cli("bench", "noise", "--quick", "--out", str(out), "--json")
    assert again.returncode == 0 and time.perf_counter() - start < took / 2
    assert json.loads(again.stdout)["cells"] == report["cells"]
    # An ablation of a mopro.* key: new MoPro runs under its tag, the cross-entropy runs reused untouched.
    ce_stamp = out / "runs" / "pair-n40-ood10-200-s0-ce" / "bench.json"
    before = ce_stamp.stat().st_mtime_ns
    ablation = run_cli("bench", "noise", "--quick", "--out", str(out), "--tag", "inst1", "--set", "mopro.w_inst=1",
                       "--json")
    assert ablation.returncode == 0, ablation.stderr[-2000:]
    varied = json.loads(ablation.stdout)
    assert varied["settings"]["tag"] == "inst1" and (out / "report-inst1.json").is_file()
    assert (out / "heatmap-inst1.png").is_file() and ce_stamp.stat().st_mtime_ns == before
    assert [c["ce_top1"] for c in varied["cells"]] == [c["ce_top1"] for c in report["cells"]]
    assert (out / "runs" / "pair-n40-ood10-200-s0-mopro-inst1" / "bench.json").is_file()
    table = run_cli("bench", "noise", "--table", str(out / "report.json"))
    rows = [line for line in table.stdout.splitlines() if line.startswith("| pair") or line.startswith("| symmetric")]
    assert table.returncode == 0 and len(rows) == 2 and f"**{report['cells'][0]['diff']['median']:+.1f}**" in rows[0]


def test_unknown_cell_is_one_line(tmp_path):
    result = run_cli("bench", "noise", "--cells", "pair-n50-ood0-600", "--out", str(tmp_path / "x"))
    one_line(result, 2, "unknown cell pair-n50-ood0-600", "--cells")
    assert not (tmp_path / "x").exists()
    bad = run_cli("bench", "noise", "--quick", "--set", "optim.lrr=1", "--out", str(tmp_path / "y"))
    one_line(bad, 2, "optim.lrr: unknown key", "did you mean optim.lr?")
    assert not (tmp_path / "y").exists()  # refused before anything is written
