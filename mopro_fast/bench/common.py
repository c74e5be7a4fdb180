"""Shared pieces of the benchmarks: what machine and versions a result came from, and timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable


def environment(device: str = "cpu") -> dict:
    """Device, core count and library versions, recorded with every result."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "device": device}
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
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Run `fn` `warmup` times untimed, then `repeats` times; the median wall time and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def emit(result: dict, as_json: bool) -> None:
    """Print a result: JSON for machines (`--json`), or aligned key/value lines for people."""
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=False))
        return
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key:>24}: {value}")
