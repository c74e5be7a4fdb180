"""What a run shows about itself: a JSON-lines metrics log, TensorBoard events, PNG plots.

Only rank 0 writes. Every record is one JSON object per line in `RUN/metrics.jsonl` with a
`kind` ("train" every `log_every` steps, "epoch", "eval"), the epoch and global step, so the log
is easy to read back for plots, reports and tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLog:
    """Rank-0 writer of metrics.jsonl and TensorBoard events (a no-op on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def write(self, kind: str, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": epoch, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> list[Path]:
    """PNG plots of the curves in RUN/metrics.jsonl: loss, accuracy, relabelled/OOD fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_log(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    panels = {
        "loss.png": ("training loss", [(train, k) for k in ("loss", "loss_cls", "loss_proto", "loss_inst")], "step"),
        "accuracy.png": ("accuracy (%)", [(evals, k) for k in sorted({k for r in evals for k in r
                                                                       if k.endswith(("top1", "top5"))})], "epoch"),
        "noise.png": ("fraction of the batch", [(train, k) for k in ("frac_relabelled", "frac_ood",
                                                                     "noise_precision", "noise_recall")], "step"),
    }
    written = []
    for name, (ylabel, series, x_key) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for rows, key in series:
            points = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key, marker="o" if x_key == "epoch" else None, markersize=3)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / name)
        plt.close(fig)
        written.append(run_dir / name)
    return written
