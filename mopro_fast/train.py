"""`mopro-fast train RECIPE`: the training loop (DESIGN.md sections 1 and 3).

Sections: Setup (process group, device, config, run folder), Model (MoPro state, DDP around the
query network only, optimiser), Resume, Data, Loop (one readable step per batch), Evaluation and
checkpoints. The same code runs on a CPU in one process and under `torchrun` on many GPUs; all
rank logic is in `mopro_fast.dist`, and the trainer never asks which loader backend it has.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mopro_fast import dist, runtime
from mopro_fast.checkpoint import code_version, find_resumable, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mopro_fast.config import Config, derive, lr_at, mopro_switches
from mopro_fast.data import build_eval_loader, build_train_loader
from mopro_fast.data.manifest import read_manifest
from mopro_fast.evaluate import evaluate
from mopro_fast.model import MoProNet
from mopro_fast.mopro import MoPro
from mopro_fast.observe import RunLog, plot_run
from mopro_fast.step import mopro_step
from mopro_fast.truth import truth_by_index


class TrainingStopped(RuntimeError):
    """The loss went NaN/inf; nothing new was saved (one-line message for the CLI)."""


@dataclass
class Position:
    """Where the run is: the next step to run is step `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def ce_step(net: nn.Module, view_q: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The cross-entropy baseline (`mopro.enabled=false`): web labels as they are, weak view only."""
    logits, _ = net(view_q)  # b x K
    loss = F.cross_entropy(logits, labels)
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
            loss, metrics = ce_step(query, batch.view_q, batch.label)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if mopro_enabled:
        mopro.momentum_update()  # key-network EMA reads the new query weights
    return metrics


def train(cfg: Config, resume: str | None = None, progress: bool = True, init: str | None = None) -> dict:
    """Train as the recipe says; returns the final summary (also in RUN/summary.json).

    `init`: a checkpoint whose model weights start the run (fine-tuning; see `init_from`).
    """
    # ------------------------------------------------------------------ Setup
    dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    device = runtime.pick_device(cfg.run.device)
    runtime.configure_backends(device, cfg.run.cudnn_benchmark, cfg.run.tf32, cfg.run.deterministic)
    runtime.seed_everything(cfg.run.seed)  # same on every rank: identical initial weights
    manifest = read_manifest(Path(cfg.data.shards))
    derived = derive(cfg, world, manifest.num_written(cfg.data.train_split), manifest_classes=manifest.num_classes)
    num_classes = derived.num_classes
    run_dir = Path(cfg.run.out)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "derived.json").write_text(json.dumps(derived.to_dict(), indent=1) + "\n")
        print(derived.describe(), flush=True)

    # ------------------------------------------------------------------ Model
    net = MoProNet(num_classes, cfg.model.arch, cfg.model.proj_dim, cfg.model.proj_hidden, cfg.model.small_stem)
    mopro = MoPro(net, num_classes, cfg.model.proj_dim, cfg.mopro.queue_size, cfg.mopro.temperature,
                  cfg.mopro.momentum, cfg.mopro.proto_momentum, cfg.mopro.alpha, cfg.mopro.pseudo_threshold,
                  cfg.mopro.w_inst, cfg.mopro.w_proto).to(device)
    if init:
        note = init_from(Path(init), mopro)
        if dist.is_main():
            print(note, flush=True)
    if cfg.run.channels_last:
        mopro.to(memory_format=torch.channels_last)
    dist.broadcast_module_(mopro)  # key net, queue and prototypes must start equal on every rank
    query = mopro.query
    if world > 1:
        # Only the query network is trained; the key network follows by EMA outside DDP's sync.
        query = nn.parallel.DistributedDataParallel(mopro.query, device_ids=[device] if device.type == "cuda" else None)
    optimizer = runtime.sgd(mopro.query.parameters(), derived.lr, cfg.optim.momentum, cfg.optim.weight_decay,
                            cfg.optim.nesterov, cfg.optim.impl, device)
    scaler = runtime.grad_scaler(device, cfg.run.precision)
    autocast = runtime.autocast(device, cfg.run.precision)
    step_fn = torch.compile(mopro_step) if cfg.run.compile else mopro_step

    # ------------------------------------------------------------------ Resume
    pos = Position()
    if resume:
        pos = _resume(resume, run_dir, mopro, optimizer, scaler, device)

    # ------------------------------------------------------------------ Data
    loader_args = dict(shards=Path(cfg.data.shards), batch_size=cfg.loader.batch_size, workers=cfg.loader.workers,
                       rank=rank, world_size=world, device=device, channels_last=cfg.run.channels_last,
                       prefetch=cfg.loader.prefetch, hw_decoder_load=cfg.loader.hw_decoder_load)
    train_loader = build_train_loader(cfg.loader.backend, split=cfg.data.train_split,
                                      resolution=cfg.loader.resolution, shuffle_buffer=cfg.loader.shuffle_buffer,
                                      seed=cfg.run.seed, steps_per_epoch=derived.steps_per_epoch, **loader_args)
    eval_splits = [s for s in cfg.data.eval_splits if s in manifest.splits]
    eval_loaders = {s: build_eval_loader(cfg.loader.backend, split=s, resolution=cfg.loader.eval_resolution,
                                         resize=cfg.loader.eval_resize, **loader_args) for s in eval_splits}
    truth = None
    if cfg.data.truth:
        truth = truth_by_index(Path(cfg.data.shards), cfg.data.train_split, Path(cfg.data.truth)).to(device)

    # ------------------------------------------------------------------ Loop
    log = RunLog(run_dir, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard)
    results: dict[str, dict] = {}
    batches_per_epoch: list[int] = []  # this rank's, written to RUN/ranks/ (DDP needs them all equal)
    seen_images, start_time, wait_time = 0, time.perf_counter(), 0.0
    try:
        for epoch in range(pos.epoch, cfg.schedule.epochs):
            use_proto, clean = mopro_switches(cfg, epoch)
            train_loader.set_epoch(epoch, start_step=pos.step_in_epoch)
            sums: dict[str, Tensor] = {}
            window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            bar = _bar(progress and dist.is_main(), derived.steps_per_epoch, pos.step_in_epoch, epoch)
            batches, received = iter(train_loader), 0
            for step_in_epoch in range(pos.step_in_epoch, derived.steps_per_epoch):
                t0 = time.perf_counter()
                batch = next(batches, None)
                window_wait += time.perf_counter() - t0  # data wait (on CUDA a lower bound: kernels run async)
                if batch is None:  # a short rank would leave the others waiting in DDP forever
                    raise RuntimeError(f"rank {rank}: the {cfg.loader.backend} loader ended after {received} "
                                       f"batches of epoch {epoch}, expected {derived.steps_per_epoch - pos.step_in_epoch}")
                received += 1
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(derived, pos.global_step)
                metrics = train_step(cfg.mopro.enabled, step_fn, mopro, query, optimizer, scaler, autocast, batch,
                                     use_proto, clean, None if truth is None else truth[batch.index])
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0) + value.float()
                window_steps += 1
                pos.global_step += 1
                pos.step_in_epoch = step_in_epoch + 1
                seen_images += derived.global_batch
                last = pos.step_in_epoch == derived.steps_per_epoch
                save_now = bool(cfg.run.ckpt_every_steps) and pos.global_step % cfg.run.ckpt_every_steps == 0
                if window_steps == cfg.run.log_every or last or save_now:  # (a save needs a finite-loss check)
                    values = _reduce({k: v / window_steps for k, v in sums.items()})  # one sync per window
                    elapsed = time.perf_counter() - window_start
                    values.update(lr=optimizer.param_groups[0]["lr"],
                                  images_per_s=window_steps * derived.global_batch / max(elapsed, 1e-9),
                                  data_wait=window_wait / max(elapsed, 1e-9))
                    _check_finite(values, pos)
                    log.write("train", pos.global_step, epoch, values)
                    wait_time += window_wait
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.0f}",
                                        wait=f"{values['data_wait']:.0%}")
                    sums, window_start, window_wait, window_steps = {}, time.perf_counter(), 0.0, 0
                if bar is not None:
                    bar.update(1)
                if save_now and not last:  # the epoch's end saves anyway, after evaluation
                    _save(run_dir, cfg, pos, mopro, optimizer, scaler)
            if bar is not None:
                bar.close()
            batches_per_epoch.append(received)

            # ---- end of epoch: evaluation, checkpoint
            pos.epoch, pos.step_in_epoch = epoch + 1, 0
            final = pos.epoch == cfg.schedule.epochs
            if eval_loaders and ((epoch + 1) % cfg.run.eval_every == 0 or final):
                for split, loader in eval_loaders.items():
                    results[split] = evaluate(mopro.query, loader, autocast, device)
                log.write("eval", pos.global_step, epoch,
                          {f"{s}/{k}": v for s, r in results.items() for k, v in r.items() if k != "samples"})
                if dist.is_main():
                    print(f"epoch {epoch}: " + ", ".join(f"{s} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}"
                                                         for s, r in results.items()), flush=True)
            _save(run_dir, cfg, pos, mopro, optimizer, scaler)
    finally:
        log.close()

    # ------------------------------------------------------------------ Summary
    elapsed = time.perf_counter() - start_time
    summary = {"epochs": cfg.schedule.epochs, "global_step": pos.global_step, "eval": results,
               "images_per_s": seen_images / max(elapsed, 1e-9), "data_wait": wait_time / max(elapsed, 1e-9),
               "seconds": elapsed, "world_size": world, "device": str(device), "run_dir": str(run_dir)}
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "steps_per_epoch": derived.steps_per_epoch,
         "batches_per_epoch": batches_per_epoch}) + "\n")
    if dist.is_main():
        summary["noise"] = _last_noise_metrics(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        summary["plots"] = [str(p) for p in plot_run(run_dir)]
    dist.barrier()
    return summary


def _reduce(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean over ranks of each metric, as Python floats: one all-reduce and one host sync."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = dist.all_reduce_mean(torch.stack([values[k] for k in keys]))
    return dict(zip(keys, stacked.tolist()))


def _check_finite(values: dict[str, float], pos: Position) -> None:
    if not math.isfinite(values.get("loss", 0.0)):
        raise TrainingStopped(f"loss is {values['loss']} at epoch {pos.epoch} step {pos.global_step}; stopped "
                              f"without saving (the last good checkpoint stays); lower optim.lr or use run.precision=fp32")


def _save(run_dir: Path, cfg: Config, pos: Position, mopro: MoPro, optimizer, scaler) -> None:
    if dist.is_main():
        state = {"model": mopro.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step,
                 "rng": rng_state(), "config": cfg.to_dict(), "code_version": code_version()}
        save_checkpoint(run_dir, state, cfg.run.keep_last)
    dist.barrier()


def init_from(path: Path, mopro: MoPro) -> str:
    """Start from the model weights of a checkpoint (e.g. one made by `mopro-fast import`): every
    tensor whose name and shape match is copied; the others (a classifier and prototypes for another
    class count, a queue of another length) keep their fresh values. Optimiser, schedule and RNG
    start fresh. Returns a one-line note of what was taken."""
    from mopro_fast.checkpoint import CheckpointError

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


def _resume(resume: str, run_dir: Path, mopro: MoPro, optimizer, scaler, device) -> Position:
    if resume == "auto":
        found = find_resumable(run_dir, map_location=device)
        if found is None:
            if dist.is_main():
                print(f"resume auto: no usable checkpoint in {run_dir}; starting from scratch", flush=True)
            return Position()
        path, state = found
    else:
        path = Path(resume)
        state = load_checkpoint(path, map_location=device)
    if state.get("optimizer") is None:
        from mopro_fast.checkpoint import CheckpointError

        raise CheckpointError(f"{path}: holds weights only (imported?), nothing to resume; use --init {path}")
    mopro.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if dist.is_main():
        print(f"resumed from {path} (epoch {state['epoch']}, step {state['global_step']})", flush=True)
    return Position(state["epoch"], state["step_in_epoch"], state["global_step"])


def _bar(enabled: bool, total: int, start: int, epoch: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)


def _last_noise_metrics(run_dir: Path) -> dict:
    from mopro_fast.observe import read_log

    """Noise metrics averaged over the last epoch's training log (the model's final behaviour)."""
    train = [r for r in read_log(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    if not train:
        return {}
    last = [r for r in train if r["epoch"] == train[-1]["epoch"]]
    keys = ("frac_relabelled", "frac_ood", "noise_precision", "noise_recall")
    return {k: sum(r[k] for r in last) / len(last) for k in keys if k in last[0]}


