"""Progress of long work (training epochs, conversion) that also shows up in log files.

On a terminal: a tqdm bar. Without one (nohup, SLURM, CI, `> log`): one plain line every
`every_s` seconds on stderr, e.g.

    epoch 3: step 120/900 (13%), 512.3 img/s, ETA 00:12:41, loss 2.314, wait 4%

`every_s <= 0` turns the plain lines off; `tty=None` asks stderr. The bar and the lines show the
same numbers: done/total, rate in `unit`/s over the whole task, the ETA at that rate, and the
extra fields the caller passes to `update`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A bar on a TTY, else a plain line every `every_s` seconds (and one at `close` if any was due)."""

    def __init__(self, total: int, label: str, unit: str = "img", every_s: float = 30.0, initial: int = 0,
                 tty: bool | None = None, enabled: bool = True, rate_unit: str | None = None,
                 rate_per_unit: float = 1.0, stream: TextIO | None = None) -> None:
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.done = self._start = initial
        self.rate_unit = rate_unit or unit
        self.rate_per_unit = rate_per_unit  # e.g. images per step, so a step counter reports img/s
        self.stream = stream or sys.stderr
        self.fields: dict[str, str] = {}
        self.t0 = self._last = time.monotonic()
        tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        self._plain = enabled and not tty and every_s > 0
        if enabled and tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=unit, leave=False,
                             dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **fields) -> None:
        """`n` more units done; `fields` (already formatted or numbers) are shown after the rate."""
        self.done += n
        if fields:
            self.fields.update({k: _fmt(v) for k, v in fields.items()})
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(self.fields, refresh=False)
            self._bar.update(n)
        elif self._plain and time.monotonic() - self._last >= self.every_s:
            self.emit()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self._start) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = format_eta(left) if left != float("inf") else "?"
        extra = "".join(f", {k} {v}" for k, v in self.fields.items())
        return (f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, "
                f"{rate * self.rate_per_unit:.1f} {self.rate_unit}/s, ETA {eta}{extra}")

    def emit(self) -> None:
        self._last = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
