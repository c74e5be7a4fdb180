"""Where a run starts from: `--resume` (the same run goes on) and `--init` (a new run from weights).

`find_resume` picks the checkpoint (`auto`: the newest usable one in the run folder, broken ones
skipped with a one-line warning), `apply_resume` loads everything a run needs to continue exactly
(model, MoPro state, optimiser, scaler, RNG; checkpoint.py lists what a checkpoint holds) and
`init_from` copies only the model weights that fit. `after_restart` makes a worker group that
torchrun restarted (`--max-restarts`, after a rank died) continue from the newest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mopro_fast import dist
from mopro_fast.training.checkpoint import (CheckpointError, find_resumable, list_checkpoints, load_checkpoint,
                                            set_rng_state)
from mopro_fast.config import Config
from mopro_fast.core.mopro import MoPro


def init_from(path: Path, mopro: MoPro) -> str:
    """Start from the model weights of a checkpoint (e.g. one made by `mopro-fast import`): every
    tensor whose name and shape match is copied; the others (a classifier and prototypes for another
    class count, a queue of another length) keep their fresh values. Optimiser, schedule and RNG
    start fresh. Returns a one-line note of what was taken."""
    model = load_checkpoint(path)["model"]
    own = mopro.state_dict()
    taken = {k: v for k, v in model.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("query.encoder.") for k in taken):
        raise CheckpointError(f"--init {path.name}: none of its encoder weights fit model.arch / model.small_stem "
                              f"of this recipe")
    mopro.load_state_dict(taken, strict=False)  # copies in place: the flat EMA buffers stay intact
    fresh = sorted(set(own) - set(taken))
    return (f"initialised from {path} ({len(taken)} tensors)"
            + (f"; fresh: {', '.join(fresh)}" if fresh else ""))


def after_restart(resume: str | None, overwrite_run: bool, run_dir: Path) -> tuple[str | None, bool]:
    """(resume, overwrite_run) for this attempt of a torchrun worker group (elastic restarts).

    On the first attempt (`dist.restart_count()` 0) both are as given. When torchrun restarted the
    group because a rank died, every worker runs the same command line again; that must continue
    the run, never start it over: `--resume auto` (the newest usable checkpoint in run.out; none yet
    means from scratch, or from `--init` weights), and `--overwrite-run` no longer applies (it would
    delete the checkpoints of the attempt that died). A `--resume PATH` is kept only while run.out
    holds no checkpoint of its own yet. Every rank decides alike from the same files and environment.
    """
    dist.init_from_env()  # (torchrun's restart counts may differ between nodes: the ranks agree on one)
    count = dist.restart_count()
    if not dist.any_true(count > 0)[0]:
        return resume, overwrite_run
    if resume not in (None, "auto") and not list_checkpoints(run_dir):
        return resume, False
    if dist.is_main():
        print(f"torchrun restart {count}: resuming from the newest checkpoint in {run_dir} (--resume auto)",
              flush=True)
    return "auto", False


def find_resume(resume: str | None, run_dir: Path, device) -> tuple[Path, dict] | None:
    """The checkpoint to resume from (`auto`: the newest usable one in the run folder), or None."""
    if not resume:
        return None
    if resume == "auto":
        found = find_resumable(run_dir, map_location=device,
                               warn=lambda line: print(line, file=sys.stderr, flush=True) if dist.is_main() else None)
        if found is None and dist.is_main():
            print(f"resume auto: no usable checkpoint in {run_dir}; starting from scratch", flush=True)
        return found
    path = Path(resume)
    return path, load_checkpoint(path, map_location=device)


def finished_note(cfg: Config, run_dir: Path, path: Path, state: dict) -> dict:
    if dist.is_main():
        print(f"{path} is the end of this run (epoch {state['epoch']} of {cfg.schedule.epochs}): nothing to do, "
              f"{run_dir} is left as it was (raise schedule.epochs to train on)", flush=True)
    return {"finished": str(path), "epoch": state["epoch"], "global_step": state["global_step"]}


def apply_resume(path: Path, state: dict, cfg: Config, mopro: MoPro, optimizer, scaler) -> tuple[int, int, int]:
    """Load a checkpoint's model, optimiser, scaler and RNG states; returns its (epoch, step in
    epoch, global step). A checkpoint of another model is one line naming the tensor and the keys."""
    if state.get("optimizer") is None:
        raise CheckpointError(f"{path}: holds weights only (imported?), nothing to resume; use --init {path}")
    try:
        mopro.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(_misfit(path, state, cfg, mopro)) from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. another number of param groups: optim.no_bn_weight_decay changed
        raise CheckpointError(f"{path}: its optimiser state does not fit this recipe's optimiser "
                              f"(optim.no_bn_weight_decay changed?): {' '.join(str(exc).split())}") from None
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if dist.is_main():
        print(f"resumed from {path} (epoch {state['epoch']}, step {state['global_step']})", flush=True)
    return state["epoch"], state["step_in_epoch"], state["global_step"]


def _misfit(path: Path, state: dict, cfg: Config, mopro: MoPro) -> str:
    """One line: which tensor of the checkpoint does not fit the recipe's model, and which keys differ."""
    own = mopro.state_dict()
    theirs = state["model"]
    shape = next(((k, tuple(v.shape), tuple(own[k].shape)) for k, v in theirs.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)), None)
    if shape is not None:
        what = f"tensor {shape[0]} is {list(shape[1])} in the checkpoint but {list(shape[2])} here"
    else:
        odd = sorted(set(theirs) ^ set(own))
        what = f"tensor {odd[0]} is {'only in the checkpoint' if odd[0] in theirs else 'missing from it'}"
    old, new = state.get("config") or {}, cfg.to_dict()
    keys = [f"{sec}.{k} {old[sec][k]} -> {v}" for sec in ("model", "mopro", "data") for k, v in new[sec].items()
            if k in ("num_classes", "queue_size") or sec == "model"
            if isinstance(old.get(sec), dict) and k in old[sec] and old[sec][k] != v]
    differ = f"; recipe keys that differ: {', '.join(keys)}" if keys else ""
    return (f"{path} does not fit this recipe's model: {what}{differ}; resume with the recipe it was trained "
            f"with, or start a new run from its weights with --init")
