"""`mopro-fast report RUN`: one self-contained HTML page about a run and what it decided about the data.

From the run folder: the training curves (RUN/loss.png, accuracy.png, noise.png, redrawn from
metrics.jsonl when missing), the relabelled / OOD fractions per epoch (the training log's batch
averages), the final evaluation, and, from a clean output (RUN/clean, see mopro_fast/after/clean.py;
`report` runs clean itself when there is none and the shards are at hand): counts per class and
galleries of the training images it relabelled (web label -> new label), dropped as OOD, and the
most confident clean ones. A cRT summary (RUN/crt) adds a before/after table. Every image is
embedded as a base64 data URI, so the page is one file that opens anywhere. The extra plots are
also written as PNG files next to it: RUN/report/{report.html, noise_epochs.png, class_counts.png}.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from mopro_fast.errors import MoproError
from mopro_fast.training.observe import plot_run
from mopro_fast.safe_io import output_dir
from mopro_fast.after.trained import write_outputs

THUMB = 96  # px, longer side of a gallery thumbnail


class ReportError(MoproError, ValueError):
    """The run folder cannot be reported on; one line."""


def _data_uri(png_or_jpeg: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png_or_jpeg).decode()}"


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def noise_by_epoch(records: list[dict]) -> list[tuple[int, float, float]]:
    """(epoch, mean fraction relabelled, mean fraction OOD) over each epoch's training log records."""
    by_epoch: dict[int, list[dict]] = {}
    for r in records:
        if r["kind"] == "train" and isinstance(r.get("frac_relabelled"), (int, float)):
            by_epoch.setdefault(r["epoch"], []).append(r)
    return [(e, sum(r["frac_relabelled"] for r in rs) / len(rs), sum(r["frac_ood"] for r in rs) / len(rs))
            for e, rs in sorted(by_epoch.items())]


