"""`mopro-fast bench table REPORT.json`: the markdown table of a `bench all` report, or of a
`bench loader --baseline original` report.

The README's performance tables are this command's output for committed reports, pasted between
`<!--bench-table REPORT-->` and `<!--/bench-table-->` (a `bench all` report) or
`<!--loader-table REPORT-->` and `<!--/loader-table-->` (a loader report against the original)
(`--readme README.md` does the pasting, and tests check the README still equals the output), so
no figure in them is typed by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

_BLOCK = re.compile(r"<!--bench-table (?P<path>\S+)-->\n.*?<!--/bench-table-->", re.DOTALL)
_LOADER_BLOCK = re.compile(r"<!--loader-table (?P<path>\S+)-->\n.*?<!--/loader-table-->", re.DOTALL)


def _num(x: float, unit: str = "") -> str:
    if x >= 100:
        text = f"{x:,.0f}"
    elif x >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.3g}"
    return f"{text}{unit}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _device_line(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    device = env.get("gpu") or f"CPU ({env.get('cpus', '?')} cores)"
    parts = [f"**{device}**", report.get("date", "?"), f"torch {env.get('torch', '?')}",
             f"torchvision {env.get('torchvision', '?')}"]
    if env.get("dali"):
        parts.append(f"DALI {env['dali']}")
    if report.get("quick"):
        parts.append("`--quick` settings (tiny: a smoke test, not a measurement)")
    return " · ".join(parts)


def _fused_row(r: dict[str, Any], what: str, loop: str) -> tuple[str, str, str, str]:
    """The row of a fused update (`bench proto`, `bench ema`) against its loop."""
    return (what, f"{_num(r['loop_ms'], ' ms')} ({loop})",
            f"{_num(r['fused_ms'], ' ms')} (max abs err {r['max_abs_err']:.0e})", _ratio(r["ratio"]))


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, baseline, mopro-fast, ratio) per measured quantity, in the suite's order."""
    res, out = report.get("results", {}), []
    s = report.get("settings", {})
    if "convert" in res:
        r = res["convert"]
        cs = r["settings"]
        out.append((f"conversion, {r['images']} images of the built-in data at ~{cs['image_size']} px",
                    f"{_num(r['naive_img_s'])} img/s (one process, PIL, a file at a time)",
                    f"{_num(r['fast_1_worker_img_s'])} img/s at 1 worker, {_num(r['fast_all_workers_img_s'])} "
                    f"at {_plural(r['workers'], 'worker')}",
                    f"{_ratio(r['ratio_1_worker'])} / {_ratio(r['ratio_all_workers'])}"))
    if "loader" in res:
        r = res["loader"]
        ls = r["settings"]
        what = (f"two-view loader `{{}}`, {ls['resolution']} px, batch {ls['batch_size']}, "
                f"{_plural(ls['workers'], 'worker')}, on {ls['device']}, {ls['samples']} images stored at ~{s.get('max_side', '?')} px")
        base = r["img_s"].get("torch")
        for backend, rate in r["img_s"].items():
            if backend == "torch":
                continue
            out.append((what.format(backend), f"{_num(base)} img/s (`torch`: workers decode + transform)" if base
                        else "-", f"{_num(rate)} img/s", _ratio(rate / base) if base else "-"))
        if list(r["img_s"]) == ["torch"]:
            out.append((what.format("torch"), f"{_num(base)} img/s", "-", "-"))
    if "proto" in res:
        ps = res["proto"]["settings"]
        out.append(_fused_row(res["proto"], f"prototype update, {ps['batch']} gathered samples, K {ps['classes']}, "
                                            f"d {ps['dim']}", "per-sample loop"))
    if "ema" in res:
        es = res["ema"]["settings"]
        out.append(_fused_row(res["ema"], f"momentum encoder EMA, {es['arch']} + heads "
                                          f"({es['parameters'] / 1e6:.0f} M parameters)", "per-parameter loop"))
    for key in ("step", "step_compile"):
        if key in res:
            r = res[key]
            ss = r["settings"]
            tricks = [ss["precision"], "channels-last" if ss["channels_last"] else "NCHW", "fused updates"]
            if ss["compile"]:
                tricks.append("`torch.compile`")
            out.append((f"full MoPro step, {ss['arch']}{' small stem' if ss['small_stem'] else ''}, {ss['res']} px, "
                        f"batch {ss['batch']}, synthetic data",
                        f"{_num(r['original_img_s'])} img/s (original style: fp32, NCHW, loops)",
                        f"{_num(r['fast_img_s'])} img/s ({', '.join(tricks)})", _ratio(r["ratio"])))
    for key, r in res.items():
        if key.startswith("e2e_"):
            es = r["settings"]
            out.append((f"end to end from shards, `{r['backend']}` loader, {es['arch']}, {es['res']} px, "
                        f"batch {es['batch']}, {es['precision']}",
                        f"{_num(r['step_only_img_s'])} img/s (same step, batch already on the device)",
                        f"{_num(r['img_s'])} img/s, data wait {100 * r['data_wait']:.1f} %",
                        _ratio(r["img_s"] / r["step_only_img_s"])))
    for name, error in report.get("errors", {}).items():
        out.append((f"{name}: failed", error.replace("|", "/"), "-", "-"))
    return out


