"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it kills a
job) save a checkpoint where the run is, then end it with 128 + the signal number (130, 143).

The handler only sets a flag; the training loop reads it between steps, so the checkpoint is
taken at a step boundary and at most the step in flight is lost (and replayed by `--resume
auto`, which repeats it exactly). A second Ctrl-C while the save is pending interrupts at once.
With several ranks the flag is agreed on in the loop (`dist.any_true`), so all ranks stop at the
same step. Also: a timer for `run.ckpt_every_minutes`.
"""

from __future__ import annotations

import signal
import threading
import time

from mopro_fast.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Interrupted):
    """The run stopped on a signal after saving; `exit_code` is 130 (SIGINT) or 143 (SIGTERM)."""


class StopRequest:
    """Context manager: while inside, SIGINT/SIGTERM set `signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the save
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Every:
    """True once `minutes` have passed since the last `reset` (0 = never)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self._since >= self.seconds
