"""Instance queue ring buffer vs a literal one-key-at-a-time ring buffer."""

from __future__ import annotations

import pytest
import torch

from mopro_fast.core.queue import InstanceQueue


class LiteralRing:
    """Push keys one at a time: slot[ptr] = key; ptr = (ptr + 1) % L."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.slots = [row.clone() for row in initial]
        self.ptr = 0

    def push(self, keys: torch.Tensor) -> None:
        for key in keys:
            self.slots[self.ptr] = key.clone()
            self.ptr = (self.ptr + 1) % len(self.slots)

    def keys(self) -> torch.Tensor:
        return torch.stack(self.slots)


@pytest.mark.parametrize(
    ("length", "batches"),
    [
        (10, [3] * 9),  # batch does not divide L: wraps mid-batch
        (12, [4] * 5),  # batch divides L
        (10, [25, 3, 10, 7]),  # batch > L (keeps the newest L), batch == L, mixed sizes
        (1, [2, 1, 3]),  # degenerate L
        (8192, [2048] * 5),  # paper sizes
    ],
)
def test_enqueue_matches_literal_ring(length, batches):
    torch.manual_seed(0)
    dim = 4
    queue = InstanceQueue(dim, length)
    ring = LiteralRing(queue.keys)
    for step, batch in enumerate(batches):
        keys = torch.randn(batch, dim) + step
        queue.enqueue(keys)
        ring.push(keys)
        assert torch.equal(queue.keys, ring.keys()), step
        assert int(queue.ptr) == ring.ptr, step


def test_initial_state_and_pointer_is_a_device_tensor():
    queue = InstanceQueue(16, 10)
    assert queue.keys.shape == (10, 16)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(10))
    assert queue.ptr.dtype == torch.long and queue.ptr.dim() == 0
    queue.enqueue(torch.ones(3, 16, dtype=torch.bfloat16))  # cast to the buffer dtype
    assert queue.keys.dtype == torch.float32 and int(queue.ptr) == 3
    assert torch.equal(queue.keys[:3], torch.ones(3, 16))
    names = dict(queue.named_buffers())
    assert set(names) == {"keys", "ptr"}  # both travel in state_dict
