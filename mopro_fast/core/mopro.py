"""MoPro state: query and momentum networks, instance queue, prototypes, hyper-parameters
(DESIGN.md section 1; paper arXiv 2009.07995, section 3).

`MoPro` only holds state and the post-optimiser momentum update; the per-batch computation is
`mopro_fast.core.step.mopro_step`. Its `state_dict()` (the ordinary nn.Module one) covers the query
and key networks (parameters and BN statistics), the queue keys, the queue pointer and the
prototypes, so loading it into a fresh instance resumes bit for bit (with the optimiser state,
which the train loop saves next to it).

The parameters of `net` and of its key copy are re-pointed into one contiguous buffer per network
(`ema.FlatParameters`; values, strides and Parameter objects unchanged), so the momentum update is
a single kernel. `.to()` / channels-last conversion of the MoPro module re-flattens; state_dict
entries are views into those buffers, and `torch.save` writes each buffer once.

DDP: call `dist.broadcast_module_(mopro)` once after building (the queue starts random and the
key network is a copy made before DDP syncs the query), wrap only the query network
(`DDP(mopro.query)`) and pass the wrapper to `mopro_step` as `query_net`. From then on the key
network's parameters, the queue and the prototypes stay identical on every rank by construction
(same gathered inputs, deterministic updates), with no further broadcast.
"""

from __future__ import annotations

import copy

from torch import nn

from mopro_fast.core.ema import FlatParameters, ema_update, ema_update_flat
from mopro_fast.core.prototypes import Prototypes
from mopro_fast.core.queue import InstanceQueue


class MoPro(nn.Module):
    """MoPro state around a network `net` with `forward(images) -> (logits B x K, z B x d)`.

    Hyper-parameters (paper defaults): queue_length L = 8192, temperature T = 0.1, momentum
    m = 0.999 (key network), proto_momentum m_p = 0.999, alpha = 0.5, threshold = 0.8 (pseudo_th),
    w_inst = w_proto = 1, label_smoothing = 0 (of the classifier's cross-entropy; not in the paper).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        dim: int = 128,
        queue_length: int = 8192,
        temperature: float = 0.1,
        momentum: float = 0.999,
        proto_momentum: float = 0.999,
        alpha: float = 0.5,
        threshold: float = 0.8,
        w_inst: float = 1.0,
        w_proto: float = 1.0,
        ood_threshold: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.temperature = temperature
        self.momentum = momentum
        self.proto_momentum = proto_momentum
        self.alpha = alpha
        self.threshold = threshold
        self.w_inst = w_inst
        self.w_proto = w_proto
        self.ood_threshold = ood_threshold  # None = 1/K (paper); see core/noise.py
        self.label_smoothing = label_smoothing  # classifier's cross-entropy only (core/step.py, step 5)
        self.query = net
        # Same initial weights; never trained by the optimiser, only followed by EMA.
        self.key = copy.deepcopy(net).requires_grad_(False)
        self.queue = InstanceQueue(dim, queue_length)
        self.prototypes = Prototypes(num_classes, dim)
        self._flatten()

    def _flatten(self) -> None:
        """Put each network's parameters in one contiguous buffer, for a one-kernel EMA.

        Re-points the parameters of `net` (the caller's module) in place; values are unchanged.
        """
        flat_query, flat_key = FlatParameters.of(self.query), FlatParameters.of(self.key)
        if flat_query is None or flat_key is None or flat_query.layout != flat_key.layout:
            flat_query = flat_key = None  # momentum_update falls back to the foreach form
        self._flat_query, self._flat_key = flat_query, flat_key

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(), .cuda(), .half(), channels-last conversion give the parameters new storage.
        super()._apply(fn, recurse)
        self._flatten()
        return self

    def momentum_update(self, m: float | None = None) -> None:
        """Key network EMA; call right after `optimizer.step()` (it reads the new query weights).

        `m` overrides the constructor's momentum, e.g. from `ema.cosine_momentum(...)(step)`.
        One kernel over the flat buffers while the parameters still live in them, else one
        foreach call over the parameter lists (same result).
        """
        m = self.momentum if m is None else m
        flat_q, flat_k = self._flat_query, self._flat_key
        if flat_q is not None and flat_k is not None and flat_q.is_intact() and flat_k.is_intact():
            ema_update_flat(flat_k, flat_q, m)
        else:
            ema_update(self.key, self.query, m)
