"""Frozen encoder features for the transfer evaluations, computed once and cached in the output folder.

The protocol of the original `lowshot_svm.py`: the encoder in eval mode (BatchNorm running statistics),
the evaluation view (resize the shorter side, centre crop: `mopro_fast.views.cpu.eval_view`, the trainer's
own; the checkpoint's `loader.eval_resize` / `loader.eval_resolution`, 256 / 224 in the paper recipes),
ImageNet normalisation, the pooled trunk feature h (2048-d for ResNet-50), L2-normalised as the original
does (`h / (|h| + 1e-5)`).

Three encoders are compared in one report (`Encoder`): the checkpoint's, the same architecture randomly
initialised (seeded: the chance floor), and an optional reference (a mopro-fast checkpoint, or a
torchvision ResNet state dict such as an ImageNet-supervised one).

Images are decoded with PIL; one that cannot be read (missing, empty, truncated, not an image) is counted
and skipped: its index is returned in `bad` and never used. `FeatureCache` keeps the rows computed so far
for one (encoder, split, view) in OUT/features/, so a second report, another k or another draw computes
only the images it has not seen (Places205 needs only the sampled training images, not its 2.4 M).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mopro_fast.transfer.datasets import Listing, TransferError


@dataclass
class Encoder:
    """A frozen feature extractor: `net.features(images) -> B x F` in eval mode on `device`."""

    name: str  # checkpoint | random | reference
    source: str  # what it was made from, for the report
    net: nn.Module
    fingerprint: str  # changes when the weights may have changed (path, size, mtime; or the random seed)


def _file_tag(path: Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def checkpoint_encoder(checkpoint: Path, overrides: list[str] = ()):
    """(Encoder, its Trained) for a mopro-fast checkpoint; the config's eval view and device are used."""
    from mopro_fast.after.trained import load_trained

    trained = load_trained(Path(checkpoint), list(overrides))
    return Encoder("checkpoint", str(checkpoint), trained.net, _file_tag(checkpoint)), trained


def random_encoder(cfg, device: torch.device, seed: int = 0) -> Encoder:
    """The checkpoint's architecture with the seeded initialisation of a fresh run (the chance floor)."""
    from mopro_fast.core.model import MoProNet

    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MoProNet(1, m.arch, m.proj_dim, m.proj_hidden, m.small_stem, m.width, m.blurpool)
    tag = f"random:{m.arch}:{m.width}:{m.small_stem}:{m.blurpool}:seed{seed}"
    return Encoder("random", f"{m.arch} (width {m.width}), random init seed {seed}", _ready(net, cfg, device), tag)


def reference_encoder(path: Path, cfg, device: torch.device) -> Encoder:
    """`--reference`: a mopro-fast checkpoint, or a torchvision ResNet state dict (`conv1.weight`, ...,
    optionally under "state_dict"; its `fc.*` is ignored)."""
    from mopro_fast.after.interop import InteropError, infer_arch
    from mopro_fast.after.trained import build_net
    from mopro_fast.config import config_from_dict
    from mopro_fast.core.model import MoProNet

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise TransferError(f"--reference {path}: unreadable ({type(exc).__name__})") from None
    if isinstance(state, dict) and "model" in state and "config" in state:
        net = build_net(config_from_dict(state["config"]), state["model"])
    else:
        sd = state.get("state_dict", state) if isinstance(state, dict) else None
        if not isinstance(sd, dict) or "conv1.weight" not in sd:
            raise TransferError(f"--reference {path}: neither a mopro-fast checkpoint nor a torchvision ResNet "
                                f"state dict (no conv1.weight)")
        try:
            arch = infer_arch(sd, branch="")
        except InteropError as exc:
            raise TransferError(f"--reference {path}: {exc}") from None
        if arch not in ("resnet18", "resnet50"):
            raise TransferError(f"--reference {path}: {arch} is not one of mopro-fast's trunks (resnet18, resnet50)")
        net = MoProNet(1, arch)
        missing, unexpected = net.encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")},
                                                          strict=False)
        if missing or unexpected:
            raise TransferError(f"--reference {path}: weights do not fit {arch} ({(missing + unexpected)[0]})")
    return Encoder("reference", str(path), _ready(net, cfg, device), _file_tag(path))


def _ready(net: nn.Module, cfg, device: torch.device) -> nn.Module:
    net = net.to(device).eval()
    if cfg.run.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


