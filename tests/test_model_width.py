"""`model.width`: the same ResNet topology and state-dict keys with every stage's channels scaled."""

from __future__ import annotations

import pytest
import torch
import torchvision

from mopro_fast.core.model import MoProNet, build_trunk


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_64_is_torchvision_itself(arch: str) -> None:
    trunk, feat = build_trunk(arch, width=64)
    reference = getattr(torchvision.models, arch)(weights=None)
    reference.fc = torch.nn.Identity()
    assert type(trunk) is type(reference) and shapes(trunk) == shapes(reference)
    assert feat == {"resnet18": 512, "resnet50": 2048}[arch]


@pytest.mark.parametrize("arch, width, feat", [("resnet18", 16, 128), ("resnet18", 32, 256), ("resnet50", 32, 1024)])
def test_scaled_width_keeps_keys_and_scales_channels(arch: str, width: int, feat: int) -> None:
    trunk, feat_dim = build_trunk(arch, width=width)
    full, _ = build_trunk(arch, width=64)
    assert feat_dim == feat and shapes(trunk).keys() == shapes(full).keys()
    assert trunk.conv1.out_channels == trunk.bn1.num_features == width
    ratio = width / 64
    for key, shape in shapes(full).items():  # every conv / bn / downsample tensor: channels x ratio
        small = shapes(trunk)[key]
        if key.endswith("num_batches_tracked"):
            continue
        expected = tuple(round(n * ratio) if n != 3 else n for n in shape[:2]) + shape[2:]
        assert small == expected, key
    net = MoProNet(10, arch, dim=16, proj_hidden=32, width=width)
    logits, z = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10) and z.shape == (2, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_width_is_a_recipe_key_read_by_the_trainer_and_after_training(tmp_path) -> None:
    from mopro_fast.config import load_config
    from mopro_fast.training.train import build_model

    cfg = load_config(__import__("tests.conftest", fromlist=["TINY"]).TINY,
                      ["data.shards=s", f"run.out={tmp_path}", "model.width=8"])
    training = build_model(cfg, 10, 0.1, torch.device("cpu"))
    assert training.mopro.query.encoder.conv1.out_channels == 8
    assert training.mopro.key.encoder.layer4[1].conv2.out_channels == 64
