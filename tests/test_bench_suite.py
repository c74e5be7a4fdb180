"""`bench all --quick` on the CPU: one valid JSON report with every benchmark, its markdown table,
`bench table` reproducing it, and the README's table generated from a committed report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mopro_fast.bench.table import render
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-all") / "report.json"
    result = run_cli("bench", "all", "--quick", "--device", "cpu", "--out", out, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| benchmark | baseline | mopro-fast | ratio |" in result.stdout
    return out


def test_bench_all_quick_writes_a_valid_report(quick_report: Path) -> None:
    from mopro_fast.bench.loader import available_backends

    report = json.loads(quick_report.read_text())
    assert report["report"] == "mopro-fast bench all" and report["quick"] is True and report["device"] == "cpu"
    assert report["errors"] == {}
    backends = available_backends()
    assert {"torch", "nvjpeg"} <= set(backends)
    expected = {"convert", "loader", "proto", "ema", "step", *(f"e2e_{b}" for b in backends)}
    assert set(report["results"]) == expected
    for name, entry in report["results"].items():
        assert entry["env"]["torch"] and entry["env"]["device"] == "cpu" and entry["settings"], name
    res = report["results"]
    assert set(res["loader"]["img_s"]) == set(backends) and min(res["loader"]["img_s"].values()) > 0
    assert res["loader"]["settings"]["resolution"] == res["step"]["settings"]["res"] == report["settings"]["res"]
    for name in ("proto", "ema", "step"):
        assert res[name]["ratio"] > 0
    for b in backends:
        e2e = res[f"e2e_{b}"]
        assert e2e["img_s"] > 0 and 0 <= e2e["data_wait"] < 1 and e2e["step_only_img_s"] > 0
        for key in ("arch", "batch", "res"):
            assert e2e["settings"][key] == report["settings"][key], key
    md = quick_report.with_suffix(".md").read_text()
    table = run_cli("bench", "table", quick_report, cwd=REPO)
    assert table.returncode == 0 and table.stdout == md
    assert len(re.findall(r"^\| ", md, flags=re.MULTILINE)) == 1 + len(rows_expected(report))


def rows_expected(report: dict) -> list[str]:
    loader = [b for b in report["results"]["loader"]["img_s"] if b != "torch"]
    e2e = [k for k in report["results"] if k.startswith("e2e_")]
    return ["convert", *loader, "proto", "ema", "step", *e2e]


def test_bench_table_rejects_other_json(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"bench": "loader"}))
    result = run_cli("bench", "table", bad, cwd=REPO)
    assert result.returncode == 1 and "not a `mopro-fast bench all` report" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_table_is_generated_from_a_committed_report() -> None:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!--bench-table (\S+)-->\n(.*?)\n<!--/bench-table-->", readme, flags=re.DOTALL)
    assert match, "README.md has no <!--bench-table REPORT--> block"
    path = REPO / match.group(1)
    assert path.is_file(), f"the README's table cites {match.group(1)}, which is not committed"
    assert match.group(2) == render(json.loads(path.read_text()), match.group(1)), \
        f"README table differs from `mopro-fast bench table {match.group(1)}`: regenerate it with --readme README.md"


def test_readme_noise_table_is_generated_from_the_committed_report():
    import re

    from mopro_fast.bench.noise import markdown

    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!--noise-table (\S+)-->\n(.*?)\n<!--/noise-table-->", readme, re.S)
    assert match, "README.md has no <!--noise-table REPORT--> block"
    path = REPO / match.group(1)
    assert path.is_file(), f"the README's noise table cites {match.group(1)}, which is not committed"
    assert (REPO / match.group(1).replace(".json", ".png")).is_file()
    assert match.group(2).strip() == markdown(json.loads(path.read_text())).strip(), \
        f"README noise table differs from `mopro-fast bench noise --table {match.group(1)}`"


def test_readme_loader_table_is_generated_from_the_committed_report() -> None:
    from mopro_fast.bench.table import is_loader_report, render_loader

    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!--loader-table (\S+)-->\n(.*?)\n<!--/loader-table-->", readme, flags=re.DOTALL)
    assert match, "README.md has no <!--loader-table REPORT--> block"
    report = json.loads((REPO / match.group(1)).read_text())
    assert is_loader_report(report) and report["settings"]["resolutions"] == [224, 160, 112]
    assert match.group(2) == render_loader(report, match.group(1)), \
        f"README loader table differs from `mopro-fast bench table {match.group(1)}`: regenerate with --readme"
