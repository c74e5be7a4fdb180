"""Data loading: one Batch contract, several backends (DESIGN.md section 3).

`build_train_loader(backend, **kwargs)` / `build_eval_loader(backend, **kwargs)` import the
backend module only when asked, so heavy optional dependencies (DALI, FFCV) are never imported
unless that backend is used. Each backend module exposes `TrainLoader` and `EvalLoader` classes
taking the keyword arguments of `torch_loader.TorchTrainLoader` / `TorchEvalLoader`.
A backend that is unknown or cannot be imported raises `BackendUnavailable` with one line saying
what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from mopro_fast.data.batch import Batch, EvalBatch

# backend name -> (module, what to install when it cannot be imported)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("mopro_fast.data.torch_loader", "pip install -e . (torch, torchvision, webdataset)"),
    "dali": ("mopro_fast.data.dali_loader", "pip install nvidia-dali-cuda130 (or pip install -e .[dali])"),
    "ffcv": ("mopro_fast.data.ffcv_loader",
             "apt-get install pkg-config libopencv-dev libturbojpeg0-dev, then pip install -e .[ffcv]"),
    "nvjpeg": ("mopro_fast.data.nvjpeg_loader", "pip install -e . (torch, torchvision, webdataset; a CUDA build for GPU decoding)"),
}


class BackendUnavailable(RuntimeError):
    """The loader backend asked for cannot be used here; the message says what to install."""


def _backend(name: str) -> Any:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown loader backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module, hint = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # our own module is missing, not the library it needs
            raise BackendUnavailable(f"loader backend {name!r} is not part of this mopro-fast version yet; "
                                     f"use loader.backend=torch") from None
        raise BackendUnavailable(f"loader backend {name!r} is not available ({exc}); install: {hint}") from None
    except ImportError as exc:
        raise BackendUnavailable(f"loader backend {name!r} is not available ({exc}); install: {hint}") from None


def build_train_loader(backend: str, **kwargs: Any):
    """The training loader of `backend`: iterates `Batch`es, `steps_per_epoch` per epoch."""
    return _backend(backend).TrainLoader(**kwargs)


def build_eval_loader(backend: str, **kwargs: Any):
    """The evaluation loader of `backend`: iterates `EvalBatch`es, each sample once over all ranks."""
    return _backend(backend).EvalLoader(**kwargs)


__all__ = ["BACKENDS", "Batch", "BackendUnavailable", "EvalBatch", "build_eval_loader", "build_train_loader"]
