"""Oracle tests of the batched views (gpu_augment, gpu_views) against torchvision's per-sample ops.

Same parameters -> same output: the batched colour ops against `torchvision.transforms.v2.functional`
one sample at a time, the batched crop+resize+flip against `F.resized_crop` + `F.horizontal_flip`,
the batched eval view against `views.eval_view`, and the vectorised crop sampler against
`views.sample_crop` fed the same uniform draws.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F

from mopro_fast.views import cpu as views
from mopro_fast.views.augment import (BRIGHTNESS, CONTRAST, HUE, IDENTITY, SATURATION, adjust_hue, color_jitter,
                                         random_grayscale, stage_ops)
from mopro_fast.views.gpu import (Crops, eval_view_batch, pad_batch, resized_crops, sample_crops,
                                       two_views_batch)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
_TV_JITTER = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]


def _images(gen: torch.Generator, batch: int, size: int = 20) -> torch.Tensor:
    x = torch.rand(batch, 3, size, size, generator=gen)
    x[0] = x[0, :1].expand(3, -1, -1)  # already grey
    x[1] = (x[1] > 0.5).float()  # saturated primaries and black/white: hue ties and clamps
    x[2, :, :4] = 0.0  # black pixels: HSV with max = 0
    return x


def test_color_jitter_matches_torchvision_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    B = 48
    x = _images(gen, B)
    u = torch.rand(B, 4, generator=gen, dtype=torch.float64)
    factors = torch.cat([0.6 + 0.8 * u[:, :3], -0.4 + 0.8 * u[:, 3:]], dim=1)  # the ColorJitter(0.4 x 4) ranges
    order = torch.rand(B, 4, generator=gen).argsort(dim=1)
    gray = torch.rand(B, generator=gen) < 0.3
    out = color_jitter(random_grayscale(x, gray), factors, order)
    assert len({tuple(o) for o in order.tolist()}) > 12  # many different orders exercised
    for b in range(B):
        ref = F.rgb_to_grayscale(x[b], num_output_channels=3) if gray[b] else x[b]
        for op in order[b].tolist():
            ref = _TV_JITTER[op](ref, float(factors[b, op]))
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)
    assert (out[gray].amax(1) - out[gray].amin(1)).max() < 1e-5  # grey stays grey through the jitter


def test_each_colour_op_alone_and_hue_extremes() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _images(gen, 6)
    for op in (BRIGHTNESS, CONTRAST, SATURATION):
        factors = torch.ones(6, 4, dtype=torch.float64)
        factors[:, HUE] = 0.0
        factors[:, op] = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.0, 0.9], dtype=torch.float64)
        out = color_jitter(x, factors, torch.tensor([[op, HUE, *[o for o in range(3) if o != op]]] * 6))
        for b in range(6):
            torch.testing.assert_close(out[b], _TV_JITTER[op](x[b], float(factors[b, op])), atol=1e-5, rtol=0)
    shifts = torch.tensor([-0.5, -0.4, 0.0, 0.1, 0.4, 0.5])
    out = adjust_hue(x, shifts)
    for b in range(6):
        torch.testing.assert_close(out[b], F.adjust_hue(x[b], float(shifts[b])), atol=1e-5, rtol=0)


def test_stage_ops_split_the_order_around_the_hue_shift() -> None:
    order = torch.tensor([[HUE, 0, 1, 2], [0, HUE, 2, 1], [2, 1, HUE, 0], [1, 0, 2, HUE]])
    before, after = stage_ops(order)
    I = IDENTITY  # noqa: E741
    assert before.tolist() == [[I, I, I], [0, I, I], [2, 1, I], [1, 0, 2]]
    assert after.tolist() == [[0, 1, 2], [2, 1, I], [0, I, I], [I, I, I]]


class _FixedDraws:
    """A views.Draws stand-in that replays given uniforms: crop tries first, then (top, left)."""

    def __init__(self, tries: list[float], position: list[float]):
        self.tries, self.position = list(tries), list(position)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * self.tries.pop(0)

    def randint(self, n: int) -> int:
        return min(int(self.position.pop(0) * n), n - 1)


def test_vectorised_crop_sampler_is_torchvisions_rule() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 400
    heights = torch.randint(1, 600, (n,), generator=gen)
    widths = torch.randint(1, 600, (n,), generator=gen)
    heights[:40], widths[:40] = 8, torch.randint(60, 400, (40,), generator=gen)  # panoramas: the fallback
    heights[40:60], widths[40:60] = torch.randint(60, 400, (20,), generator=gen), 8  # tall strips
    heights[60:70] = widths[60:70] = 1
    u = torch.rand(n, 22, generator=gen, dtype=torch.float64)
    crops = sample_crops(u, heights, widths)
    fallbacks = 0
    for b in range(n):
        draws = _FixedDraws(u[b, :20].tolist(), u[b, 20:].tolist())
        expected = views.sample_crop(draws, int(heights[b]), int(widths[b]))
        fallbacks += len(draws.position) == 2  # no try fitted: no position drawn
        got = (int(crops.top[b]), int(crops.left[b]), int(crops.height[b]), int(crops.width[b]))
        assert got == expected, (b, int(heights[b]), int(widths[b]))
    assert fallbacks >= 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_resized_crop_and_flip_equal_torchvision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = [(40, 50), (61, 33), (48, 48), (100, 120), (17, 90)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    boxes = [(3, 5, 30, 20), (10, 0, 40, 33), (0, 0, 48, 48), (20, 7, 70, 100), (2, 30, 9, 12)]  # down- and upscaling
    crops = Crops(*(torch.tensor(c) for c in zip(*boxes)))
    flip = torch.tensor([False, True, False, True, True])
    res = 24
    (out,) = resized_crops(pad_batch(images, dtype), [(crops, flip)], res)
    assert out.shape == (5, 3, res, res) and out.dtype == torch.float32
    for b, image in enumerate(images):
        ref = F.resized_crop(image.float(), *boxes[b], [res, res], antialias=True)  # torchvision's float kernel
        ref = F.horizontal_flip(ref) if flip[b] else ref
        torch.testing.assert_close(out[b], ref, atol=2e-3, rtol=0)
        ref8 = F.resized_crop(image, *boxes[b], [res, res], antialias=True)  # the torch backend's uint8 kernel
        ref8 = F.horizontal_flip(ref8) if flip[b] else ref8
        assert (out[b] - ref8.float()).abs().max() <= 1.0 + 1e-3  # it rounds (twice): within one level


def test_batched_eval_view_equals_views_eval_view() -> None:
    gen = torch.Generator().manual_seed(4)
    sizes = [(48, 48), (40, 64), (90, 37), (36, 36), (200, 150)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    out = eval_view_batch(images, resize=40, crop=32) * 255
    for b, image in enumerate(images):
        ref = F.center_crop(F.resize(image.float(), [40], antialias=True), [32, 32])
        torch.testing.assert_close(out[b], ref, atol=2e-3, rtol=0)
        assert (out[b] - views.eval_view(image, 40, 32).float()).abs().max() <= 1.0 + 1e-3
    with pytest.raises(ValueError, match="at least the crop"):
        eval_view_batch(images, resize=30, crop=32)


def test_two_views_batch_parameters_and_determinism() -> None:
    gen = torch.Generator().manual_seed(5)
    images = [torch.randint(0, 256, (3, 30 + i, 90 - i), generator=gen, dtype=torch.uint8) for i in range(64)]
    runs = [two_views_batch(images, torch.Generator().manual_seed(9), 16) for _ in range(2)]
    (q, k, (weak, strong)), (q2, k2, _) = runs
    assert torch.equal(q, q2) and torch.equal(k, k2)  # a pure function of the generator state
    assert q.shape == k.shape == (64, 3, 16, 16) and 0 <= float(q.min()) and float(k.max()) <= 1
    for p in (weak, strong):
        area = (p.crops.height * p.crops.width).double()
        source = torch.tensor([im.shape[1] * im.shape[2] for im in images], dtype=torch.float64)
        slack = (p.crops.height + p.crops.width).double() / 2 + 1  # rounding of the sides
        assert (area >= 0.2 * source - slack).all() and (area <= source).all()
    assert strong.factors[:, :3].min() >= 0.6 and strong.factors[:, :3].max() <= 1.4
    assert strong.factors[:, 3].abs().max() <= 0.4 and sorted(strong.order[0].tolist()) == [0, 1, 2, 3]
    assert not torch.equal(weak.crops.top, strong.crops.top)  # independent crops
    assert math.isclose(float(weak.flip.float().mean()), 0.5, abs_tol=0.25)
