"""Encoder and heads of MoPro (DESIGN.md section 1; paper arXiv 2009.07995, section 3.1).

One network gives both outputs used by MoPro:
- a classifier on the pooled feature h: `p_logits` (K classes);
- a projection MLP on h, L2-normalised: `z`, the low-dimensional embedding used by the
  instance loss and by the prototypes.

The trunk is a torchvision ResNet built with random weights (never downloaded). A
`small_stem` variant (3x3 stride-1 first conv, no max-pool) keeps 32-64 px inputs from being
reduced to nothing; the tests use it. `width` (the stem's output channels, 64 in every torchvision
ResNet) scales every stage's channels by width / 64: the same topology and module names (so
state-dict keys are torchvision's), about (width / 64)^2 of the compute. The small-data CPU recipes
use width 32. `blurpool` anti-aliases the residual stages' strided convs (core/blurpool.py; same
state-dict keys too).

The module is pure: tensors in, tensors out, no device moves, no rank logic, no config object.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from mopro_fast.core.blurpool import blur_strided_convs

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class _ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's channels scaled by width / 64 (the stem's too)."""

    def __init__(self, block: type, layers: list[int], width: int) -> None:
        self._scale = width / 64
        super().__init__(block, layers)
        stem = self.layer1[0].conv1.in_channels  # = width
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(stem)
        self.fc = nn.Linear(self.inplanes, 1000)  # only its in_features (the last stage's width) is read

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: ANN001 - torchvision's
        if planes == 64:  # layer1: its input is the stem's output
            self.inplanes = max(1, round(64 * self._scale))
        return super()._make_layer(block, max(1, round(planes * self._scale)), blocks, stride, dilate)


_LAYOUT = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
           "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
           "resnet152": (Bottleneck, [3, 8, 36, 3])}


def build_trunk(arch: Arch = "resnet50", small_stem: bool = False, width: int = 64,
                blurpool: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its fc layer; returns (trunk, feature width).

    width = 64 is torchvision's network itself; another width scales every stage's channels.
    blurpool: every strided conv of layer1-4 blurs its input first (`blur_strided_convs`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if width == 64:
        trunk = getattr(torchvision.models, arch)(weights=None)
    else:
        trunk = _ScaledResNet(*_LAYOUT[arch], width)
    feat_dim = trunk.fc.in_features
    if small_stem:
        # CIFAR-style stem: a 7x7/2 conv plus a 3x3/2 max-pool would shrink a 32 px image
        # to 8 px before the first block.
        trunk.conv1 = nn.Conv2d(3, trunk.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        trunk.maxpool = nn.Identity()
    trunk.fc = nn.Identity()
    if blurpool:
        blur_strided_convs(trunk)
    return trunk, feat_dim


class MoProNet(nn.Module):
    """ResNet trunk + classifier + projection head: `forward(images) -> (logits, z)`.

    Shapes: images B x 3 x H x W -> logits B x K, z B x d with unit rows.
    `proj_hidden` is 2048 in the paper; tests pass a small value to stay fast.
    """

    def __init__(
        self,
        num_classes: int,
        arch: Arch = "resnet50",
        dim: int = 128,
        proj_hidden: int = 2048,
        small_stem: bool = False,
        width: int = 64,
        blurpool: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.encoder, self.feat_dim = build_trunk(arch, small_stem, width, blurpool)
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        self.projection = nn.Sequential(
            nn.Linear(self.feat_dim, proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, dim),
        )

    def features(self, images: Tensor) -> Tensor:
        """Pooled trunk feature h, B x feat_dim (used by cRT and evaluation)."""
        return self.encoder(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(images)  # B x feat
        logits = self.classifier(h)  # B x K
        z = F.normalize(self.projection(h), dim=1)  # B x d, unit rows
        return logits, z
