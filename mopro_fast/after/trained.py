"""A trained checkpoint, ready to run: its config (with overrides), query network and prototypes.

What `eval`, `clean`, `retrain` and `export` share: load a mopro-fast checkpoint, rebuild the
query network f_q (encoder + classifier + projection head, DESIGN.md section 1) with the stored
architecture, and take the class prototypes C (K x d) from the MoPro state. The network comes
back in eval mode (BatchNorm uses its running statistics), on the config's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mopro_fast.training.checkpoint import CheckpointError, load_checkpoint
from mopro_fast.config import Config, config_from_dict
from mopro_fast.core.model import MoProNet

QUERY, PROTOTYPES = "query.", "prototypes.weight"


@dataclass
class Trained:
    path: Path
    state: dict  # the whole checkpoint (model state on the CPU)
    cfg: Config  # stored config with the caller's overrides
    net: MoProNet  # query network, eval mode, on `device`
    prototypes: Tensor  # K x d on `device`
    device: torch.device

    @property
    def num_classes(self) -> int:
        return self.net.num_classes


def build_net(cfg: Config, model_state: dict[str, Tensor]) -> MoProNet:
    """The query network of `cfg`'s architecture with the `query.*` weights of a MoPro state dict.

    The class count comes from the stored classifier, so a checkpoint is self-describing.
    """
    if f"{QUERY}classifier.weight" not in model_state:
        raise CheckpointError("checkpoint has no query.classifier.weight: not a mopro-fast model state")
    num_classes = model_state[f"{QUERY}classifier.weight"].shape[0]
    net = MoProNet(num_classes, cfg.model.arch, cfg.model.proj_dim, cfg.model.proj_hidden, cfg.model.small_stem,
                    cfg.model.width, cfg.model.blurpool)
    query = {k[len(QUERY):]: v for k, v in model_state.items() if k.startswith(QUERY)}
    try:
        net.load_state_dict(query)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ").replace("\t", "")[:200]
        raise CheckpointError(f"the weights do not fit model {cfg.model.arch} (small_stem={cfg.model.small_stem}, "
                              f"proj_dim={cfg.model.proj_dim}, proj_hidden={cfg.model.proj_hidden}): {first}") from None
    return net


def load_trained(checkpoint: Path, overrides: list[str] = (), device: torch.device | None = None) -> Trained:
    """Checkpoint -> config (stored + overrides), query network in eval mode, prototypes, device."""
    from mopro_fast.training import runtime

    state = load_checkpoint(Path(checkpoint))
    cfg = config_from_dict(state["config"], list(overrides))
    device = device or runtime.pick_device(cfg.run.device)
    net = build_net(cfg, state["model"]).to(device).eval()
    if cfg.run.channels_last:
        net.to(memory_format=torch.channels_last)
    protos = state["model"].get(PROTOTYPES)
    if protos is None:
        raise CheckpointError(f"{Path(checkpoint).name}: no prototypes in the checkpoint")
    return Trained(Path(checkpoint), state, cfg, net, protos.to(device), device)


# ----------------------------------------------------------------------------------- outputs

def torch_bytes(obj) -> bytes:
    """`torch.save(obj)` into memory: the exact bytes (and size) of the file before any is written."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_outputs(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write `files` (name -> bytes) into `folder`, each atomically, after checking they all fit.

    The space check comes first, so a full disk leaves every previous output as it was (not the
    first file new and the rest old); a failure after it (a quota, a race) still removes the
    temporary file and keeps that file's previous content. Raises `OutputError` (one line).
    """
    import errno

    from mopro_fast.safe_io import OutputError, atomic_write_bytes, describe, free_bytes

    folder = Path(folder)
    needed = sum(len(data) for data in files.values())  # each new file is written beside its old one
    free = free_bytes(folder)
    if free is not None and needed > free:
        raise OutputError(describe(OSError(errno.ENOSPC, "No space left on device"), folder, needed=needed))
    return [atomic_write_bytes(folder / name, data) for name, data in files.items()]
