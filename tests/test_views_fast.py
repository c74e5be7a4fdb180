"""The CPU data path's faster pieces against the literal code they replace (issue: the CPU data path).

- `views.hue.adjust_hue_uint8` against torchvision's `adjust_hue` (the torch backend's old kernel);
- the strong view (`views.jitter`: one float buffer) against the chain of torchvision's uint8 kernels;
- `batch.normalize_uint8` in place, never touching its input;
- `data.host_memory`: tuned once per process, off on request;
- `bench loader --baseline original`: the original's path, the decode-only ceiling, the ratios, two sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as F

from mopro_fast.data.batch import denormalize_to_uint8_range, normalize_uint8
from mopro_fast.views import cpu as views
from mopro_fast.views.hue import adjust_hue_uint8
from tests.conftest import REPO, run_cli


def _images(n: int, seed: int = 0):
    """Random uint8 images with grey pixels and channel ties (the hue formula's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    for s in range(n):
        image = torch.randint(0, 256, (3, 24 + s % 5, 40), dtype=torch.uint8, generator=g)
        image[:, :4] = image[0:1, :4]  # grey rows: no hue
        if s % 3 == 0:
            image[1, 4:8] = image[0, 4:8]  # max shared by two channels
        if s % 4 == 0:
            image[2, 8:12] = image[1, 8:12]
        yield image, float(torch.rand(1, generator=g)) - 0.5


def test_fast_hue_equals_torchvision_to_one_level() -> None:
    total = equal = 0
    for image, shift in _images(120):
        ours, theirs = adjust_hue_uint8(image, shift), F.adjust_hue(image, shift)
        assert ours.dtype == torch.uint8 and ours.shape == image.shape
        diff = (ours.int() - theirs.int()).abs()
        assert int(diff.max()) <= 1, shift
        total, equal = total + diff.numel(), equal + int((diff == 0).sum())
        assert torch.equal(ours[:, :4], image[:, :4])  # grey pixels unchanged, as torchvision's
    assert equal / total > 0.999
    for shift in (-0.5, 0.0, 0.5):  # the ends of the range
        image = next(_images(1, seed=5))[0]
        assert int((adjust_hue_uint8(image, shift).int() - F.adjust_hue(image, shift).int()).abs().max()) <= 1
    with pytest.raises(ValueError, match="not in"):
        adjust_hue_uint8(image, 0.6)


def _literal_strong(image, p, res: int, hue):
    """The strong view as the chain of torchvision's uint8 kernels (the code views.jitter replaces)."""
    out = F.resized_crop(image, p.top, p.left, p.height, p.width, [res, res], antialias=True)
    if p.grayscale:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    for op, factor in p.jitter:
        out = (hue if op == "hue" else views.JITTER_FNS[op])(out, factor)
    return F.horizontal_flip(out) if p.flip else out


def test_strong_view_is_torchvisions_kernel_chain() -> None:
    """Exactly the chain with views.hue's shift in it; within a level or two of the all-torchvision chain."""
    g, grays, close = torch.Generator(), 0, 0
    for s in range(80):
        image = torch.randint(0, 256, (3, 40 + s % 7, 52), dtype=torch.uint8, generator=g.manual_seed(1000 + s))
        _, k, (_, pk) = views.two_views(image, g.manual_seed(s), 32, return_params=True)
        assert torch.equal(k, _literal_strong(image, pk, 32, adjust_hue_uint8)), pk
        diff = (_literal_strong(image, pk, 32, F.adjust_hue).int() - k.int()).abs()
        # a one-level hue difference can be scaled by the ops after it (factors up to 1.4)
        assert int(diff.max()) <= 2, pk
        close += int((diff == 0).sum()) / diff.numel() > 0.99
        grays += pk.grayscale
    assert grays > 5 and close > 70


def test_normalize_uint8_does_not_touch_its_input() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = normalize_uint8(images)
    assert out.dtype == torch.float32 and torch.allclose(denormalize_to_uint8_range(out), images.float(), atol=1e-3)
    floats = images.float()
    copy = floats.clone()
    again = normalize_uint8(floats)  # already float32: still a new tensor
    assert torch.equal(floats, copy) and again.data_ptr() != floats.data_ptr()
    cl = images.contiguous(memory_format=torch.channels_last)
    assert normalize_uint8(cl).is_contiguous(memory_format=torch.channels_last)


def test_host_memory_is_tuned_once_and_can_be_left_alone() -> None:
    code = ("import importlib.util as u; s = u.spec_from_file_location('m', 'mopro_fast/data/host_memory.py'); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.keep_freed_blocks(), m.keep_freed_blocks())")
    env = {k: v for k, v in os.environ.items() if k != "MOPRO_FAST_HOST_MEMORY"}
    tuned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**env, "MOPRO_FAST_HOST_MEMORY": "os"})
    assert tuned.returncode == left.returncode == 0, tuned.stderr + left.stderr
    expected = "reuse reuse" if sys.platform.startswith("linux") else "unavailable unavailable"
    assert tuned.stdout.split() == expected.split() and left.stdout.split() == ["os", "os"]


def test_a_path_measured_in_a_fresh_interpreter_runs_there_and_its_error_comes_back() -> None:
    from mopro_fast.bench.loader import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(FileNotFoundError):
        in_fresh_process(os.stat, "/no/such/file")


def test_bench_loader_baseline_original_reports_original_ours_and_limit(tmp_path: Path) -> None:
    result = run_cli("bench", "loader", "--baseline", "original", "--quick", "--backend", "torch", "--res", "32",
                     "--res", "48", "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert set(out["img_s"]) == {"original", "torch", "decode-only"} and all(v > 0 for v in out["img_s"].values())
    assert set(out["vs_original"]) == set(out["of_limit"]) == {"torch"}
    assert out["vs_original"]["torch"] == pytest.approx(out["img_s"]["torch"] / out["img_s"]["original"], abs=0.01)
    assert out["settings"]["resolutions"] == [32, 48] and set(out["by_res"]) == {"32", "48"}
    assert out["by_res"]["32"]["img_s"] == out["img_s"]
    assert out["by_res"]["48"]["img_s"]["decode-only"] == out["img_s"]["decode-only"]  # measured once
    assert out["settings"]["baseline"] == "original" and out["settings"]["max_side"] <= 160
