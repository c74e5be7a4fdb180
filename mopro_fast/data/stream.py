"""Who reads which samples: the per-epoch sample plan shared by the loader backends.

No I/O and no torch here; everything is a pure function of its arguments, so each rank and each
worker computes its own share without talking to the others (no process-group calls).

Training (`train_window`). The shards of a split, in an order shuffled per epoch and "pass" with
a seed from (seed, epoch, pass) only (so every rank agrees), are laid end to end into one virtual
stream; pass p+1 follows pass p with a fresh order, so the stream never ends. Every (rank, worker)
slot owns one contiguous window of that stream:
- slot j = rank * W + w (W = max(workers, 1) workers per rank) must deliver a quota of
  `q_j = batch_size * (number of steps s < steps with s % W == w)` samples: worker w makes the
  batches of steps w, w + W, w + 2W, ... so a DataLoader's round-robin returns steps in order
  and every rank gets exactly `steps` batches;
- with Q = sum of quotas and N samples in the split, the windows cut [0, max(N, Q)) in
  proportion to the quotas. Each window holds at least its quota; when Q <= N (the default
  steps per epoch) the windows are disjoint and lie within one pass, so no sample repeats
  within an epoch and the N - Q leftovers (at most about B per slot) differ from epoch to
  epoch; when Q > N the extra samples come from the next pass.
Windows are cut at sample, not shard, granularity: uneven shards and fewer shards than slots
cost nothing but reading a boundary shard twice (each reader skips the other's part without
decoding). A slot reads its window, passes it through a shuffle buffer seeded per
(seed, epoch, rank, world size, W, worker), and keeps the first q_j samples.

Evaluation (`eval_window`): shards in manifest order, rank r takes [N r / R, N (r+1) / R), split
again among its workers: every sample once across all ranks, in a fixed order.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
_MASK = (1 << 64) - 1

# Stream tags keep the seeds of different random sources apart.
TAG_SHARDS, TAG_BUFFER, TAG_VIEWS = 1, 2, 3


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (SplitMix64 finaliser chained over the parts): stable everywhere."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h


@dataclass(frozen=True)
class Piece:
    """Samples [lo, hi) of shard number `shard` (position in the manifest's list)."""

    shard: int
    lo: int
    hi: int


def shard_order(num_shards: int, seed: int, epoch: int, pass_index: int) -> list[int]:
    """The shard order of one pass of one epoch; the same on every rank and worker."""
    order = list(range(num_shards))
    random.Random(mix_seed(seed, epoch, pass_index, TAG_SHARDS)).shuffle(order)
    return order


def pieces(sizes: Sequence[int], start: int, end: int, order_of_pass: Callable[[int], Sequence[int]]) -> list[Piece]:
    """The shard pieces holding positions [start, end) of the virtual stream."""
    total = sum(sizes)
    if total <= 0:
        raise ValueError("cannot plan over a split with no samples")
    out: list[Piece] = []
    pos = start
    while pos < end:
        pass_index, offset = divmod(pos, total)
        order = list(order_of_pass(pass_index))
        bounds = list(itertools.accumulate(sizes[s] for s in order))  # end offset of each shard in the pass
        k = bisect.bisect_right(bounds, offset)  # the shard holding `offset`
        while pos < end and k < len(order):
            shard_start = bounds[k] - sizes[order[k]]
            lo = offset - shard_start
            hi = min(sizes[order[k]], lo + end - pos)
            if hi > lo:
                out.append(Piece(order[k], lo, hi))
            pos += hi - lo
            offset += hi - lo
            k += 1
    return out


def batches_of_worker(steps: int, workers: int, worker: int) -> int:
    """How many of the steps 0..steps-1 worker `worker` makes (it makes s with s % workers == worker)."""
    return len(range(worker, steps, workers))


def train_window(num_samples: int, batch_size: int, steps: int, rank: int, world_size: int,
                 workers: int, worker: int) -> tuple[int, int, int]:
    """(start, end, quota) of slot (rank, worker) in the virtual stream; see the module docstring."""
    quotas = [batch_size * batches_of_worker(steps, workers, w) for w in range(workers)] * world_size
    j = rank * workers + worker
    total_quota = sum(quotas)
    span = max(num_samples, total_quota)
    before = sum(quotas[:j])
    # floor(span * C / Q) boundaries: window length >= quota since span >= Q.
    start = span * before // total_quota
    end = span * (before + quotas[j]) // total_quota
    return start, end, quotas[j]


def eval_window(num_samples: int, rank: int, world_size: int, workers: int, worker: int) -> tuple[int, int]:
    """[start, end) of the eval samples (manifest order) read by (rank, worker): disjoint, covering."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    n = hi - lo
    return lo + n * worker // workers, lo + n * (worker + 1) // workers


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a buffer of `size` items: fill it, then emit a random slot and refill it.

    Items travel at most about `size` positions further than without it; memory is `size` items.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