def plot_noise_epochs(rows: list[tuple[int, float, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    if rows:
        epochs, relabelled, ood = zip(*rows)
        ax.plot(epochs, relabelled, marker="o", label="relabelled")
        ax.plot(epochs, ood, marker="s", label="dropped as OOD")
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of the batch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def plot_class_counts(per_class: dict[str, list[int]], names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(per_class["web"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * k), 3.6), dpi=100)
    x = range(k)
    kept, away, ood = per_class["kept"], per_class["relabelled_away"], per_class["ood"]
    ax.bar(x, kept, label="web label kept", color="#4c72b0")
    ax.bar(x, away, bottom=kept, label="relabelled away", color="#dd8452")
    ax.bar(x, ood, bottom=[a + b for a, b in zip(kept, away)], label="dropped as OOD", color="#c44e52")
    ax.plot(x, per_class["final"], "k_", markersize=14, mew=2, label="after cleaning")
    ax.set_xticks(list(x))
    ax.set_xticklabels([n[:14] for n in names[:k]], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("training samples")
    ax.legend(fontsize=7)
    return _figure_png(fig)


def thumbnail(jpeg: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _round_robin(records: list[dict], key: str, n: int) -> list[dict]:
    """Up to n records, taking the best remaining one of each class in turn (records come best
    first), so a gallery shows every class instead of the one the model is surest about."""
    by_class: dict = {}
    for r in records:
        by_class.setdefault(r[key], []).append(r)
    queues, out = list(by_class.values()), []
    while len(out) < n and queues:
        out += [q.pop(0) for q in queues][: n - len(out)]
        queues = [q for q in queues if q]
    return out


def pick_galleries(records: list[dict], n: int) -> dict[str, list[dict]]:
    """The samples shown, classes taken in turn: relabelled (most confident first, by new label),
    OOD (least support for the web label first, by web label), and the most confident kept ones
    (both scores of their label high)."""
    relabelled = sorted((r for r in records if r["status"] == "relabelled"),
                        key=lambda r: -(r["score_cls"] + r["score_proto"]))
    ood = sorted((r for r in records if r["status"] == "ood"), key=lambda r: r["soft_web"])
    clean = sorted((r for r in records if r["status"] == "kept"), key=lambda r: -min(r["score_cls"], r["score_proto"]))
    return {"relabelled": _round_robin(relabelled, "label", n), "ood": _round_robin(ood, "web_label", n),
            "clean": _round_robin(clean, "label", n)}


def _name(names: list[str], c) -> str:
    return names[c] if isinstance(c, int) and 0 <= c < len(names) else str(c)


def _gallery_html(kind: str, items: list[dict], catalog, names: list[str]) -> str:
    cells = []
    for r in items:
        uri = _data_uri(thumbnail(catalog.jpeg(r["index"])), "image/jpeg")
        web = html.escape(_name(names, r["web_label"]))
        if kind == "relabelled":
            caption = f"{web} &rarr; <b>{html.escape(_name(names, r['label']))}</b>"
        elif kind == "ood":
            caption = f"{web} &rarr; <b>OOD</b>"
        else:
            caption = f"<b>{web}</b>"
        caption += f"<br>cls {r['score_cls']:.2f} · proto {r['score_proto']:.2f}"
        if "truth" in r:
            right = (r["truth"] == "ood") if kind == "ood" else (r["truth"] == r["label"])
            caption += f"<br><span class='{'ok' if right else 'bad'}'>truth: {html.escape(_name(names, r['truth']))}</span>"
        cells.append(f"<figure><img src='{uri}' alt='{html.escape(r['key'])}' title='{html.escape(r['path'])}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    return "<div class='gallery'>" + ("".join(cells) or "<p>none</p>") + "</div>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = """body{font-family:sans-serif;margin:24px;max-width:1150px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.plots img{max-width:560px;margin:4px}.gallery{display:flex;flex-wrap:wrap}
figure{margin:4px;width:118px;font-size:11px;text-align:center;overflow-wrap:anywhere}figure img{width:96px;height:96px;object-fit:contain;
background:#eee}.ok{color:#1a7f37}.bad{color:#c62828}.note{color:#555;font-size:13px}"""


def build_report(run: Path, clean_dir: Path | None = None, gallery: int = 24, run_clean: bool = True,
                 progress: bool = True) -> Path:
    """Write RUN/report/report.html (+ PNG plots); returns the HTML path.

    Writes only into RUN/report, and into RUN/clean when it runs clean itself (no `clean_dir`
    given, none there yet). A `clean_dir` given is only read: it must hold a clean output.
    """
    run = Path(run)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run}: no metrics.jsonl; is this a run folder (run.out of `mopro-fast train`)?")
    records = _read_json(metrics, lines=True)
    summary = _read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    if clean_dir is not None and not (Path(clean_dir) / "labels.jsonl").is_file():
        raise ReportError(f"--clean {clean_dir} holds no clean output (labels.jsonl); run `mopro-fast clean CKPT "
                          f"--out {clean_dir}` first, or leave --clean out to use {run / 'clean'}")
    out = output_dir(run / "report", "report folder")
    clean_dir = Path(clean_dir) if clean_dir is not None else run / "clean"
    clean_note = ""
    if not (clean_dir / "labels.jsonl").is_file() and run_clean:
        clean_note = _run_clean(run, clean_dir, progress)
    pngs = {"noise_epochs.png": plot_noise_epochs(noise_by_epoch(records))}
    parts = [f"<h1>mopro-fast run report: {html.escape(str(run))}</h1>"]
    evals = summary.get("eval") or {}
    if evals:
        parts.append("<h2>Final evaluation</h2>" + _table(["split", "top-1 %", "top-5 %", "images"], [
            [s, f"{r['top1']:.2f}", f"{r['top5']:.2f}", r.get("samples", "")] for s, r in evals.items()]))
    parts.append("<h2>Training curves</h2><div class='plots'>"
                 + "".join(f"<img src='{_data_uri(png)}' alt='{name}'>" for name, png in _curves(run).items())
                 + f"<img src='{_data_uri(pngs['noise_epochs.png'])}' alt='noise_epochs.png'></div>"
                 "<p class='note'>Relabelled / OOD fractions: batch averages of the training log per epoch "
                 "(zero before mopro.start_clean_epoch).</p>")
    if (clean_dir / "labels.jsonl").is_file():
        parts += _clean_sections(clean_dir, pngs, gallery)
    else:
        parts.append(f"<h2>Noise cleaning</h2><p class='note'>No clean output at {html.escape(str(clean_dir))}"
                     f"{html.escape(clean_note)}; run <code>mopro-fast clean CKPT</code>.</p>")
    crt = run / "crt" / "summary.json"
    if crt.is_file():
        c = _read_json(crt)
        parts.append("<h2>Classifier re-training (cRT)</h2>" + _table(
            ["split", "top-1 before", "top-1 after", "top-5 before", "top-5 after"],
            [[s, f"{r['before']['top1']:.2f}", f"{r['after']['top1']:.2f}", f"{r['before']['top5']:.2f}",
              f"{r['after']['top5']:.2f}"] for s, r in c.get("eval", {}).items()]))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mopro-fast report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    write_outputs(out, {**pngs, "report.html": page.encode()})
    return out / "report.html"


def _read_json(path: Path, lines: bool = False):
    """A JSON file (or JSON lines) of the run; unreadable or not JSON is a ReportError naming it."""
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not readable as JSON ({type(exc).__name__}: {str(exc)[:80]}); "
                          f"is this a run folder of `mopro-fast train`?") from None


def _curves(run: Path) -> dict[str, bytes]:
    """The run's curve PNGs: RUN's own when all are there, else drawn from metrics.jsonl in a scratch folder
    (RUN itself is not written)."""
    import tempfile

    names = ("loss.png", "accuracy.png", "noise.png")
    if all((run / n).is_file() for n in names):
        return {n: (run / n).read_bytes() for n in names}
    with tempfile.TemporaryDirectory(prefix="mopro-report-") as scratch:
        (Path(scratch) / "metrics.jsonl").symlink_to((run / "metrics.jsonl").resolve())
        return {p.name: p.read_bytes() for p in plot_run(Path(scratch))}


def _run_clean(run: Path, clean_dir: Path, progress: bool) -> str:
    """Run clean with the newest checkpoint of the run; returns a note when it cannot."""
    from mopro_fast.training.checkpoint import list_checkpoints
    from mopro_fast.after.clean import clean

    found = list_checkpoints(run)
    if not found:
        return " (no checkpoint in the run folder to run it with)"
    try:
        clean(found[0], clean_dir, progress=progress)
    except Exception as exc:  # noqa: BLE001 - the report still shows the curves; the reason goes on the page
        return f" (clean of {found[0].name} failed: {' '.join(str(exc).split())[:200]})"
    return ""


def _clean_sections(clean_dir: Path, pngs: dict[str, bytes], gallery: int) -> list[str]:
    from mopro_fast.after.clean import read_labels
    from mopro_fast.data.catalog import read_catalog

    records, s = read_labels(clean_dir)
    if s is None:
        raise ReportError(f"{clean_dir}: labels.jsonl without summary.json; re-run `mopro-fast clean`")
    missing = [k for k in ("samples", "counts", "per_class", "rule", "checkpoint", "shards", "split") if k not in s]
    if missing:
        raise ReportError(f"{clean_dir / 'summary.json'} is not the summary of `mopro-fast clean` (no "
                          f"{', '.join(missing)}); re-run `mopro-fast clean`")
    names = s.get("class_names") or [str(c) for c in range(s["num_classes"])]
    counts_png = pngs["class_counts.png"] = plot_class_counts(s["per_class"], names)
    n = max(s["samples"], 1)
    parts = [f"<h2>Noise cleaning of {s['samples']} training images</h2>",
             f"<p>checkpoint {html.escape(s['checkpoint'])}; rule: alpha {s['rule']['alpha']}, threshold "
             f"{s['rule']['threshold']}, view {html.escape(s['rule']['view'])}</p>",
             _table(["kept", "relabelled", "dropped as OOD"],
                    [[f"{s['counts'][k]} ({s['counts'][k] / n:.1%})" for k in ("kept", "relabelled", "ood")]])]
    truth = s.get("truth")
    if truth:
        parts.append("<h3>Against the planted truth</h3>" + _table(
            ["", "detector", "chance"],
            [["precision (flagged that are noisy)", f"{truth['precision']:.2f}", f"{truth['chance_precision']:.2f}"],
             ["recall (noisy that are flagged)", f"{truth['recall']:.2f}", f"{truth['chance_recall']:.2f}"],
             ["flipped labels found / corrected", f"{truth['flipped_found']:.2f} / {truth['flipped_corrected']:.2f}", ""],
             ["planted OOD marked OOD", f"{truth['ood_found']:.2f}", ""],
             ["label accuracy before / after (kept)", f"{truth['label_accuracy_before']:.2f} / "
                                                      f"{truth['label_accuracy_after']:.2f}", ""]]))
    pc = s["per_class"]
    parts.append("<h2>Per class</h2>" + f"<div class='plots'><img src='{_data_uri(counts_png)}' alt='class_counts.png'></div>"
                 + _table(["class", "web", "kept", "relabelled away", "relabelled in", "OOD", "after"],
                          [[names[c], pc["web"][c], pc["kept"][c], pc["relabelled_away"][c], pc["relabelled_in"][c],
                            pc["ood"][c], pc["final"][c]] for c in range(len(pc["web"]))]))
    from mopro_fast.data.errors import ShardError
    from mopro_fast.data.manifest import ManifestError

    try:
        catalog = read_catalog(Path(s["shards"]), s["split"])
    except (ManifestError, ShardError, OSError) as exc:
        return parts + [f"<h2>Galleries</h2><p class='note'>not shown: the shards are not readable "
                        f"({html.escape(' '.join(str(exc).split())[:200])})</p>"]
    titles = {"relabelled": "Relabelled (web label &rarr; new label), most confident first",
              "ood": "Dropped as out-of-distribution, least support for the web label first",
              "clean": "Most confident clean images"}
    for kind, items in pick_galleries(records, gallery).items():
        parts.append(f"<h2>{titles[kind]}</h2>" + _gallery_html(kind, items, catalog, names))
    return parts