def render(report: dict[str, Any], path: str | None = None) -> str:
    """The device line and the markdown table of a `bench all` report."""
    lines = [_device_line(report) + (f" · report `{path}`" if path else ""), "",
             "| benchmark | baseline | mopro-fast | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(report)]
    return "\n".join(lines)


def is_loader_report(report: dict[str, Any]) -> bool:
    """A `bench loader --baseline original` report (original / backends / decode-only per size)."""
    return report.get("bench") == "loader" and report.get("settings", {}).get("baseline") == "original"


def render_loader(report: dict[str, Any], path: str | None = None) -> str:
    """Per crop size: the original's PIL path, every backend (images/s and ratio to the original),
    and the decode-only ceiling, from a `bench loader --baseline original` report."""
    s, env = report["settings"], report.get("env", {})
    by_res = report.get("by_res") or {str(s["resolution"]): report}
    backends = [b for b in s["backends"] if b in report["img_s"]]
    head = (f"**CPU ({env.get('cpus', '?')} cores)** · {report.get('date', '?')} · torch {env.get('torch', '?')} · "
            f"{s['samples']} crops of real photos ({', '.join(s.get('photos', [])) or 'built-in drawings'}) stored at "
            f"{s['max_side']} px (shorter side) · batch {s['batch_size']} · {s['workers']} workers · median of "
            f"{s['windows']} windows" + (f" · report `{path}`" if path else ""))
    rounds = s.get("rounds", 1)
    if rounds > 1:
        head += f" · median of {rounds} rounds (the ratio's range over the rounds after it)"
    lines = [head, "", "| crop | original (PIL + torchvision) | " + " | ".join(f"`{b}`" for b in backends)
             + " | decode only (ceiling) |", "|---" * (len(backends) + 3) + "|"]
    for res, entry in by_res.items():
        img = entry["img_s"]
        spread = entry.get("rounds_vs_original", {})
        cells = [f"{_num(img[b])} img/s ({_ratio(entry['vs_original'][b])}"
                 + (f"; {_ratio(min(spread[b]))}-{_ratio(max(spread[b]))}" if b in spread else "") + ")"
                 for b in backends]
        lines.append(f"| {res} px | {_num(img['original'])} img/s (1x) | " + " | ".join(cells)
                     + f" | {_num(img['decode-only'])} img/s |")
    return "\n".join(lines)


def load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot read the report {path}: {exc}") from None
    if not isinstance(report, dict) or (report.get("report") != "mopro-fast bench all"
                                        and not is_loader_report(report)):
        raise click.ClickException(f"{path} is not a `mopro-fast bench all` report nor a "
                                   f"`bench loader --baseline original` one")
    return report


def readme_block(report_path: str, table: str, kind: str = "bench") -> str:
    return f"<!--{kind}-table {report_path}-->\n{table}\n<!--/{kind}-table-->"


@click.command("table")
@click.argument("report", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--readme", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also replace the <!--bench-table ...--> block of this markdown file with the table.")
def table_command(report: Path, readme: Path | None) -> None:
    """Print the markdown table of a `bench all` or `bench loader --baseline original` REPORT (JSON);
    optionally paste it into a README's block of that kind."""
    data = load_report(report)
    kind, block = ("loader", _LOADER_BLOCK) if is_loader_report(data) else ("bench", _BLOCK)
    table = (render_loader if kind == "loader" else render)(data, str(report))
    click.echo(table)
    if readme is not None:
        text = readme.read_text()
        if not block.search(text):
            raise click.ClickException(f"{readme} has no <!--{kind}-table PATH--> ... <!--/{kind}-table--> block")
        readme.write_text(block.sub(lambda _: readme_block(str(report), table, kind), text, count=1))
        click.echo(f"updated the {kind} table in {readme}", err=True)
