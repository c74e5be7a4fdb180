"""`mopro-fast plan`: a hand-computed schedule to the second, figures read from benchmark reports
of every shape (`bench step --json`, `bench all`, `bench res`), the paper recipe's and the fast
recipe's predicted times, and one line with exit 2 for every bad input. Run as a user runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mopro_fast.config import derive, load_config, resolution_at
from mopro_fast.plan import Figure, Figures
from tests.conftest import REPO, cli, one_line

RN50_8 = REPO / "recipes" / "rn50_8gpu.yaml"
FAST = REPO / "recipes" / "rn50_fast_8gpu.yaml"
WEBVISION_TRAIN, VAL = 2_439_574, 100_000  # WebVision 1.0 train; WebVision val + ImageNet val


def plan_json(*args) -> dict:
    result = cli("plan", *args, "--json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def by_kind(plan: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for phase in plan["phases"]:
        out.setdefault(phase["kind"], []).append(phase)
    return out


def step_result(res: int, img_s: float, arch: str = "resnet50", compiled: bool = False, batch: int = 256) -> dict:
    """A result shaped like `bench step --json` (mopro_fast/bench/step.py: run_step_bench)."""
    return {"bench": "step", "fast_img_s": img_s, "original_img_s": round(img_s / 3, 1), "ratio": 3.0,
            "fast_ms": round(batch / img_s * 1e3, 2), "original_ms": round(3 * batch / img_s * 1e3, 2),
            "settings": {"arch": arch, "res": res, "batch": batch, "classes": 1000, "precision": "bf16",
                         "channels_last": True, "compile": compiled, "small_stem": False, "rounds": 3, "warmup": 1,
                         "queue": 8192},
            "timings": {"fast": {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "spread": 0.0, "runs": 3}},
            "env": {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.x"}}


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return path


# ---- the time model, by hand ------------------------------------------------------------------------

SMALL = """# two resolutions, eval every 3 epochs, a save every 30 steps: the test's hand-computed case
data: {shards: s}
model: {arch: resnet18}
mopro: {start_clean_epoch: 2}
schedule: {epochs: 4, kind: cosine}
loader: {batch_size: 10, resolution: 64, min_resolution: 32, ramp_start_epoch: 1, ramp_end_epoch: 2,
         eval_resolution: 32, eval_resize: 36}
