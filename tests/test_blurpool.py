"""`model.blurpool`: anti-aliased strided convs in the residual stages (core/blurpool.py): where it
applies, what it computes, that it keeps shapes and state-dict keys, and that off is torchvision's
network unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mopro_fast.core.blurpool import BlurConv2d
from mopro_fast.core.model import MoProNet, build_trunk

STRIDED = {  # the strided convs of layer2-4: BasicBlock strides conv1, Bottleneck conv2; plus the shortcut
    "resnet18": [f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")],
    "resnet50": [f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")],
}


def convs(module: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_off_is_torchvision_and_on_replaces_exactly_the_strided_stage_convs(arch: str) -> None:
    plain, _ = build_trunk(arch, width=16)
    assert set(convs(plain).values()) == {nn.Conv2d}  # default: no BlurConv2d anywhere
    blurred, _ = build_trunk(arch, width=16, blurpool=True)
    assert sorted(n for n, t in convs(blurred).items() if t is BlurConv2d) == sorted(STRIDED[arch])
    assert type(blurred.conv1) is nn.Conv2d and blurred.conv1.stride == (2, 2)  # the stem is left as it is
    assert type(blurred.maxpool) is nn.MaxPool2d
    for name in STRIDED[arch]:
        assert blurred.get_submodule(name).stride == plain.get_submodule(name).stride == (2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_keys_parameters_and_initial_weights(arch: str) -> None:
    torch.manual_seed(0)
    plain = MoProNet(10, arch, dim=16, proj_hidden=32, width=16)
    torch.manual_seed(0)
    blurred = MoProNet(10, arch, dim=16, proj_hidden=32, width=16, blurpool=True)
    a, b = plain.state_dict(), blurred.state_dict()
    assert list(a) == list(b)  # the blur filter is a non-persistent buffer: not in the state dict
    assert all(torch.equal(a[k], b[k]) for k in a)  # the blur draws no random numbers
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in blurred.named_parameters()]
    assert blurred.load_state_dict(plain.state_dict()) is not None  # strict: trunk weights load either way
    assert any(n.endswith(".blur") for n, _ in blurred.named_buffers())


def test_the_filter_is_a_binomial_blur_summing_to_one() -> None:
    conv = BlurConv2d(6, 4, 3, stride=2, padding=1, bias=False)
    assert conv.blur.shape == (6, 1, 3, 3) and not conv.blur.requires_grad
    assert torch.allclose(conv.blur.sum(dim=(1, 2, 3)), torch.ones(6))
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    assert all(torch.equal(conv.blur[c, 0], expected) for c in range(6))
    assert [n for n, _ in conv.named_parameters()] == ["weight"]


def test_blur_then_strided_conv_equals_conv_then_blur_with_stride_2_inside_the_borders() -> None:
    """What it computes: conv(blur(x)) with the conv's stride; and Zhang's order (a stride-1 conv, then
    the blur evaluated with stride 2) gives the same away from the zero-padded borders."""
    torch.manual_seed(1)
    conv = BlurConv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 16, 16)  # B x C x H x W
    with torch.no_grad():
        out = conv(x)  # 2 x 5 x 8 x 8
        blur3 = conv.blur  # 3 x 1 x 3 x 3
        ours = F.conv2d(F.conv2d(x, blur3, padding=1, groups=3), conv.weight, stride=2, padding=1)
        zhang = F.conv2d(F.conv2d(x, conv.weight, padding=1), conv.blur[:1].expand(5, 1, 3, 3), stride=2,
                         padding=1, groups=5)
    assert out.shape == (2, 5, 8, 8) and torch.allclose(out, ours, atol=1e-6)
    assert torch.allclose(out[..., 1:-1, 1:-1], zhang[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(out, F.conv2d(x, conv.weight, stride=2, padding=1), atol=1e-3)


@pytest.mark.parametrize("small_stem", [False, True])
def test_stage_output_shapes_match_the_plain_model_at_64px(small_stem: bool) -> None:
    def stage_shapes(trunk: nn.Module) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        hooks = [getattr(trunk, f"layer{i}").register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
                 for i in range(1, 5)]
        with torch.no_grad():
            shapes.append(tuple(trunk(torch.randn(2, 3, 64, 64)).shape))
        for h in hooks:
            h.remove()
        return shapes

    plain, _ = build_trunk("resnet18", small_stem, width=16)
    blurred, _ = build_trunk("resnet18", small_stem, width=16, blurpool=True)
    assert stage_shapes(blurred) == stage_shapes(plain)


def test_a_one_pixel_shift_moves_the_features_less_with_blur() -> None:
    """Zhang 2019's point: with the same weights, features of an image and of it shifted by one pixel
    (an odd shift, which stride 2 cannot follow) are much closer with the blur (about 20x on this net)."""
    gaps = {}
    for blur in (False, True):
        torch.manual_seed(0)
        trunk, _ = build_trunk("resnet18", width=16, blurpool=blur)
        x = torch.randn(8, 3, 72, 72, generator=torch.Generator().manual_seed(100))
        with torch.no_grad():
            a, b = trunk.eval()(x[..., 4:68, 4:68]), trunk(x[..., 4:68, 5:69])  # 8 x 128 each
        gaps[blur] = float((1 - F.cosine_similarity(a, b)).mean())
    assert gaps[True] < gaps[False] / 4, gaps


def test_blurpool_is_read_by_the_trainer_and_after_training(tmp_path) -> None:
    from conftest import TINY
    from mopro_fast.after.trained import build_net
    from mopro_fast.config import load_config
    from mopro_fast.training.train import build_model

    cfg = load_config(TINY, ["data.shards=s", f"run.out={tmp_path}", "model.width=8", "model.blurpool=true"])
    training = build_model(cfg, 10, 0.1, torch.device("cpu"))
    for net in (training.mopro.query, training.mopro.key):
        assert type(net.encoder.layer2[0].conv1) is BlurConv2d
    state = {f"query.{k}": v for k, v in training.mopro.query.state_dict().items()}
    rebuilt = build_net(cfg, state)
    assert type(rebuilt.encoder.layer4[0].downsample[0]) is BlurConv2d
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x)[0], training.mopro.query.eval()(x)[0], atol=1e-5)
    plain = load_config(TINY, ["data.shards=s", f"run.out={tmp_path}", "model.width=8"])
    assert BlurConv2d not in set(convs(build_net(plain, state)).values())  # the same weights load without blur
