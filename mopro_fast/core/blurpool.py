"""Anti-aliased downsampling for the ResNet trunk (`model.blurpool`; Zhang 2019, "Making
Convolutional Networks Shift-Invariant Again", ICML, section 3; FFCV's rn50 recipes use it).

A stride-2 convolution keeps every other output of a stride-1 one, so frequencies above the new
Nyquist limit alias: a one-pixel shift of the input changes the features more than it should.
Zhang low-pass filters before subsampling: a stride-1 conv, then a fixed 3x3 binomial blur
([1, 2, 1] x [1, 2, 1] / 16) evaluated with stride 2. Both are linear and shift-invariant, so they
commute: blurring the input with stride 1 and then running the original conv with its stride 2
gives the same result (up to the zero padding at the borders) at a quarter of the conv's cost
(the conv still runs at the low resolution; the blur is a cheap depthwise 3x3 at the high one).
That is the order used here, as FFCV does.

`BlurConv2d` is an `nn.Conv2d` (same parameters, same state-dict keys: trunk weights load into a
model with or without blur); its filter is a non-persistent buffer (not in state_dict, no
parameters). `blur_strided_convs` swaps the strided convs of a ResNet's residual stages for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


class BlurConv2d(nn.Conv2d):
    """`conv(blur(x))`: a 3x3 binomial blur of each input channel (stride 1, zero padding 1), then
    the convolution with its own stride. Shapes: B x C_in x H x W -> B x C_out x H' x W', H' and W'
    as without the blur."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kernel = torch.outer(_BINOMIAL, _BINOMIAL) / 16  # 3 x 3, sums to 1
        self.register_buffer("blur", kernel.repeat(self.in_channels, 1, 1, 1), persistent=False)  # C_in x 1 x 3 x 3

    @classmethod
    def like(cls, conv: nn.Conv2d) -> "BlurConv2d":
        """A BlurConv2d with `conv`'s settings and its very Parameter objects (values and init kept). The
        throw-away init draws no random numbers (the RNG is restored), so a model built with blur has the
        same initial weights as one without."""
        with torch.random.fork_rng(devices=[]):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        blurred = F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)  # B x C_in x H x W
        return super().forward(blurred)  # B x C_out x H' x W'


def blur_strided_convs(trunk: nn.Module) -> list[str]:
    """Replace, in place, every convolution with a stride above 1 inside `trunk.layer1`..`layer4` by a
    `BlurConv2d` sharing its parameters; returns the names of the replaced modules. The stem (its 7x7
    conv on the 3 colour channels, and the max-pool) is left as it is, as in FFCV, which blurs strided
    convs with at least 16 input channels only."""
    replaced = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for name, module in list(getattr(trunk, stage).named_modules()):
            if isinstance(module, nn.Conv2d) and not isinstance(module, BlurConv2d) and max(module.stride) > 1:
                parent_name, _, child = f"{stage}.{name}".rpartition(".")
                setattr(trunk.get_submodule(parent_name), child, BlurConv2d.like(module))
                replaced.append(f"{stage}.{name}")
    return replaced
