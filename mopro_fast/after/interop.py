"""Checkpoints out and in: torchvision export, and import of the original MoPro layout.

Export (`mopro-fast export CKPT --to torchvision OUT.pt`): our encoder *is* a torchvision ResNet
with its fc replaced by an identity (mopro_fast/core/model.py), so its state dict already has
torchvision's key names; the export is that state dict, optionally with our classifier as `fc`.
`torchvision.models.resnet50().load_state_dict(sd, strict=False)` then reports exactly
`fc.weight` and `fc.bias` missing (or nothing, with the classifier). A `small_stem` model (3x3
stride-1 first conv, no max-pool) has no torchvision equivalent and is refused.

Import (`mopro-fast import SRC OUT.pt`): the checkpoints published with the original code
(github.com/salesforce/MoPro, `train.py`) are `{"epoch", "arch", "state_dict", "optimizer"}`,
the state dict of its DDP-wrapped `MoPro` module (`model.py`, `resnet.py`):

    module.encoder_q.{conv1,bn1,layer1..4}.*   trunk (torchvision's names)  -> query.encoder.*
    module.encoder_q.classifier.*              Linear(2048, K)              -> query.classifier.*
    module.encoder_q.fc1.* / fc2.*             projection Linear(2048, 2048) / Linear(2048, d)
                                               (ReLU between, L2-normalised) -> query.projection.0.* / .2.*
    module.encoder_k.*                         momentum copy, same names    -> key.*
    module.queue                               d x L (one key per column)   -> queue.keys, L x d
    module.queue_ptr                           (1,) long                    -> queue.ptr, 0-d
    module.prototypes                          K x d                        -> prototypes.weight

The architecture (ResNet-18/50, from the block type and counts), K, d, the projection width and
the queue length are read from the tensors and set in the config; the rest of the config comes
from a recipe. The original pools with AvgPool2d(7), which equals our adaptive average pool at
224 px input. The result is a mopro-fast checkpoint without optimiser state: `eval` and `clean`
take it as it is, `train RECIPE --init OUT.pt` fine-tunes from its weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from mopro_fast.errors import MoproError
from mopro_fast.training.checkpoint import CheckpointError

# (bottleneck?, blocks per stage) -> torchvision arch name
_ARCHS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
          (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}
_HEADS = {"classifier.": "classifier.", "fc1.": "projection.0.", "fc2.": "projection.2."}
_TRUNK = re.compile(r"(conv1|bn1|layer[1-4])\.")


class InteropError(MoproError, ValueError):
    """A checkpoint that cannot be exported or imported as asked; one line."""


# ---- export -------------------------------------------------------------------------------------

def torchvision_state_dict(model_state: dict[str, Tensor], small_stem: bool, with_classifier: bool = False,
                           network: str = "query") -> dict[str, Tensor]:
    """The `network` (query or key) encoder of a MoPro state dict as a torchvision ResNet state dict.

    Tensors are cloned, so the file holds only them (our parameters are views into one buffer).
    """
    if small_stem:
        raise InteropError("this model has model.small_stem=true (3x3 stride-1 stem, no max-pool), which "
                           "torchvision's ResNet does not have; only standard-stem models can be exported")
    prefix = f"{network}.encoder."
    out = {k[len(prefix):]: v.detach().clone().contiguous() for k, v in model_state.items() if k.startswith(prefix)}
    if not out:
        raise InteropError(f"no {prefix}* weights in the checkpoint")
    if with_classifier:
        out["fc.weight"] = model_state[f"{network}.classifier.weight"].detach().clone()
        out["fc.bias"] = model_state[f"{network}.classifier.bias"].detach().clone()
    return out


# ---- import -------------------------------------------------------------------------------------

def original_state_dict(raw) -> dict[str, Tensor]:
    """The MoPro state dict inside an original checkpoint (`state_dict` entry or the dict itself),
    with the DDP `module.` prefix removed."""
    if isinstance(raw, dict) and "model" in raw and "config" in raw:
        raise InteropError("this is already a mopro-fast checkpoint: eval, clean and train --init take it as it is")
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise InteropError("not an original MoPro checkpoint: no state_dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def infer_arch(state: dict[str, Tensor], branch: str = "encoder_q.") -> str:
    """ResNet depth from the trunk keys: block type (conv3 = bottleneck) and blocks per stage."""
    bottleneck = f"{branch}layer1.0.conv3.weight" in state
    blocks = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(branch)}layer{stage}\.(\d+)\.", k))}
        blocks.append(max(found) + 1 if found else 0)
    arch = _ARCHS.get((bottleneck, tuple(blocks)))
    if arch is None:
        raise InteropError(f"unknown ResNet layout ({'bottleneck' if bottleneck else 'basic'} blocks {blocks})")
    stem = state.get(f"{branch}conv1.weight")
    if stem is None or stem.shape[0] != 64 or stem.shape[-1] != 7:
        raise InteropError(f"stem {tuple(stem.shape) if stem is not None else None} is not a standard ResNet's "
                           f"64 x 3 x 7 x 7 (wide ResNets such as resnet50x2 are not supported)")
    return arch


def convert_original(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Original MoPro keys -> ours (module docstring's table). Returns (our model state, shapes)."""
    if "encoder_q.classifier.weight" not in state:
        raise InteropError("no encoder_q.classifier.weight: not an original MoPro state dict")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        branch, _, rest = key.partition(".")
        if branch in ("encoder_q", "encoder_k"):
            ours = "query." if branch == "encoder_q" else "key."
            head = next((h for h in _HEADS if rest.startswith(h)), None)
            if head is not None:
                out[ours + _HEADS[head] + rest[len(head):]] = value
            elif _TRUNK.match(rest):
                out[ours + "encoder." + rest] = value
            else:
                unknown.append(key)
        elif key == "queue":
            out["queue.keys"] = value.t().contiguous()  # d x L -> L x d
        elif key == "queue_ptr":
            out["queue.ptr"] = value.reshape(()).long()
        elif key == "prototypes":
            out["prototypes.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"{len(unknown)} keys of no known meaning, e.g. {unknown[0]!r}")
    if not any(k.startswith("key.") for k in out):  # a checkpoint without the momentum encoder
        out.update({"key." + k[len("query."):]: v.clone() for k, v in list(out.items()) if k.startswith("query.")})
    shapes = {"arch": infer_arch(state), "num_classes": state["encoder_q.classifier.weight"].shape[0],
              "proj_hidden": state["encoder_q.fc1.weight"].shape[0], "proj_dim": state["encoder_q.fc2.weight"].shape[0],
              "queue_size": state["queue"].shape[1] if "queue" in state else None}
    return out, shapes


def import_original(src: Path, recipe: Path, overrides: list[str] = ()) -> dict:
    """An original MoPro checkpoint -> a mopro-fast checkpoint state (no optimiser state).

    The config is `recipe` + `overrides`, with model.arch, small_stem, width, blurpool, proj_dim, proj_hidden,
    data.num_classes and mopro.queue_size set from the tensors.
    """
    from mopro_fast.training.checkpoint import code_version
    from mopro_fast.config import load_config
    from mopro_fast.core.model import MoProNet
    from mopro_fast.core.mopro import MoPro

    try:
        raw = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all unusable
        raise CheckpointError(f"{Path(src).name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    converted, shapes = convert_original(original_state_dict(raw))
    derived = [f"model.arch={shapes['arch']}", "model.small_stem=false", "model.width=64", "model.blurpool=false",
               f"model.proj_dim={shapes['proj_dim']}", f"model.proj_hidden={shapes['proj_hidden']}",
               f"data.num_classes={shapes['num_classes']}"]
    if shapes["queue_size"]:
        derived.append(f"mopro.queue_size={shapes['queue_size']}")
    cfg = load_config(recipe, [*overrides, *derived])
    net = MoProNet(shapes["num_classes"], cfg.model.arch, cfg.model.proj_dim, cfg.model.proj_hidden, False,
                   blurpool=False)  # the original code's ResNets have no blur
    mopro = MoPro(net, shapes["num_classes"], cfg.model.proj_dim, cfg.mopro.queue_size)
    fresh = mopro.state_dict()
    for key in ("queue.keys", "queue.ptr", "prototypes.weight"):  # absent: start fresh (zero prototypes)
        converted.setdefault(key, fresh[key])
    try:
        mopro.load_state_dict(converted)  # strict: every tensor has its place and shape
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InteropError(f"converted weights do not fit {cfg.model.arch}: {detail}") from None
    meta = raw if isinstance(raw, dict) else {}
    return {"model": mopro.state_dict(), "optimizer": None, "scaler": None, "rng": None,
            "epoch": 0, "step_in_epoch": 0, "global_step": 0, "config": cfg.to_dict(), "code_version": code_version(),
            "imported_from": {"path": str(src), "epoch": meta.get("epoch"), "arch": meta.get("arch"),
                              "layout": "salesforce/MoPro", **shapes}}
