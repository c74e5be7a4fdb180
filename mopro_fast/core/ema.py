"""Momentum (key) encoder update (DESIGN.md section 1; paper arXiv 2009.07995, section 3.1).

After every optimiser step the key network follows the query network:
`theta_k <- m * theta_k + (1 - m) * theta_q`, m = 0.999, over all *parameters*. Buffers are not
copied: the key network's BatchNorm running statistics come from its own forward passes in
train mode, as in MoCo/MoPro.

Two fused forms, both `lerp_(k, q, w) = k + w * (q - k)` with w = 1 - m (one read of k and q,
one write of k, no temporaries; the original loop makes three kernels and three temporaries per
parameter):
- `ema_update(key, query, m)`: one `torch._foreach_lerp_` over the two parameter lists, for any
  pair of modules (a few multi-tensor kernels on CUDA);
- `FlatParameters` + `ema_update_flat`: when every parameter of each network lives in one
  contiguous buffer (same order, same layout), the update is a single `lerp_` over the buffers.
  On a CPU that is one parallel region instead of one per tensor, which matters on a few shared
  cores (a per-tensor barrier waits for every thread to be scheduled); `MoPro` uses it.
`ema_update_reference` is the original per-parameter loop, kept for the oracle test and the
benchmark.

DDP: pass the *unwrapped* query module (`ddp.module`); its parameters are the ones the optimiser
updates, identical on every rank after the all-reduce, so every rank's key net stays identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

MomentumSchedule = Callable[[int], float]


def param_lists(key: nn.Module, query: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Matching parameter lists of the key and query networks (same architecture)."""
    key_params = list(key.parameters())
    query_params = list(query.parameters())
    if len(key_params) != len(query_params):
        raise ValueError("key and query networks have different parameter lists")
    return key_params, query_params


@torch.no_grad()
def ema_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """`k <- m * k + (1 - m) * q` for every parameter, in one foreach call."""
    key_params, query_params = param_lists(key, query)
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)


class FlatParameters:
    """Re-points every parameter of `module` into one contiguous buffer (values and strides kept).

    Build it with `FlatParameters.of(module)`, which returns None when the parameters cannot share
    one buffer (mixed dtypes or devices, or a layout that is neither contiguous nor channels-last).
    The parameters stay the same `nn.Parameter` objects (optimiser, DDP and state_dict are
    unaffected; `load_state_dict` copies into them). Moving the module (`.to()`) gives it new
    storage: build a new FlatParameters after that (`MoPro` does it in `_apply`). `is_intact()`
    tells whether the parameters still point into the buffer; a parameter *object* replaced by
    assignment is not seen.
    """

    def __init__(self, buffer: Tensor, params: list[Tensor], layout: tuple) -> None:
        self.buffer = buffer  # N: all parameters, back to back
        self.params = params
        self.layout = layout  # ((shape, stride), ...) per parameter, to check two nets match
        self._ptrs = tuple(p.data_ptr() for p in params)

    @classmethod
    @torch.no_grad()
    def of(cls, module: nn.Module) -> FlatParameters | None:
        params = list(module.parameters())
        if not params or not all(_flattenable(p, params[0]) for p in params):
            return None
        buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                             device=params[0].device)
        offset = 0
        for p in params:
            view = buffer.as_strided(p.shape, p.stride(), offset)  # dense: spans numel elements
            view.copy_(p)
            p.data = view
            offset += p.numel()
        return cls(buffer, params, tuple((tuple(p.shape), p.stride()) for p in params))

    def is_intact(self, full: bool = False) -> bool:
        """The parameters still live in the buffer (a host check, no device sync).

        The default looks at the first and last parameter only: O(1) per train step instead of a
        Python loop over every parameter. What moves storage (`.to()`, a `.data =` loop such as
        the original update) moves them all; `full=True` checks every parameter.
        """
        pairs = zip(self.params, self._ptrs) if full else ((self.params[i], self._ptrs[i]) for i in (0, -1))
        return all(p.data_ptr() == ptr for p, ptr in pairs)


def _flattenable(p: Tensor, first: Tensor) -> bool:
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return dense and p.dtype == first.dtype and p.device == first.device


@torch.no_grad()
def ema_update_flat(key: FlatParameters, query: FlatParameters, m: float) -> None:
    """`k <- m * k + (1 - m) * q` as one kernel over the two flat buffers (same layout)."""
    key.buffer.lerp_(query.buffer, 1.0 - m)


@torch.no_grad()
def ema_update_reference(key: nn.Module, query: nn.Module, m: float) -> None:
    """The literal per-parameter loop of the original MoCo/MoPro code (baseline, oracle)."""
    for param_k, param_q in zip(key.parameters(), query.parameters()):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


def cosine_momentum(base_m: float, total_steps: int) -> MomentumSchedule:
    """Cosine ramp from `base_m` at step 0 to 1 at `total_steps` (BYOL-style; optional, the
    paper keeps m constant). Use as `mopro.momentum_update(schedule(step))`.

    `m(t) = 1 - (1 - base_m) * (cos(pi * t / T) + 1) / 2`, clamped to t <= T.
    """

    def schedule(step: int) -> float:
        t = min(max(step, 0), total_steps) / max(total_steps, 1)
        return 1.0 - (1.0 - base_m) * (math.cos(math.pi * t) + 1.0) / 2.0

    return schedule
