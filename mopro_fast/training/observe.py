"""What a run shows about itself: a JSON-lines metrics log, TensorBoard events, PNG plots.

Only rank 0 writes. Every record is one JSON object per line in `RUN/metrics.jsonl` with a
`kind` ("train" every `log_every` steps, "epoch", "eval"), the epoch and global step, so the log
is easy to read back for plots, reports and tests.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from mopro_fast import dist
from mopro_fast.safe_io import OutputError, describe


class RunLog:
    """Rank-0 writer of metrics.jsonl and TensorBoard events (a no-op on other ranks).

    `purge_step`: a resumed run's position; TensorBoard drops the events logged past it by the
    interrupted run (metrics.jsonl is cut back by `RunFolder.truncate_log`), so the curves read
    as one run. A failed write (full disk) is an OutputError, one line.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    def write(self, kind: str, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": epoch, "step": step, **{k: _clean(v) for k, v in values.items()}}
        try:
            self._fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise OutputError(describe(exc, self.path)) from None
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


class LogWindow:
    """The metrics of the steps since the last log line: sums of the step metrics (device tensors,
    no host sync), data-wait time and wall time; `close` reduces them over ranks (one sync)."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def fetch(self, batches):
        """The next batch (None at the end), its wait counted as data wait (on CUDA a lower bound:
        kernels run asynchronously)."""
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - t0
        return batch

    def add(self, metrics: dict[str, Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.steps += 1

    def close(self, lr: float) -> tuple[dict[str, float], float]:
        """Mean metrics over the window and the ranks, plus lr, images/s and data-wait share;
        returns them and the window's wait seconds, and starts a new window."""
        values = _reduce({k: v / self.steps for k, v in self.sums.items()}) if self.steps else {}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        values.update(lr=lr, images_per_s=self.steps * self.global_batch / elapsed, data_wait=self.wait / elapsed)
        wait = self.wait
        self.reset()
        return values, wait


def _reduce(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean over ranks of each metric, as Python floats: one all-reduce and one host sync."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = dist.all_reduce_mean(torch.stack([values[k] for k in keys]))
    return dict(zip(keys, stacked.tolist()))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_epoch_noise(run_dir: Path) -> dict:
    """Noise metrics averaged over the last epoch's training log (the model's final behaviour)."""
    train = [r for r in read_log(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    if not train:
        return {}
    last = [r for r in train if r["epoch"] == train[-1]["epoch"]]
    keys = ("frac_relabelled", "frac_ood", "noise_precision", "noise_recall")
    return {k: sum(r[k] for r in last) / len(last) for k in keys if k in last[0]}


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
        try:
            fig.savefig(run_dir / name)
        except OSError as exc:
            raise OutputError(describe(exc, run_dir / name)) from None
        finally:
            plt.close(fig)
        written.append(run_dir / name)
    return written