class _Images(torch.utils.data.Dataset):
    """Listed images in the eval view: (uint8 3 x crop x crop, index, readable?)."""

    def __init__(self, listing: Listing, indices: np.ndarray, resize: int, crop: int) -> None:
        self.listing, self.indices, self.resize, self.crop = listing, indices, resize, crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        from mopro_fast.views.cpu import eval_view

        index = int(self.indices[i])
        try:
            with Image.open(self.listing.root / self.listing.paths[index]) as im:
                rgb = np.asarray(im.convert("RGB"))  # H x W x 3; a truncated file fails here
            image = eval_view(torch.from_numpy(rgb.copy()).permute(2, 0, 1), self.resize, self.crop)
            return image, index, True
        except Exception:  # noqa: BLE001 - missing, empty, truncated, not an image, too large: a bad file
            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), index, False


@torch.no_grad()
def compute(encoder: Encoder, listing: Listing, indices: np.ndarray, cfg, device: torch.device,
            batch_size: int = 128, workers: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of `listing[indices]`: (good indices m, L2-normalised features m x F float32, bad indices)."""
    from mopro_fast.data.batch import finish_images
    from mopro_fast.training import runtime

    data = _Images(listing, indices, cfg.loader.eval_resize, cfg.loader.eval_resolution)
    # worker processes only where they pay: no more than the CPUs, none for a few images (a low-shot draw)
    workers = min(workers, os.cpu_count() or 1, len(indices) // 64)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, shuffle=False)
    good, feats, bad = [], [], []
    for images, index, ok in loader:
        bad.append(index[~ok].numpy())
        if ok.any():
            x = finish_images(images[ok], device, cfg.run.channels_last)  # b x 3 x crop x crop
            with runtime.autocast(device, cfg.run.precision):
                h = encoder.net.features(x).float()  # b x F
            feats.append((h / (h.norm(dim=1, keepdim=True) + 1e-5)).cpu().numpy())
            good.append(index[ok].numpy())
    dim = getattr(encoder.net, "feat_dim", 0)
    return (np.concatenate(good) if good else np.zeros(0, np.int64),
            np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
            np.concatenate(bad) if bad else np.zeros(0, np.int64))


class FeatureCache:
    """The features of one (encoder, split, view), row by row as they are needed, in OUT/features/NAME.npz."""

    def __init__(self, folder: Path, encoder: Encoder, listing: Listing, cfg, device: torch.device,
                 batch_size: int = 128, workers: int = 4) -> None:
        self.encoder, self.listing, self.cfg, self.device = encoder, listing, cfg, device
        self.batch_size, self.workers = batch_size, workers
        self.path = Path(folder) / f"{encoder.name}-{listing.name.replace('/', '-')}.npz"
        paths = hashlib.sha256("\n".join(listing.paths).encode()).hexdigest()
        self.fingerprint = hashlib.sha256(json.dumps(
            [encoder.fingerprint, listing.name, str(Path(listing.root).resolve()), paths,
             cfg.loader.eval_resize, cfg.loader.eval_resolution, cfg.run.precision]).encode()).hexdigest()[:16]
        self.index = np.zeros(0, np.int64)  # m rows known
        self.feats = np.zeros((0, 0), np.float32)  # m x F
        self.bad = np.zeros(0, np.int64)
        self.loaded = self._load()

    def _load(self) -> bool:
        try:
            with np.load(self.path) as data:
                if str(data["fingerprint"]) != self.fingerprint:
                    return False
                self.index, self.feats, self.bad = data["index"], data["feats"], data["bad"]
            return True
        except (OSError, KeyError, ValueError):
            return False

    def _save(self) -> None:
        from mopro_fast.safe_io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(self.fingerprint), index=self.index, feats=self.feats, bad=self.bad)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buf.getvalue())

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features of the readable ones among `indices`, in order (m x F); the mask of those, len(indices))."""
        indices = np.asarray(indices, dtype=np.int64)
        known = np.concatenate([self.index, self.bad])
        need = np.setdiff1d(np.unique(indices), known)
        if need.size:
            good, feats, bad = compute(self.encoder, self.listing, need, self.cfg, self.device, self.batch_size,
                                       self.workers)
            self.index = np.concatenate([self.index, good])
            self.feats = feats if self.feats.size == 0 else np.concatenate([self.feats, feats])
            self.bad = np.concatenate([self.bad, bad])
            self._save()
        row = {int(i): r for r, i in enumerate(self.index)}
        ok = np.array([int(i) in row for i in indices], dtype=bool)
        rows = [row[int(i)] for i in indices[ok]]
        return self.feats[rows] if rows else np.zeros((0, self.feats.shape[1] if self.feats.ndim == 2 else 0)), ok

    def bad_paths(self) -> list[str]:
        return [self.listing.paths[int(i)] for i in sorted(self.bad)]
