"""All distributed logic of mopro-fast (DESIGN.md section 3, "all rank logic lives in one module").

With one process (no process group initialised) every helper is the identity or a local no-op,
so every MoPro code path runs single-process on a CPU in tests; under `torchrun` the same calls
use torch.distributed (NCCL on GPUs, gloo on CPUs).

Shuffle-BN (DESIGN.md section 1 step 1; MoCo section 3.3, used by MoPro section 3.1): BatchNorm
statistics computed on a rank's own batch let the key encoder leak which samples sit together,
so the key forward runs on a random permutation of the *global* batch spread over the ranks, and
its output is put back in the original order. Every rank must hold the same number of samples
(the loaders guarantee equal batches per rank).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


# torch 2.14 renamed all_gather_into_tensor (deprecated) to all_gather_single; torch >= 2.4 works.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """Rank on this node, as set by torchrun (0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (`--max-restarts`): 0 on the first
    attempt and without torchrun. torchrun sets TORCHELASTIC_RESTART_COUNT in every worker."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun; returns whether it did.

    The backend defaults to NCCL when CUDA is available, gloo otherwise. With NCCL the current
    CUDA device is set to the local rank first, so collectives run on this process's GPU.
    """
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    attempt = restart_count()
    if attempt and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's c10d rendezvous shares one TCPStore with the workers and keeps it across restarts:
        # a restarted group would read the dead attempt's peer addresses from it and fail to connect
        # (pytorch/pytorch#135712). Each attempt's process group gets its own key prefix instead. (With
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which multi-node launches set, every attempt has a fresh store.)
        store, rank_, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=dist.PrefixStore(f"mopro-attempt-{attempt}", store), rank=rank_,
                                world_size=world)
    else:
        dist.init_process_group(backend)
    return True


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather(x: Tensor) -> Tensor:
    """Concatenate `x` (b x ...) from every rank along dim 0 in rank order: (W*b) x ...

    No gradient flows back. The identity (a detached view) in one process. Shapes must match
    across ranks.
    """
    if world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)
    return out


@torch.no_grad()
def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    """In place: every rank gets rank `src`'s `x`. No-op in one process."""
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """In place: every parameter and buffer of `module` from rank `src` (once, after building).

    DDP only syncs the network it wraps; the key network, the randomly initialised queue and the
    prototypes must start identical too, or the ranks' states never agree. No-op in one process.
    """
    if world_size() > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)
    return module


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks, as a new tensor (metrics and eval counts, not per step)."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over ranks, as a new tensor (metrics, every N steps, not per step)."""
    return all_reduce_sum(x).div_(world_size())


def any_true(*flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
    """Each flag, true if it is true on any rank (e.g. a stop signal seen by one rank): one small
    all-reduce and a host sync, so the loop calls it once per log window, not per step. The
    identity in one process."""
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def broadcast_error(message: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank, so a check done by rank 0 alone (the run
    folder) stops every rank with the same line instead of leaving them waiting."""
    if world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (e.g. around checkpoint writes). No-op in one process."""
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN, first half: this rank's share of a random permutation of the global batch.

    x: b x ... (local). Returns (x_shuffled b x ..., unshuffle W*b), the second to be given to
    `unshuffle_batch`. Rank 0 draws the permutation and broadcasts it so all ranks agree. In one
    process the permutation is the identity (BN over the whole batch cannot cheat there) but the
    same code runs.
    """
    gathered = all_gather(x)  # (W*b) x ...
    total = gathered.shape[0]
    if world_size() == 1:
        perm = torch.arange(total, device=x.device)  # W*b
    else:
        perm = broadcast_(torch.randperm(total, device=x.device))  # W*b
    unshuffle = torch.argsort(perm)  # W*b: inverse permutation
    mine = perm.view(world_size(), -1)[rank()]  # b: global indices this rank encodes
    return gathered.index_select(0, mine), unshuffle


@torch.no_grad()
def unshuffle_batch(x: Tensor, unshuffle: Tensor) -> Tensor:
    """Shuffle-BN, second half: outputs (b x ..., shuffled order) back to this rank's samples."""
    gathered = all_gather(x)  # (W*b) x ..., in shuffled global order
    mine = unshuffle.view(world_size(), -1)[rank()]  # b
    return gathered.index_select(0, mine)
