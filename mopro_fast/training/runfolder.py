"""The run folder (`run.out`): checked before any work, locked while a run writes it, never mixed.

DESIGN.md section 6: no command writes into an old run's folder without being told to.
- `claim` makes sure the folder can be written (a file in the way, a read-only mount or /proc
  fail here, in one line) and takes an exclusive `flock` on `RUN/.lock`. The OS drops the lock
  when the process dies, so a killed run never leaves a stale lock behind; a second training
  into the same folder is refused with the holder's pid.
- A new run (no `--resume`) into a folder that already holds a run (checkpoints, metrics) is
  refused; `--overwrite-run` removes that run's files first (only the files a run writes: other
  files in the folder are left alone).
- On resume, `metrics.jsonl` is cut back to the resumed step, so the log reads as one
  uninterrupted run (the replayed steps are logged again, once).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from mopro_fast.errors import MoproError
from mopro_fast.training.checkpoint import PATTERN, list_checkpoints
from mopro_fast.safe_io import OutputError, atomic_write_text, discard, output_dir

LOCK = ".lock"
LOG = "metrics.jsonl"
# Everything a training run writes into its folder (checkpoints match checkpoint.PATTERN).
RUN_FILES = ("config.yaml", "derived.json", LOG, "summary.json", "loss.png", "accuracy.png", "noise.png")
RUN_DIRS = ("tb", "ranks")


class RunFolderError(MoproError):
    """The run folder cannot be used as asked (in use, or holds another run); one line."""


class RunFolder:
    """One run's folder, held (locked) by this process from `claim` until `release` or exit."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def claim(self) -> RunFolder:
        """Create the folder if needed and lock it; raises OutputError / RunFolderError (one line)."""
        output_dir(self.path, "run.out")
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"run.out: cannot create the lock file {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"run.out {self.path} is in use by another training (pid {holder}); wait for it "
                                 f"to end or choose another run.out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for partial in self.path.glob(".ckpt-*.tmp-*"):  # only a dead writer's: we hold the lock now
            discard(partial)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None

    # ---- an old run in the folder

    def run_files(self) -> list[str]:
        """What an earlier run left here that a new run would mix with: checkpoints, metrics, summary."""
        found = [p.name for p in list_checkpoints(self.path)]
        found += [name for name in (LOG, "summary.json") if (self.path / name).is_file()]
        return found

    def refuse_new_run_over_old(self) -> None:
        found = self.run_files()
        if found:
            ckpts = sum(1 for name in found if PATTERN.search(name))
            what = ", ".join(([f"{ckpts} checkpoint(s)"] if ckpts else []) + [n for n in found if not PATTERN.search(n)])
            raise RunFolderError(f"run.out {self.path} already holds a run ({what}); continue it with --resume auto, "
                                 f"choose another run.out, or pass --overwrite-run to replace it")

    def clear_run(self) -> list[str]:
        """Remove the files an earlier run wrote (not the lock, not files a run never writes)."""
        removed = []
        for path in list_checkpoints(self.path) + [self.path / n for n in RUN_FILES] + list(self.path.glob(".ckpt-*.tmp-*")):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
        for name in RUN_DIRS:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
                removed.append(name + "/")
        return removed

    def truncate_log(self, global_step: int) -> int:
        """Keep the records of metrics.jsonl up to `global_step` (and drop unreadable lines, e.g.
        the half line of a killed write); returns how many lines were dropped."""
        path = self.path / LOG
        if not path.is_file():
            return 0
        lines = path.read_text(errors="replace").splitlines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= global_step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
