"""Epoch bookkeeping shared by every training loader: steps per epoch and where an epoch starts.

Every rank must run the same number of batches per epoch (or DDP waits forever), so the count is
decided here, once, from the data and the global batch, not by whichever rank runs dry first.
"""

from __future__ import annotations


def check_loader_args(batch_size: int, resolution: int, workers: int, rank: int, world_size: int) -> None:
    """The arguments every loader backend shares, checked the same way (one-line ValueError)."""
    if batch_size < 1 or resolution < 1 or workers < 0:
        raise ValueError(f"need batch_size >= 1, resolution >= 1, workers >= 0; "
                         f"got {batch_size}, {resolution}, {workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class EpochPlan:
    """Mixin: `steps_per_epoch`, `set_epoch(epoch, start_step)` and `len()` of the rest of the epoch."""

    def _plan_epochs(self, num_samples: int, batch_size: int, world_size: int, steps_per_epoch: int | None) -> None:
        default = max(1, num_samples // (batch_size * world_size))  # drop_last over the global batch
        self._steps = default if steps_per_epoch is None else int(steps_per_epoch)
        if self._steps < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields steps `start_step .. steps_per_epoch - 1` of `epoch`."""
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start_step {start_step} is not in [0, {self._steps}]")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self._steps - self.start_step
