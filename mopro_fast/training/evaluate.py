"""Top-1 / top-5 evaluation of the classifier, correct across ranks.

Each rank evaluates its disjoint share of a split (the eval loaders cover every sample exactly
once, no padding), then the correct counts and the sample counts are summed over ranks: accuracy
is total correct / total samples, so uneven shares are not double counted or averaged wrongly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from mopro_fast import dist


@torch.no_grad()
def evaluate(net: nn.Module, batches: Iterable, autocast: contextlib.AbstractContextManager | None = None,
             device: torch.device | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) of `net` (forward -> (logits, z)) over EvalBatches; all ranks must call it."""
    was_training = net.training
    net.eval()
    counts = None  # [correct top-1, correct top-5, samples], accumulated on the device
    for batch in batches:
        with autocast or contextlib.nullcontext():
            logits, _ = net(batch.image)  # b x K
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices  # b x k
        hit = top.eq(batch.label[:, None])  # b x k
        step = torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                            torch.tensor(hit.shape[0], device=hit.device)]).double()
        counts = step if counts is None else counts + step
    if counts is None:
        counts = torch.zeros(3, dtype=torch.float64, device=device or torch.device("cpu"))
    counts = dist.all_reduce_sum(counts)  # 3
    net.train(was_training)
    top1, top5, n = counts.tolist()  # one sync, at the end of evaluation
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "samples": int(n)}


def evaluate_checkpoint(checkpoint: Path, overrides: list[str], splits: list[str] | None = None) -> dict:
    """Evaluate a training checkpoint's query network on the eval splits of its (overridden) config.

    Works in one process and under torchrun; the result is the same whatever the number of ranks.
    """
    from mopro_fast.training import runtime
    from mopro_fast.data import backend_options, build_eval_loader, loader_spec
    from mopro_fast.data.manifest import ManifestError, read_manifest
    from mopro_fast.after.trained import load_trained

    dist.init_from_env()
    trained = load_trained(Path(checkpoint), overrides)  # query network in eval mode, on the config's device
    cfg, net, device = trained.cfg, trained.net, trained.device
    manifest = read_manifest(cfg.data.shards)
    if manifest.num_classes != trained.num_classes:
        raise ManifestError(f"{cfg.data.shards} has {manifest.num_classes} classes, the checkpoint's classifier "
                         f"{trained.num_classes}: wrong shards (set data.shards=...)")
    results = {}
    for split in splits or [s for s in cfg.data.eval_splits if s in manifest.splits]:
        loader = build_eval_loader(cfg.loader.backend, loader_spec(cfg, dist.rank(), dist.world_size(), device),
                                   split=split,
                                   resolution=cfg.loader.eval_resolution, resize=cfg.loader.eval_resize,
                                   options=backend_options(cfg, cfg.loader.backend))
        results[split] = evaluate(net, loader, runtime.autocast(device, cfg.run.precision), device)
    return {"checkpoint": str(checkpoint), "world_size": dist.world_size(), "eval": results}
