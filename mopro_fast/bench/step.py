"""`mopro-fast bench step`: full MoPro training steps on synthetic data, mopro-fast vs original style.

Both paths run the same MoPro step (both views, shuffle-BN, instance/prototype/classification
losses, noise correction, backward, SGD, queue and prototype updates, key-network EMA) on the same
synthetic batch in the same process. They differ only in the tricks mopro-fast adds:

| | mopro-fast | original style |
|---|---|---|
| precision | `--precision` (bf16 autocast by default on CUDA) | fp32 |
| memory format | channels-last (NCHW with `--nchw`: faster on CPUs) | NCHW |
| key EMA | one fused lerp over a flat buffer | per-parameter loop, 3 temporaries each |
| prototype update | closed form, a few kernels | per-sample Python loop |
| SGD | fused (CUDA) / foreach | for-loop |
| `torch.compile` | with `--compile` | no |

Timed with CUDA events on a GPU (perf_counter on a CPU), interleaved round by round, medians.
"""

from __future__ import annotations

import click

from mopro_fast.bench.core import _device_option, _json_option, _resolve_device, interleaved_medians
from mopro_fast.bench.common import emit, environment


def build(arch: str, classes: int, res: int, batch: int, device, fast: bool, small_stem: bool, seed: int = 0,
          channels_last: bool = True):
    """A MoPro model, optimiser and one synthetic batch; `fast` selects the mopro-fast tricks."""
    import torch

    from mopro_fast import runtime
    from mopro_fast.ema import ema_update_reference
    from mopro_fast.model import MoProNet
    from mopro_fast.mopro import MoPro
    from mopro_fast.prototypes import prototype_update_reference

    torch.manual_seed(seed)
    mopro = MoPro(MoProNet(classes, arch, small_stem=small_stem), classes, queue_length=8192).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    views = [torch.randn(batch, 3, res, res, generator=gen).to(device) for _ in range(2)]  # 2 x (B x 3 x H x W)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)  # B
    if fast:
        if channels_last:
            mopro.to(memory_format=torch.channels_last)
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        opt = runtime.sgd(mopro.query.parameters(), 0.1, 0.9, 1e-4, False, "auto", device)
        ema = mopro.momentum_update
    else:
        opt = runtime.sgd(mopro.query.parameters(), 0.1, 0.9, 1e-4, False, "for_loop", device)
        ema = lambda: ema_update_reference(mopro.key, mopro.query, mopro.momentum)  # noqa: E731
        weight = mopro.prototypes.weight
        mopro.prototypes.update = lambda z, y, kept, m: prototype_update_reference(weight, z, y, kept, m)
    return mopro, opt, ema, views, labels


def make_step(mopro, opt, ema, views, labels, autocast, compiled: bool):
    import torch

    from mopro_fast.step import mopro_step

    step_fn = torch.compile(mopro_step) if compiled else mopro_step

    def step():
        with autocast:
            loss, _ = step_fn(mopro, views[0], views[1], labels, use_proto_loss=True, clean=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema()
    return step


def run_step_bench(arch: str, res: int, batch: int, classes: int, device_name: str, precision: str,
                   compiled: bool, small_stem: bool, rounds: int, warmup: int, channels_last: bool = True) -> dict:
    import torch

    from mopro_fast import runtime

    device = _resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fast = make_step(*build(arch, classes, res, batch, device, True, small_stem, channels_last=channels_last),
                     runtime.autocast(device, precision), compiled)
    original = make_step(*build(arch, classes, res, batch, device, False, small_stem),
                         runtime.autocast(device, "fp32"), False)
    fast_ms, original_ms = interleaved_medians([fast, original], device, rounds, warmup)
    return {
        "bench": "step",
        "fast_img_s": round(batch / fast_ms * 1e3, 1),
        "original_img_s": round(batch / original_ms * 1e3, 1),
        "ratio": round(original_ms / fast_ms, 2),
        "fast_ms": round(fast_ms, 2),
        "original_ms": round(original_ms, 2),
        "settings": {"arch": arch, "res": res, "batch": batch, "classes": classes, "precision": precision,
                     "channels_last": channels_last, "compile": compiled, "small_stem": small_stem, "rounds": rounds,
                     "warmup": warmup, "queue": 8192},
        "env": environment(str(device)),
    }


@click.command("step")
@click.option("--arch", default="resnet50", show_default=True, help="torchvision ResNet trunk.")
@click.option("--res", default=224, show_default=True, help="Square input resolution in pixels.")
@click.option("--batch", default=64, show_default=True, help="Batch size per step.")
@click.option("--classes", default=1000, show_default=True, help="Classes K (classifier and prototypes).")
@_device_option
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Autocast dtype of the fast path [default: bf16 on CUDA, fp32 on CPU, where bf16 is slow].")
@click.option("--compile", "compiled", is_flag=True, help="torch.compile the fast path's step (warm-up pays it).")
@click.option("--small-stem", is_flag=True, help="3x3 stem without max-pool (for 32-64 px inputs).")
@click.option("--nchw", is_flag=True, help="Keep the fast path in NCHW (on a CPU channels-last is slower).")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds; medians are reported.")
@click.option("--warmup", default=2, show_default=True, help="Untimed rounds first (cudnn autotune, compile).")
@click.option("--quick", is_flag=True, help="CI size: resnet18, small stem, 32 px, batch 32, 3 rounds.")
@_json_option
def step_bench(arch: str, res: int, batch: int, classes: int, device: str, precision: str | None, compiled: bool,
               small_stem: bool, nchw: bool, rounds: int, warmup: int, quick: bool, as_json: bool) -> None:
    """Full MoPro training steps/s on synthetic data: mopro-fast vs the original implementation's style."""
    if quick:
        arch, res, batch, classes, small_stem, rounds, warmup = "resnet18", 32, 32, 100, True, 3, 1
    dev = _resolve_device(device)
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    emit(run_step_bench(arch, res, batch, classes, device, precision, compiled, small_stem, rounds, warmup,
                        channels_last=not nchw), as_json)
