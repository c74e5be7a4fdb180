"""Worker for tests/test_dist.py, run under `torchrun --nproc_per_node=2` (gloo, CPU).

Each rank saves what it ends with to `<out>/rank<r>.pt`; the test compares the ranks with each
other and with a single-process run on the concatenated global batch (built from the same
helpers, imported from this file). Three parts:
1. shuffle-BN: the shuffled shards and the restored order;
2. the state-update path alone (prototypes + queue) fed with identical z / labels / kept:
   BN-independent, compared bit for bit;
3. full `mopro_step`s with a BN-free network under DDP (the only part of a step that depends on
   how the batch is split is BN, so this one compares to the single-process run up to float
   rounding), then a resnet18 (with BN) under DDP, compared across ranks only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mopro_fast import dist
from mopro_fast.core.model import MoProNet
from mopro_fast.core.mopro import MoPro
from mopro_fast.core.prototypes import Prototypes
from mopro_fast.core.queue import InstanceQueue
from mopro_fast.core.step import mopro_step

WORLD = 2
LOCAL_BATCH = 4
CLASSES = 5
DIM = 8
QUEUE_LEN = 10  # not a multiple of the global batch (8): the ring buffer wraps mid-batch
UPDATE_STEPS = 5
FULL_STEPS = 4  # steps 0-1: clean=False; steps 2-3: clean=True with lr 0 (see full_step_plan)
IMAGE = 8
SHUFFLE_DRAWS = 5
MODEL_SEED = 1234


class TinyNet(nn.Module):
    """A BN-free stand-in for MoProNet: per-sample outputs do not depend on the batch split."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE * IMAGE, 32), nn.ReLU())
        self.classifier = nn.Linear(32, CLASSES)
        self.projection = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, DIM))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(images)
        return self.classifier(h), F.normalize(self.projection(h), dim=1)


def update_inputs(step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global (all ranks) z, labels, kept for part 2; few classes so labels repeat."""
    gen = torch.Generator().manual_seed(100 + step)
    n = WORLD * LOCAL_BATCH
    z = F.normalize(torch.randn(n, DIM, generator=gen), dim=1)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    kept = torch.rand(n, generator=gen) > 0.3
    return z, labels, kept


def full_step_inputs(step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global view_q, view_k, labels for part 3."""
    gen = torch.Generator().manual_seed(200 + step)
    n = WORLD * LOCAL_BATCH
    view_q = torch.randn(n, 3, IMAGE, IMAGE, generator=gen)
    view_k = view_q + 0.1 * torch.randn(n, 3, IMAGE, IMAGE, generator=gen)
    return view_q, view_k, torch.randint(0, CLASSES, (n,), generator=gen)


def full_step_plan(step: int) -> tuple[bool, bool, float]:
    """(use_proto_loss, clean, lr) of step `step`. Once cleaning starts, the per-rank mean over
    kept samples differs from the global one, so the gradients would too: lr 0 there keeps the
    comparison with one process exact in what it checks (the forward-driven state)."""
    return step >= 1, step >= 2, (0.1 if step < 2 else 0.0)


def build_tiny_mopro() -> MoPro:
    """The MoPro of part 3a; its initial state comes from the global RNG (seed it first)."""
    return MoPro(TinyNet(), CLASSES, dim=DIM, queue_length=QUEUE_LEN, momentum=0.9, threshold=0.3)


def run_full_steps(mopro: MoPro, query_net: nn.Module, shard: slice) -> list[dict[str, Tensor]]:
    """FULL_STEPS MoPro steps + SGD + EMA on this process's shard of each global batch."""
    opt = torch.optim.SGD(mopro.query.parameters(), lr=0.1, momentum=0.9)
    history = []
    for step in range(FULL_STEPS):
        use_proto, clean, lr = full_step_plan(step)
        for group in opt.param_groups:
            group["lr"] = lr
        view_q, view_k, labels = (t[shard] for t in full_step_inputs(step))
        loss, metrics = mopro_step(
            mopro, view_q, view_k, labels, use_proto_loss=use_proto, clean=clean, query_net=query_net
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mopro.momentum_update()
        history.append(metrics)
    return history


def state_of(mopro: MoPro) -> dict[str, Tensor]:
    return {
        "prototypes": mopro.prototypes.weight.clone(),
        "queue": mopro.queue.keys.clone(),
        "ptr": mopro.queue.ptr.clone(),
        **{f"query.{n}": p.detach().clone() for n, p in mopro.query.named_parameters()},
        **{f"key.{n}": p.detach().clone() for n, p in mopro.key.named_parameters()},
    }


def main(out_dir: Path) -> None:
    dist.init_from_env("gloo")
    rank, world = dist.rank(), dist.world_size()
    assert world == WORLD, world
    shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    result: dict[str, object] = {}

    # 1. Shuffle-BN on rows that name their global index, several draws (rank 0's permutation is
    # broadcast, so the per-rank seeds may differ; they do here on purpose).
    torch.manual_seed(rank)
    rows = torch.arange(WORLD * LOCAL_BATCH * 3, dtype=torch.float32).view(-1, 3)[shard]  # b x 3
    result["shuffled"], result["restored"] = [], []
    for _ in range(SHUFFLE_DRAWS):
        shuffled, unshuffle = dist.shuffle_batch(rows)
        result["shuffled"].append(shuffled)
        result["restored"].append(dist.unshuffle_batch(shuffled * 2 + 1, unshuffle))

    # 2. Update path alone.
    protos, queue = Prototypes(CLASSES, DIM), InstanceQueue(DIM, QUEUE_LEN)
    dist.broadcast_module_(queue)  # random initial keys: rank 0's everywhere
    result["queue_init"] = queue.keys.clone()
    for step in range(UPDATE_STEPS):
        z, labels, kept = (t[shard] for t in update_inputs(step))
        protos.update(dist.all_gather(z), dist.all_gather(labels), dist.all_gather(kept), 0.9)
        queue.enqueue(dist.all_gather(z))
    result["update"] = {"prototypes": protos.weight, "queue": queue.keys, "ptr": queue.ptr}

    # 3a. BN-free network, DDP. A different seed per rank on purpose: broadcast_module_ must give
    # every rank rank 0's initial state (which the single-process reference rebuilds).
    torch.manual_seed(MODEL_SEED + rank)
    mopro = dist.broadcast_module_(build_tiny_mopro())
    history = run_full_steps(mopro, DDP(mopro.query), shard)
    result["tiny"] = state_of(mopro)
    result["tiny_metrics"] = history

    # 3b. resnet18 small stem with BN, DDP: every rank must end with the same state.
    torch.manual_seed(MODEL_SEED + rank)
    net = MoProNet(CLASSES, "resnet18", dim=DIM, proj_hidden=16, small_stem=True)
    mopro = dist.broadcast_module_(MoPro(net, CLASSES, dim=DIM, queue_length=QUEUE_LEN))
    history = run_full_steps(mopro, DDP(mopro.query), shard)
    result["resnet"] = state_of(mopro)
    result["resnet_losses"] = torch.stack([m["loss"] for m in history])

    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
