"""The run's execution settings, each one visible: device, precision, seeds, backend switches.

Every performance switch of STYLE.md point 7 is set here, from the recipe, in one place:
channels-last (applied where the model and batches are built), bf16 autocast (GradScaler only
for fp16), cudnn benchmark, TF32, deterministic algorithms for exact-resume tests.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from mopro_fast import dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(choice: str) -> torch.device:
    """`auto`: this rank's GPU under torchrun when CUDA is there, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from mopro_fast.config import ConfigError

        raise ConfigError("run.device: cuda, but no CUDA device is visible here; use run.device=auto or cpu")
    device = torch.device("cuda", dist.local_rank())
    torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes; fp32 is a plain no-op context."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # Loss scaling only protects fp16 gradients from underflow; bf16 has fp32's exponent range.
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_backends(device: torch.device, cudnn_benchmark: bool, tf32: bool, deterministic: bool) -> None:
    if deterministic:
        # Exact resume and rank-count comparisons need bit-reproducible kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def decay_groups(module: torch.nn.Module, no_bn_weight_decay: bool):
    """What the optimiser gets for `module`: its parameters as they are (one group, the recipe's
    weight decay), or with `no_bn_weight_decay` two groups: the weight matrices and kernels (decayed),
    then every 1-d parameter, i.e. BatchNorm weights and biases and every bias (weight decay 0; as in
    Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 5.1, and FFCV's rn50 recipes)."""
    if not no_bn_weight_decay:
        return module.parameters()
    params = list(module.parameters())
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def sgd(params, lr: float, momentum: float, weight_decay: float, nesterov: bool, impl: str,
        device: torch.device) -> torch.optim.SGD:
    """SGD with the fastest available implementation: fused on CUDA, foreach elsewhere. `params`: an
    iterable of parameters or of param groups (`decay_groups`); `weight_decay` is every group's default."""
    kwargs = {}
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **kwargs)
