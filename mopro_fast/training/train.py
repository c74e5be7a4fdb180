"""`mopro-fast train RECIPE`: the training loop (DESIGN.md sections 1 and 3).

`train` claims the run folder (locked, never mixed with an old run: `mopro_fast.training.runfolder`),
`_setup` builds one `Run` (device, resume point, model and optimiser from `build_model`, loaders,
log), `_loop` runs the epochs (one `train_step` per batch, a log window every `run.log_every`
steps, evaluation and a checkpoint per epoch, a checkpoint on SIGINT/SIGTERM or every
`run.ckpt_every_minutes`), `_finish` writes the summary. The same code runs on a CPU in one
process and under `torchrun` on many GPUs; all rank logic is in `mopro_fast.dist`, and the
trainer never asks which loader backend it has. `bench step` and `bench e2e` build and step
through the same `build_model` and `train_step`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mopro_fast import dist
from mopro_fast.training import runtime
from mopro_fast.training.checkpoint import checkpoint_name, code_version, rng_state, save_checkpoint
from mopro_fast.config import Config, Derived, derive, lr_at, mopro_switches, resolution_at
from mopro_fast.data import backend_options, build_eval_loader, build_train_loader, loader_spec
from mopro_fast.data.manifest import ManifestError, read_manifest
from mopro_fast.errors import MoproError
from mopro_fast.training.evaluate import evaluate
from mopro_fast.training.interrupt import Every, StopRequest, TrainingInterrupted
from mopro_fast.core.model import MoProNet
from mopro_fast.core.mopro import MoPro
from mopro_fast.training.observe import LogWindow, RunLog, last_epoch_noise, plot_run
from mopro_fast.progress import Progress
from mopro_fast.training.resume import apply_resume, find_resume, finished_note, init_from
from mopro_fast.training.runfolder import RunFolder, RunFolderError
from mopro_fast.safe_io import OutputError, atomic_write_text, describe
from mopro_fast.core.step import mopro_step
from mopro_fast.training.truth import truth_by_index


class TrainingStopped(MoproError, RuntimeError):
    """The loss went NaN/inf; nothing new was saved (one-line message, exit code 3)."""

    exit_code = 3


@dataclass
class Position:
    """Where the run is: the next step to run is step `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def ce_step(net: nn.Module, view_q: Tensor, labels: Tensor, label_smoothing: float = 0.0
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """The cross-entropy baseline (`mopro.enabled=false`): web labels as they are, weak view only;
    `label_smoothing` as `optim.label_smoothing` says (0 = none)."""
    logits, _ = net(view_q)  # b x K
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    acc = (logits.detach().argmax(1) == labels).float().mean()  # fraction, like mopro_step's
    return loss, {"loss": loss.detach(), "loss_cls": loss.detach(), "acc_cls": acc}


def train_step(mopro_enabled: bool, step_fn, mopro: MoPro, query: nn.Module, optimizer, scaler, autocast,
               batch, use_proto: bool, clean: bool, truth: Tensor | None) -> dict[str, Tensor]:
    """One step: forward under autocast, losses, backward, optimiser, momentum updates.

    Returns the step's metrics as device tensors (no host sync here).
    """
    with autocast:
        if mopro_enabled:
            loss, metrics = step_fn(mopro, batch.view_q, batch.view_k, batch.label, use_proto_loss=use_proto,
                                    clean=clean, query_net=query, truth=truth)
        else:
            loss, metrics = ce_step(query, batch.view_q, batch.label, mopro.label_smoothing)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if mopro_enabled:
        mopro.momentum_update()  # key-network EMA reads the new query weights
    return metrics


class Training(NamedTuple):
    """What `build_model` makes, in the order `Run` holds it."""

    mopro: MoPro
    query: nn.Module  # mopro.query, wrapped in DDP with several ranks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # the forward passes' mixed-precision context
    step_fn: object  # mopro_step, or its torch.compile'd version


def build_model(cfg: Config, num_classes: int, lr: float, device: torch.device, world: int = 1,
                init: str | Path | None = None, momenta: tuple[float, float] | None = None) -> Training:
    """Model, optimiser, GradScaler, autocast and step function as the recipe says: `cfg.model`,
    `cfg.mopro`, `cfg.optim` (`lr` is the peak lr, `Derived.lr`; `momenta`: `Derived.key_momentum` and
    `proto_momentum`, None = the recipe's) and `cfg.run`'s precision, channels_last and compile. The
    caller seeds first. `init`: a checkpoint whose weights start the model (`init_from`). With `world`
    > 1 the query network is wrapped in DDP. The trainer and `bench step`/`bench e2e` build through here."""
    net = MoProNet(num_classes, cfg.model.arch, cfg.model.proj_dim, cfg.model.proj_hidden, cfg.model.small_stem,
                    cfg.model.width, cfg.model.blurpool)
    key_m, proto_m = momenta or (cfg.mopro.momentum, cfg.mopro.proto_momentum)
    mopro = MoPro(net, num_classes, cfg.model.proj_dim, cfg.mopro.queue_size, cfg.mopro.temperature,
                  key_m, proto_m, cfg.mopro.alpha, cfg.mopro.pseudo_threshold,
                  cfg.mopro.w_inst, cfg.mopro.w_proto, cfg.mopro.ood_threshold, cfg.optim.label_smoothing).to(device)
    if init:
        note = init_from(Path(init), mopro)
        if dist.is_main():
            print(note, flush=True)
    if cfg.run.channels_last:
        mopro.to(memory_format=torch.channels_last)
    dist.broadcast_module_(mopro)  # key net, queue and prototypes must start equal on every rank
    query = mopro.query
    if world > 1:
        # Only the query net trains (the key net follows by EMA); CE leaves the projection head without grads.
        ids, unused = [device] if device.type == "cuda" else None, not cfg.mopro.enabled
        query = nn.parallel.DistributedDataParallel(mopro.query, device_ids=ids, find_unused_parameters=unused)
    optimizer = runtime.sgd(runtime.decay_groups(mopro.query, cfg.optim.no_bn_weight_decay), lr, cfg.optim.momentum,
                            cfg.optim.weight_decay, cfg.optim.nesterov, cfg.optim.impl, device)
    return Training(mopro, query, optimizer, runtime.grad_scaler(device, cfg.run.precision),
                    runtime.autocast(device, cfg.run.precision),
                    torch.compile(mopro_step) if cfg.run.compile else mopro_step)


@dataclass
class Run:
    """Everything the loop needs, built once by `_setup`."""

    cfg: Config
    derived: Derived
    folder: RunFolder
    device: torch.device
    world: int
    mopro: MoPro
    query: nn.Module  # mopro.query, wrapped in DDP with several ranks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    step_fn: object
    pos: Position
    train_loader: object = None
    eval_loaders: dict = None
    truth: Tensor | None = None
    log: RunLog = None


def train(cfg: Config, resume: str | None = None, progress: bool = True, init: str | None = None,
          overwrite_run: bool = False) -> dict:
    """Train as the recipe says; returns the final summary (also in RUN/summary.json).

    `init`: a checkpoint whose model weights start the run (fine-tuning; see `init_from`).
    `overwrite_run`: a new run may replace the run already in `run.out` (else that is refused).
    A finished run resumed returns `{"finished": ...}` and changes nothing.
    """
    dist.init_from_env()
    folder = _claim(Path(cfg.run.out), resume, overwrite_run)  # rank 0 locks it until we return
    try:
        run = _setup(cfg, folder, resume, init)
        if isinstance(run, dict):
            return run  # finished already
        with StopRequest() as stop:
            bar = Progress(run.derived.total_steps, "train", unit="step", every_s=cfg.run.progress_seconds,
                           initial=run.pos.global_step, enabled=progress and dist.is_main(), rate_unit="img",
                           rate_per_unit=run.derived.global_batch)
            try:
                results, batches_per_epoch, stats = _loop(run, stop, bar)
            finally:
                bar.close()
                run.log.close()
        return _finish(run, results, batches_per_epoch, stats)
    finally:
        folder.release()


def _claim(run_dir: Path, resume: str | None, overwrite_run: bool) -> RunFolder:
    """Rank 0 checks and locks the run folder; a refusal stops every rank with the same line."""
    folder, error = RunFolder(run_dir), None
    if dist.is_main():
        try:
            folder.claim()
            if resume is None and overwrite_run:
                removed = folder.clear_run()
                if removed:
                    print(f"--overwrite-run: removed the earlier run in {run_dir} ({len(removed)} files)", flush=True)
            elif resume is None:
                folder.refuse_new_run_over_old()
        except MoproError as exc:  # OutputError (run.out unusable), RunFolderError (in use, holds a run)
            folder.release()
            error = exc
    message = dist.broadcast_error(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise RunFolderError(message)
    return folder


def _setup(cfg: Config, folder: RunFolder, resume: str | None, init: str | None) -> Run | dict:
    """Device, data sizes, resume point, model, optimiser, loaders, log (DESIGN.md section 3)."""
    rank, world = dist.rank(), dist.world_size()
    device = runtime.pick_device(cfg.run.device)
    runtime.configure_backends(device, cfg.run.cudnn_benchmark, cfg.run.tf32, cfg.run.deterministic)
    runtime.seed_everything(cfg.run.seed)  # same on every rank: identical initial weights
    manifest = read_manifest(cfg.data.shards)
    eval_splits = _eval_splits(cfg, manifest)
    derived = derive(cfg, world, manifest.num_written(cfg.data.train_split), manifest_classes=manifest.num_classes)
    found = find_resume(resume, folder.path, device)
    if found is not None and found[1]["epoch"] >= cfg.schedule.epochs:
        return finished_note(cfg, folder.path, *found)  # before anything is written

    run = Run(cfg, derived, folder, device, world,
              *build_model(cfg, derived.num_classes, derived.lr, device, world, init,
                           (derived.key_momentum, derived.proto_momentum)), Position())
    if found is not None:
        # (a checkpoint that does not fit fails here, before anything is written)
        run.pos = Position(*apply_resume(*found, cfg, run.mopro, run.optimizer, run.scaler))
    if dist.is_main():
        if resume:
            folder.truncate_log(run.pos.global_step)  # the replayed steps are logged again, once
        atomic_write_text(folder.path / "config.yaml", cfg.to_yaml())
        atomic_write_text(folder.path / "derived.json", json.dumps(derived.to_dict(), indent=1) + "\n")
        print(derived.describe(), flush=True)

    # ---- data
    spec, options = loader_spec(cfg, rank, world, device), backend_options(cfg, cfg.loader.backend)
    run.train_loader = build_train_loader(cfg.loader.backend, spec, split=cfg.data.train_split,
                                          resolution=resolution_at(cfg.loader, run.pos.epoch),
                                          steps_per_epoch=derived.steps_per_epoch, options=options)
    run.eval_loaders = {s: build_eval_loader(cfg.loader.backend, spec, split=s, resolution=cfg.loader.eval_resolution,
                                             resize=cfg.loader.eval_resize, options=options) for s in eval_splits}
    if run.pos.step_in_epoch and not run.train_loader.exact_resume and dist.is_main():
        print(f"note: loader backend {cfg.loader.backend} cannot resume mid-epoch exactly: epoch {run.pos.epoch} "
              f"goes on from step {run.pos.step_in_epoch} with other samples and views", file=sys.stderr, flush=True)
    if cfg.data.truth:
        run.truth = truth_by_index(cfg.data.shards, cfg.data.train_split, Path(cfg.data.truth)).to(device)
    run.log = RunLog(folder.path, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard,
                     purge_step=run.pos.global_step if resume else None)
    return run


def _loop(run: Run, stop: StopRequest, bar: Progress) -> tuple[dict, list[int], dict]:
    """The epochs: steps, a log line every `run.log_every` steps, evaluation and a checkpoint at
    each epoch's end. A signal or `run.ckpt_every_minutes` saves at the current step. With one
    process both are read every step (no sync); with several, at each log line, where the ranks
    agree on them in one small all-reduce."""
    cfg, d, pos = run.cfg, run.derived, run.pos
    results: dict[str, dict] = {}
    batches_per_epoch: list[int] = []  # this rank's, written to RUN/ranks/ (DDP needs them all equal)
    # images, pixels, training seconds without eval/epoch-end saves: eval records carry them (`bench tta`)
    stats = {"images": 0, "pixels": 0, "wait": 0.0, "start": time.perf_counter(), "paused": 0.0}
    timer = Every(cfg.run.ckpt_every_minutes)
    for epoch in range(pos.epoch, cfg.schedule.epochs):
        use_proto, clean = mopro_switches(d, epoch)
        side = resolution_at(cfg.loader, epoch)
        run.train_loader.set_resolution(side)
        run.train_loader.set_epoch(epoch, start_step=pos.step_in_epoch)
        window, batches, received = LogWindow(d.global_batch), iter(run.train_loader), 0
        while pos.step_in_epoch < d.steps_per_epoch:
            batch = _next_batch(run, window, batches, received, stop)
            received += 1
            lr = lr_at(d, pos.global_step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            window.add(train_step(cfg.mopro.enabled, run.step_fn, run.mopro, run.query, run.optimizer, run.scaler,
                                  run.autocast, batch, use_proto, clean,
                                  None if run.truth is None else run.truth[batch.index]))
            pos.global_step, pos.step_in_epoch = pos.global_step + 1, pos.step_in_epoch + 1
            stats["images"] += d.global_batch
            stats["pixels"] += d.global_batch * side * side
            bar.update(1)
            last = pos.step_in_epoch == d.steps_per_epoch
            every_n = bool(cfg.run.ckpt_every_steps) and pos.global_step % cfg.run.ckpt_every_steps == 0
            urgent = run.world == 1 and (stop.requested or timer.due())
            if window.steps == cfg.run.log_every or last or every_n or urgent:  # (a save needs a finite-loss check)
                values, wait = window.close(lr)  # one sync per window
                _check_finite(values, pos)
                run.log.write("train", pos.global_step, epoch, values)
                stats["wait"] += wait
                bar.update(0, epoch=epoch, loss=values.get("loss", float("nan")), wait=f"{values['data_wait']:.0%}")
                halt, due = dist.any_true(stop.requested, timer.due())
                if (every_n or due or halt) and not last:  # the epoch's end saves anyway, after evaluation
                    _save(run, timer)
                if halt and not last:
                    raise _interrupted(run, stop)
        batches_per_epoch.append(received)
        pos.epoch, pos.step_in_epoch = epoch + 1, 0
        paused = time.perf_counter()
        if run.eval_loaders and ((epoch + 1) % cfg.run.eval_every == 0 or pos.epoch == cfg.schedule.epochs):
            seen = {"train_seconds": round(paused - stats["start"] - stats["paused"], 3),
                    "images_seen": stats["images"], "pixels_seen": stats["pixels"]}
            results = _evaluate(run, epoch, seen)
        _save(run, timer)
        stats["paused"] += time.perf_counter() - paused
        if dist.any_true(stop.requested)[0] and pos.epoch < cfg.schedule.epochs:
            raise _interrupted(run, stop)
    return results, batches_per_epoch, stats


def _next_batch(run: Run, window: LogWindow, batches, received: int, stop: StopRequest):
    """The next training batch; a loader that ends early is an error (a short rank would leave the
    others waiting in DDP forever). If a signal killed the loader's workers while the main process
    waited (SIGTERM to the process group), the run still saves at the last finished step."""
    try:
        batch = window.fetch(batches)
    except Exception:
        if stop.requested and run.world == 1:
            _save(run, None)
            raise _interrupted(run, stop) from None
        raise
    if batch is None:
        expected = run.derived.steps_per_epoch - run.pos.step_in_epoch + received
        raise RuntimeError(f"rank {dist.rank()}: the {run.cfg.loader.backend} loader ended after {received} "
                           f"batches of epoch {run.pos.epoch}, expected {expected}")
    return batch


def _evaluate(run: Run, epoch: int, progress: dict[str, float]) -> dict[str, dict]:
    """Every eval split; the log record also carries `progress` (training seconds, images, pixels)."""
    results = {split: evaluate(run.mopro.query, loader, run.autocast, run.device)
               for split, loader in run.eval_loaders.items()}
    run.log.write("eval", run.pos.global_step, epoch,
                  {**{f"{s}/{k}": v for s, r in results.items() for k, v in r.items() if k != "samples"}, **progress})
    if dist.is_main():
        print(f"epoch {epoch}: " + ", ".join(f"{s} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}"
                                             for s, r in results.items()), flush=True)
    return results


def _finish(run: Run, results: dict, batches_per_epoch: list[int], stats: dict) -> dict:
    """summary.json, this rank's batch counts and the plots."""
    run_dir, pos = run.folder.path, run.pos
    elapsed = time.perf_counter() - stats["start"]
    summary = {"epochs": run.cfg.schedule.epochs, "global_step": pos.global_step, "eval": results,
               "images_per_s": stats["images"] / max(elapsed, 1e-9), "data_wait": stats["wait"] / max(elapsed, 1e-9),
               "seconds": elapsed, "world_size": run.world, "device": str(run.device), "run_dir": str(run_dir)}
    try:
        (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe(exc, run_dir / "ranks", what="create")) from None
    atomic_write_text(run_dir / "ranks" / f"rank-{dist.rank()}.json", json.dumps(
        {"rank": dist.rank(), "world_size": run.world, "steps_per_epoch": run.derived.steps_per_epoch,
         "batches_per_epoch": batches_per_epoch}) + "\n")
    if dist.is_main():
        summary["noise"] = last_epoch_noise(run_dir)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        summary["plots"] = [str(p) for p in plot_run(run_dir)]
    dist.barrier()
    return summary


def _eval_splits(cfg: Config, manifest) -> list[str]:
    """The recipe's eval splits that the shards hold; one absent is skipped with a note, one with
    no samples (every record rejected at conversion) is an error, like an empty training split."""
    for split in (cfg.data.train_split, *cfg.data.eval_splits):
        if split in manifest.splits and manifest.num_written(split) == 0:
            listed = manifest.split(split).get("num_listed", "?")
            raise ManifestError(f"split {split!r} of {manifest.root} has 0 samples (all {listed} listed records "
                                f"were rejected by convert, see its manifest's rejects); fix the source and "
                                f"re-convert, or drop it from data.eval_splits")
    missing = [s for s in cfg.data.eval_splits if s not in manifest.splits]
    if missing and dist.is_main():
        print(f"note: eval split(s) {', '.join(missing)} not in {manifest.root / 'manifest.json'} (it has "
              f"{', '.join(sorted(manifest.splits))}); skipped", file=sys.stderr, flush=True)
    return [s for s in cfg.data.eval_splits if s in manifest.splits]


def _check_finite(values: dict[str, float], pos: Position) -> None:
    if not math.isfinite(values.get("loss", 0.0)):
        raise TrainingStopped(f"loss is {values['loss']} at epoch {pos.epoch} step {pos.global_step}; stopped "
                              f"without saving (the last good checkpoint stays); lower optim.lr or use run.precision=fp32")


def _save(run: Run, timer: Every | None) -> None:
    if dist.is_main():
        pos = run.pos
        state = {"model": run.mopro.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict(), "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                 "global_step": pos.global_step, "rng": rng_state(), "config": run.cfg.to_dict(),
                 "code_version": code_version()}
        save_checkpoint(run.folder.path, state, run.cfg.run.keep_last)
    dist.barrier()
    if timer is not None:
        timer.reset()


def _interrupted(run: Run, stop: StopRequest) -> TrainingInterrupted:
    pos = run.pos
    return TrainingInterrupted(f"stopped by {stop.name} at epoch {pos.epoch} step {pos.global_step} after saving "
                               f"{run.folder.path / checkpoint_name(pos.epoch, pos.global_step)}; continue with "
                               f"--resume auto", stop.exit_code)
