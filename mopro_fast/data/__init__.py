"""Data loading: one Batch contract, several backends (DESIGN.md section 3).

`build_train_loader(backend, spec, split, resolution, ...)` / `build_eval_loader(backend, spec,
split, resolution, resize, ...)` import the backend module only when asked, so heavy optional
dependencies (DALI, FFCV) are never imported unless that backend is used. Each backend module
exposes `TrainLoader` and `EvalLoader`, subclasses of base.py's `TrainLoaderBase` /
`EvalLoaderBase` (the interface, its capabilities and the units of `workers` and `prefetch`).
A backend that is unknown or cannot be imported raises `BackendUnavailable` with one line saying
what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from mopro_fast.errors import MoproError
from mopro_fast.data.base import LoaderSpec, backend_options, loader_spec
from mopro_fast.data.batch import Batch, EvalBatch
from mopro_fast.data.options import make_options, option_names

# backend name -> (module, what to install when it cannot be imported)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("mopro_fast.data.torch_loader", "pip install -e . (torch, torchvision, webdataset)"),
    "dali": ("mopro_fast.data.dali_loader", "pip install nvidia-dali-cuda130 (or pip install -e .[dali])"),
    "ffcv": ("mopro_fast.data.ffcv_loader",
             "apt-get install pkg-config libopencv-dev libturbojpeg0-dev, then pip install -e .[ffcv]"),
    "nvjpeg": ("mopro_fast.data.nvjpeg_loader", "pip install -e . (torch, torchvision, webdataset; a CUDA build for GPU decoding)"),
}


class BackendUnavailable(MoproError, RuntimeError):
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


def _spec_and_options(module: Any, cls_name: str, spec: LoaderSpec | None, options: Any,
                      kwargs: dict[str, Any]) -> tuple[LoaderSpec, Any]:
    """The keyword form (spec fields and option names as keywords, as before the spec existed)."""
    cls = getattr(module, cls_name)
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in option_names()}
    if spec is None:
        fields = LoaderSpec.__dataclass_fields__
        spec = LoaderSpec(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    if options is None and opts:
        options = make_options(cls.Options, opts)
    return spec, options


def build_train_loader(backend: str, spec: LoaderSpec | None = None, *, split: str = "train",
                       resolution: int = 224, steps_per_epoch: int | None = None, options: Any = None, **kwargs: Any):
    """The training loader of `backend`: iterates `Batch`es, `steps_per_epoch` per epoch.

    `options`: the backend's own (`cfg.loader.dali` for dali; see options.py). Without a spec, its
    fields (and option names) may be given as keywords instead.
    """
    module = _backend(backend)
    spec, options = _spec_and_options(module, "TrainLoader", spec, options, kwargs)
    return module.TrainLoader(spec, split, resolution, steps_per_epoch=steps_per_epoch, options=options, **kwargs)


def build_eval_loader(backend: str, spec: LoaderSpec | None = None, *, split: str = "val", resolution: int = 224,
                      resize: int = 256, options: Any = None, **kwargs: Any):
    """The evaluation loader of `backend`: iterates `EvalBatch`es, each sample once over all ranks."""
    module = _backend(backend)
    spec, options = _spec_and_options(module, "EvalLoader", spec, options, kwargs)
    return module.EvalLoader(spec, split, resolution, resize, options=options, **kwargs)


__all__ = ["BACKENDS", "Batch", "BackendUnavailable", "EvalBatch", "LoaderSpec", "backend_options",
           "build_eval_loader", "build_train_loader", "loader_spec"]
