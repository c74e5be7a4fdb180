"""Checkpoints: written atomically, the last k kept, and `--resume auto` that skips broken ones.

A checkpoint holds everything a run needs to continue exactly: MoPro state (query and key
networks, queue, pointer, prototypes), optimiser and grad-scaler state, the position in the
schedule (epoch, step in epoch, global step), the RNG states, the resolved config and the code
version. File names sort by global step: `ckpt-e0003-s00001234.pt`.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mopro_fast.errors import MoproError
from mopro_fast.safe_io import atomic_write, free_bytes

PATTERN = re.compile(r"ckpt-e(\d+)-s(\d+)\.pt$")
REQUIRED = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "config")


class CheckpointError(MoproError, ValueError):
    """A checkpoint that cannot be used for what was asked; the message is one line."""


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{global_step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir`, newest (highest global step) first."""
    found = [p for p in Path(run_dir).glob("ckpt-*.pt") if PATTERN.search(p.name)]
    return sorted(found, key=lambda p: (int(PATTERN.search(p.name).group(2)), p.name), reverse=True)


def save_checkpoint(run_dir: Path, state: dict, keep_last: int) -> Path:
    """Write `state` to a temporary name, flush it to disk, rename it; then prune old ones."""
    run_dir = Path(run_dir)
    path = write_checkpoint(run_dir / checkpoint_name(state["epoch"], state["global_step"]), state)
    for old in list_checkpoints(run_dir)[max(keep_last, 1):]:
        old.unlink(missing_ok=True)
    return path


def write_checkpoint(path: Path, state: dict) -> Path:
    """torch.save `state` to a temporary name next to `path`, flush it to disk, rename it to `path`.

    On a full disk (or any failed write) the temporary file is removed, `path` and every older
    checkpoint stay as they were, and an OutputError says how much space the checkpoint needs.
    """
    needed = state_bytes(state)
    return atomic_write(Path(path), lambda fh: _torch_save(state, fh, needed), needed=needed)


def _torch_save(state: dict, fh, needed: int) -> None:
    try:
        torch.save(state, fh)
    except RuntimeError as exc:
        # torch's zip writer reports a failed write as RuntimeError("... unexpected pos ..."), not as
        # the OSError it was: with the temporary file still there, a full disk shows as no space left.
        free = free_bytes(Path(fh.name))
        if free is not None and free < min(needed, 64 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"torch.save failed: {str(exc).splitlines()[0][:160]}") from None


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint; raises CheckpointError (a ValueError) with a one-line reason if it is unusable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all unusable
        raise CheckpointError(f"{path.name}: unreadable ({type(exc).__name__}: {_clip(str(exc))})") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise CheckpointError(f"{path.name}: not a mopro-fast checkpoint (missing {', '.join(missing)})")
    return state


def _clip(text: str, limit: int = 120) -> str:
    """The first line of `text`; when longer than `limit`, its first sentence or, failing that, cut
    at a word boundary with an ellipsis (never mid-word)."""
    line = (text.splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    if ". " in line[:limit]:
        return line[:limit].split(". ")[0]
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def find_resumable(run_dir: Path, map_location: str | torch.device = "cpu",
                   warn: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint in `run_dir` that loads; broken ones are skipped with a one-line
    warning (`warn`, default: printed to stderr)."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as exc:
            warn(f"warning: skipping checkpoint {exc}; trying the next older one")
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    from mopro_fast import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
