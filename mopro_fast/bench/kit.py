"""The bench kit: the one device resolver, environment record, timer and option set of every benchmark.

- `resolve_device("auto")`: cuda if available, else cpu (`--device` of every command).
- `environment(device)`: machine, core count, torch threads and library versions, under `"env"`
  in every result.
- `time_ms(fn, device)`: one timed call. On a GPU, CUDA events around `fn` on the current stream;
  with `wall=True`, perf_counter between two device synchronisations instead (for work that also
  runs on a loader's own streams or waits on the host, as a window of batches does). On a CPU,
  perf_counter.
- `interleaved(fns, device, rounds, warmup)`: `warmup` untimed rounds, then `rounds` timed ones,
  each running every path in turn (baseline, fast, ...), so every path sees the same machine load
  (which matters on a shared CPU); one `Timing` (median and spread) per path.
- `stopwatch()`: seconds elapsed, for bookkeeping (how long each benchmark of `bench all` took).
- `emit(result, as_json)` prints a result; `device_option`, `json_option`, `arch_option`, ... are
  the shared click options, `ArchChoice` reads the architectures from `mopro_fast.core.model.ARCHS`.

torch is imported inside the functions so that `mopro-fast --help` stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click


def resolve_device(name: str = "auto") -> Any:
    """`auto`: cuda if available, else cpu; otherwise the `torch.device` of `name`."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def environment(device: Any = "cpu") -> dict[str, Any]:
    """Device, core count, torch threads and library versions, recorded with every result."""
    import torch

    device = str(device)
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "device": device}
    from mopro_fast import __version__

    info["mopro_fast"] = __version__
    for name in ("torch", "torchvision", "PIL", "numpy", "webdataset", "nvidia.dali"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name, fromlist=["__version__"])
            except Exception:  # noqa: BLE001 - a missing optional library is simply not listed
                continue
        info[name.replace("nvidia.", "").replace("PIL", "pillow")] = getattr(module, "__version__", "?")
    try:  # ffcv's own __version__ is stale (1.0.2 says 0.0.3rc1): ask the installed distribution
        from importlib.metadata import version

        info["ffcv"] = version("ffcv")
    except Exception:  # noqa: BLE001 - not installed
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info["threads"] = torch.get_num_threads()
    return info


def synchronize(device: Any) -> None:
    """Wait for all queued work on `device` (a no-op on a CPU)."""
    import torch

    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: Any, setup: Callable[[], object] | None = None,
            wall: bool = False) -> float:
    """Time of one `fn()` in ms (see the module docstring for the clocks); `setup()` runs first, untimed."""
    import torch

    device = resolve_device(device)
    if setup is not None:
        setup()
    synchronize(device)
    if device.type == "cuda" and not wall:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def stopwatch() -> Callable[[], float]:
    """A function giving the seconds since this call (bookkeeping, such as how long a report took)."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


@dataclass(frozen=True)
class Timing:
    """The timed runs of one path, in ms."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: 0.1 means the runs lay within 10% of the median's size."""
        return (max(self.times_ms) - min(self.times_ms)) / self.median_ms if self.median_ms else 0.0

    def rates(self, items: float) -> list[float]:
        """`items` per second, per run (e.g. images per window)."""
        return [items / t * 1e3 for t in self.times_ms]

    def median_rate(self, items: float) -> float:
        """The median of `rates(items)` (for an even count, not quite `items / median_ms`)."""
        return statistics.median(self.rates(items))

    def summary(self) -> dict[str, Any]:
        return {"median_ms": round(self.median_ms, 4), "min_ms": round(min(self.times_ms), 4),
                "max_ms": round(max(self.times_ms), 4), "spread": round(self.spread, 3), "runs": len(self.times_ms)}


def interleaved(fns: Sequence[Callable[[], object]], device: Any, rounds: int, warmup: int,
                per_round: Sequence[int] | None = None, setup: Callable[[], object] | None = None,
                wall: bool = False) -> list[Timing]:
    """Each function timed alternately, round by round; one `Timing` per function.

    Each round runs `fns[i]` `per_round[i]` times (default once), `setup()` untimed before every
    run. `warmup` untimed rounds come first (cudnn autotune, compilation, page cache).
    """
    per_round = per_round or [1] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + rounds):
        for fn, count, out in zip(fns, per_round, times):
            measured = [time_ms(fn, device, setup, wall) for _ in range(count)]
            if i >= warmup:
                out.extend(measured)
    return [Timing(tuple(t)) for t in times]


def timings(**paths: Timing) -> dict[str, dict[str, Any]]:
    """The `"timings"` entry of a result: each path's median, range and spread."""
    return {name: t.summary() for name, t in paths.items()}


def emit(result: dict, as_json: bool) -> None:
    """Print a result: JSON for machines (`--json`), or aligned key/value lines for people."""
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=False))
        return
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key:>24}: {value}")


class ArchChoice(click.Choice):
    """`click.Choice` of `mopro_fast.core.model.ARCHS`, read when first needed: importing the model
    module imports torch and torchvision, which `mopro-fast --help` should not pay for."""

    def __init__(self) -> None:  # noqa: D107 - the choices are a property
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from mopro_fast.core.model import ARCHS

        return ARCHS


def device_option(help: str = "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.") -> Callable:
    return click.option("--device", default="auto", show_default=True, help=help)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the JSON object only.")


def arch_option(default: str | None = "resnet50", help: str = "Encoder trunk (torchvision ResNet).") -> Callable:
    return click.option("--arch", type=ArchChoice(), default=default, show_default=default is not None, help=help)


def training_options(fn: Callable) -> Callable:
    """The training-step options shared by `bench step` and `bench e2e`."""
    for option in reversed([
        device_option(),
        click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
                     help="Autocast dtype of the fast path [default: bf16 on CUDA, fp32 on CPU, where bf16 is slow]."),
        click.option("--compile", "compiled", is_flag=True, help="torch.compile the MoPro step (warm-up pays it)."),
        click.option("--small-stem", is_flag=True, help="3x3 stem without max-pool (for 32-64 px inputs)."),
        click.option("--nchw", is_flag=True, help="NCHW instead of channels-last (model and batches; faster on CPUs)."),
    ]):
        fn = option(fn)
    return fn


def default_precision(device: Any, precision: str | None) -> str:
    """`--precision` unset: bf16 on CUDA, fp32 on a CPU (where bf16 autocast is slow)."""
    return precision or ("bf16" if resolve_device(device).type == "cuda" else "fp32")


class Parts:
    """Named parts of a multi-benchmark run (`bench all`, `bench res`): each part's result, or its
    one-line error (the other parts still run), and its seconds; progress lines as `label: name ...`.
    MOPRO_BENCH_TRACEBACK=1 also prints a failing part's traceback."""

    def __init__(self, label: str, progress: Callable[[str], None]) -> None:
        self.label, self.progress = label, progress
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        self.progress(f"{self.label}: {name} ...")
        elapsed = stopwatch()
        try:
            self.results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the other parts still run
            self.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.progress(f"{self.label}: {name} FAILED: {self.errors[name]}")
            if os.environ.get("MOPRO_BENCH_TRACEBACK"):
                import traceback

                traceback.print_exc()
        self.seconds[name] = round(elapsed(), 1)
        self.progress(f"{self.label}: {name} done in {self.seconds[name]} s")
