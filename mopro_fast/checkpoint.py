"""Checkpoints: written atomically, the last k kept, and `--resume auto` that skips broken ones.

A checkpoint holds everything a run needs to continue exactly: MoPro state (query and key
networks, queue, pointer, prototypes), optimiser and grad-scaler state, the position in the
schedule (epoch, step in epoch, global step), the RNG states, the resolved config and the code
version. File names sort by global step: `ckpt-e0003-s00001234.pt`.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"ckpt-e(\d+)-s(\d+)\.pt$")
REQUIRED = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "config")


class CheckpointError(ValueError):
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
    """torch.save `state` to a temporary name next to `path`, flush it to disk, rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint; raises CheckpointError (a ValueError) with a one-line reason if it is unusable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all unusable
        raise CheckpointError(f"{path.name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise CheckpointError(f"{path.name}: not a mopro-fast checkpoint (missing {', '.join(missing)})")
    return state


def find_resumable(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint in `run_dir` that loads; broken ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as exc:
            warnings.warn(f"skipping checkpoint {exc}", stacklevel=2)
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