run: {out: o, eval_every: 3, ckpt_every_steps: 30}
"""


def test_two_phases_by_hand(tmp_path):
    recipe = write(tmp_path, "small.yaml", SMALL)
    plan = plan_json(recipe, "--gpus", 2, "--img-s-per-gpu", 100, "--scaling", 0.5, "--train-images", 1009,
                     "--val-images", 300, "--eval-factor", 2, "--ckpt-seconds", 3)
    # 2 GPUs x 10 = 20 per step, 1009 // 20 = 50 steps = 1000 images per epoch; epochs 0-1 at 32 px, 2-3 at 64 px.
    # 100 img/s per GPU at 64 px (the recipe's loader.resolution) -> 400 at 32 px; x 2 GPUs x 0.5.
    phases = by_kind(plan)
    low, high = phases["train"]
    assert (low["res"], low["count"], low["epochs"], low["images"], low["img_s"]) == (32, 2, [0, 1], 2000, 400)
    assert (high["res"], high["count"], high["epochs"], high["images"], high["img_s"]) == (64, 2, [2, 3], 2000, 100)
    assert low["seconds"] == pytest.approx(5) and high["seconds"] == pytest.approx(20)
    # evaluation after epochs 2 (every 3rd) and 3 (the last), 300 images at 32 px: 400 x 2 x 2 x 0.5 = 800 img/s
    (ev,) = phases["eval"]
    assert (ev["count"], ev["images"], ev["img_s"], ev["res"]) == (2, 600, 800, 32)
    assert ev["seconds"] == pytest.approx(0.75)
    # one save per epoch + steps 30 | 60, 90 | 120 | 180 (150 and 200 are epoch ends): 9 saves x 3 s
    (ck,) = phases["checkpoints"]
    assert (ck["count"], ck["seconds"]) == (9, 27)
    assert plan["total_seconds"] == pytest.approx(5 + 20 + 0.75 + 27, abs=0.05)

    table = cli("plan", recipe, "--gpus", 2, "--img-s-per-gpu", 100, "--scaling", 0.5, "--train-images", 1009,
                "--val-images", 300, "--eval-factor", 2, "--ckpt-seconds", 3)
    assert table.returncode == 0, table.stderr
    assert re.search(r"^total\s+53\s+0\.9$", table.stdout, re.M), table.stdout
    assert re.search(r"^train 32 px, epochs 0-1\s+2 epochs\s+2,000\s+400\s+5\s+0\.1$", table.stdout, re.M)


def test_nearest_figure_scaled_by_pixels():
    figures = Figures((Figure(160, 4000.0, "a"), Figure(224, 2000.0, "b")), "test")
    assert figures.at(160) == 4000 and figures.at(224) == 2000
    assert figures.at(128) == pytest.approx(4000 * (160 / 128) ** 2)
    assert figures.at(256) == pytest.approx(2000 * (224 / 256) ** 2)
    assert figures.nearest(192).res == 160  # a tie takes the smaller side (errs slow when scaled up)
    assert figures.at(200) == pytest.approx(2000 * (224 / 200) ** 2)


# ---- the recipes --------------------------------------------------------------------------------------

def expected_seconds(epochs_by_side: dict[int, int], per_gpu: dict[int, float], batch: int, gpus: int = 8,
                     eff: float = 0.9, eval_side: int = 224) -> float:
    per_epoch = WEBVISION_TRAIN // batch * batch
    epochs = sum(epochs_by_side.values())
    train = sum(n * per_epoch / (per_gpu[side] * gpus * eff) for side, n in epochs_by_side.items())
    return train + epochs * VAL / (3 * per_gpu[eval_side] * gpus * eff) + epochs * 10


def test_paper_recipe_at_3000_img_s():
    result = cli("plan", RN50_8, "--gpus", 8, "--img-s-per-gpu", 3000)
    assert result.returncode == 0, result.stderr
    train = 90 * (WEBVISION_TRAIN // 256 * 256) / (3000 * 8 * 0.9)
    assert 2.8 < train / 3600 < 2.85  # 90 epochs x 2.44 M images / 21,600 img/s
    expected = expected_seconds({224: 90}, {224: 3000}, 256)
    head = re.search(r"^plan: \S+rn50_8gpu.yaml on 8 GPUs: ([\d.]+) min \(([\d.]+) h\)$", result.stdout, re.M)
    assert head, result.stdout
    assert float(head[1]) == round(expected / 60, 1) and float(head[2]) == round(expected / 3600, 2)
    total = re.search(r"^total\s+([\d,]+)\s+([\d.]+)$", result.stdout, re.M)
    assert int(total[1].replace(",", "")) == round(expected)
    assert "2,439,574 (WebVision 1.0 train, the default)" in result.stdout


def test_fast_recipe_loads_and_fits_an_hour():
    cfg = load_config(FAST, [])  # strict keys: an unknown or misspelt key fails here
    sides = [resolution_at(cfg.loader, e) for e in range(cfg.schedule.epochs)]
    assert sides[0] == 160 and sides[-1] == 192 and set(sides) == {160, 192}
    assert (cfg.loader.eval_resolution, cfg.loader.eval_resize, cfg.model.arch) == (224, 256, "resnet50")
    d = derive(cfg, world_size=8, num_train=WEBVISION_TRAIN)
    assert (d.global_batch, d.lr, d.schedule) == (1024, 0.4, "linear")
    assert (d.proto_start_epoch, d.clean_start_epoch, round(d.key_momentum, 6)) == (0, 4, round(0.999 ** 4, 6))
    assert (cfg.optim.label_smoothing, cfg.optim.no_bn_weight_decay, cfg.model.blurpool) == (0.1, True, True)
    plan = plan_json(FAST, "--gpus", 8, "--img-s-per-gpu", 3000)
    assert plan["total_minutes"] <= 60
    n160, n192 = sides.count(160), sides.count(192)
    expected = expected_seconds({160: n160, 192: n192}, {160: 3000 * (192 / 160) ** 2, 192: 3000,
                                                         224: 3000 * (192 / 224) ** 2}, 1024)
    assert plan["total_seconds"] == pytest.approx(expected, abs=0.1)
    # the header's arithmetic is this plan's
    header = FAST.read_text()
    assert f"{n160} epochs x" in header and f"+ {n192} x" in header
    assert f"= {round(expected / 60)} min" in header


# ---- reports ------------------------------------------------------------------------------------------

def test_a_bench_step_json_is_read(tmp_path):
    report = write(tmp_path, "step.json", step_result(160, 4000.0))
    plan = plan_json(RN50_8, "--gpus", 1, "--img-s-per-gpu", report)
    (train,) = by_kind(plan)["train"]
    assert train["img_s"] == pytest.approx(4000 * (160 / 224) ** 2)  # one GPU: efficiency 1
    assert any("4,000.0 at 160 px (step.fast_img_s)" in a and str(report) in a for a in plan["assumptions"])


def test_the_res_report_of_device_check_is_read(tmp_path):
    """Shaped like `bench res` (mopro_fast/bench/sweep.py), which benchmarks/device_check.sh runs."""
    results = {f"step_{side}": step_result(side, img_s) for side, img_s in ((160, 4100.0), (192, 2900.0),
                                                                             (224, 2150.0))}
    results["loader_160"] = {"bench": "loader", "img_s": {"nvjpeg": 9000.0},
                             "settings": {"resolution": 160, "batch_size": 256}}
    report = write(tmp_path, "h200-res-2026-12-03.json", {
        "report": "mopro-fast bench res", "date": "2026-12-03", "device": "h200", "quick": False,
        "settings": {"step_sides": [160, 192, 224], "loader_sides": [160, 192]}, "env": {"gpu": "NVIDIA H200"},
        "results": results, "errors": {"loader_192": "RuntimeError: out of memory"}, "seconds": {"total": 100.0}})
    plan = plan_json(FAST, "--gpus", 8, "--img-s-per-gpu", report)
    phases = by_kind(plan)
    assert [(p["res"], p["img_s"]) for p in phases["train"]] == [(160, pytest.approx(4100 * 7.2)),
                                                                  (192, pytest.approx(2900 * 7.2))]
    assert phases["eval"][0]["img_s"] == pytest.approx(3 * 2150 * 7.2)  # measured at 224 px: no scaling
    assert any("batch 256 per GPU, bf16; the recipe trains resnet50 with batch 128" in a for a in plan["assumptions"])


def test_a_bench_all_report_prefers_the_step_of_the_recipes_compile_setting(tmp_path):
    e2e = {"bench": "e2e", "backend": "nvjpeg", "img_s": 1500.0, "data_wait": 0.1, "step_only_img_s": 2000.0,
           "settings": {"backend": "nvjpeg", "arch": "resnet50", "res": 224, "batch": 256, "small_stem": False,
                        "compile": False, "precision": "bf16"}}
    report = write(tmp_path, "h200.json", {
        "report": "mopro-fast bench all", "device": "h200", "settings": {"res": 224},
        "results": {"step": step_result(224, 2000.0), "step_compile": step_result(224, 2500.0, compiled=True),
                    "e2e_nvjpeg": e2e, "proto": {"bench": "proto", "ratio": 10.0}}, "errors": {}})

    def rate(*args) -> float:
        return by_kind(plan_json(RN50_8, *args, "--gpus", 1))["train"][0]["img_s"]

    assert rate("--img-s-per-gpu", report) == 2000
    assert rate("run.compile=true", "--img-s-per-gpu", report) == 2500
    assert rate("--img-s-per-gpu", write(tmp_path, "e2e.json", e2e)) == 1500  # a lone `bench e2e --json`


# ---- bad input: one line, exit 2 ----------------------------------------------------------------------

def bad_inputs(tmp_path: Path) -> list[tuple[list, list[str]]]:
    other_net = write(tmp_path, "r18.json", {"results": {"step": step_result(64, 100.0, arch="resnet18")}})
    return [
        (["--gpus", 8, "--img-s-per-gpu", 0], ["--img-s-per-gpu 0", "positive"]),
        (["--gpus", 8, "--img-s-per-gpu", "nan"], ["--img-s-per-gpu nan", "positive"]),
        (["--gpus", 8, "--img-s-per-gpu", tmp_path / "none.json"], ["neither a number", "report file"]),
        (["--gpus", 8, "--img-s-per-gpu", write(tmp_path, "bad.json", "{not json")], ["cannot read it as a JSON"]),
        (["--gpus", 8, "--img-s-per-gpu", write(tmp_path, "empty.json", {"report": "x"})], ["no benchmark results"]),
        (["--gpus", 8, "--img-s-per-gpu", write(tmp_path, "noval.json", {"results": {"step": {
            "bench": "step", "settings": {"arch": "resnet50", "res": 224}}}})], ["no usable throughput figure"]),
        (["--gpus", 8, "--img-s-per-gpu", other_net], ["no usable throughput figure", "resnet50",
                                                       "it has step: resnet18 at 64 px"]),
        (["--gpus", 0, "--img-s-per-gpu", 3000], ["--gpus 0: must be an integer >= 1"]),
        (["--gpus", "two", "--img-s-per-gpu", 3000], ["--gpus two: expected an integer"]),
        (["--gpus", 8, "--img-s-per-gpu", 3000, "--scaling", 1.5], ["--scaling 1.5: must be in (0, 1]"]),
        (["--gpus", 8, "--img-s-per-gpu", 3000, "--ckpt-seconds", -1], ["--ckpt-seconds -1.0: must be >= 0"]),
        (["--gpus", 8, "--img-s-per-gpu", 3000, "--train-images", 100], ["global batch 256", "100 training samples"]),
        (["loader.resolution=abc", "--gpus", 8, "--img-s-per-gpu", 3000], ["loader.resolution"]),
        (["data.eval_splits=[val,web-test]", "--gpus", 8, "--img-s-per-gpu", 3000], ["'web-test'", "--val-images"]),
    ]


def test_bad_input_is_one_line(tmp_path):
    for args, words in bad_inputs(tmp_path):
        one_line(cli("plan", RN50_8, *args, timeout=120), 2, *words, prefix="error: ")


def test_a_real_bench_res_report_feeds_plan(tmp_path):
    """`bench res --quick` on the CPU (seconds): its report holds a step result per side and a loader
    result, and `plan` reads its figures for a recipe of the same network."""
    out = tmp_path / "cpu-quick-res.json"
    result = cli("bench", "res", "--quick", "--device", "cpu", "--res", 32, "--res", 48, "--loader-res", 32,
                 "--backend", "torch", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["report"] == "mopro-fast bench res" and report["errors"] == {}
    assert set(report["results"]) == {"step_32", "step_48", "loader_32"}
    assert [report["results"][f"step_{s}"]["settings"]["res"] for s in (32, 48)] == [32, 48]
    plan = plan_json(REPO / "recipes" / "tiny_test.yaml", "data.shards=s", "run.out=o", "loader.resolution=48",
                     "loader.eval_resize=48", "loader.eval_resolution=48", "--gpus", 1, "--img-s-per-gpu", out,
                     "--train-images", 1000, "--val-images", 100)
    (train,) = by_kind(plan)["train"]
    assert train["img_s"] == report["results"]["step_48"]["fast_img_s"]
