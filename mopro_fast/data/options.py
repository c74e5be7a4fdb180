"""Options only one loader backend reads: the recipe's `loader.dali.*` (and programmatic ones).

Kept free of heavy imports: mopro_fast.config nests `DaliOptions` as the `loader.dali` section.
FFCV has no options of its own (its knobs are the shared `workers` and `prefetch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DALI_DECODE = ("once", "roi")


@dataclass
class DaliOptions:
    hw_decoder_load: float = 0.65
    """Share of JPEG decoding sent to the A100/H100 hardware decoder (DALI on CUDA only), in [0, 1]."""
    decode: str = "once"
    """"once": one full decode then two crops; "roi": two decodes of just the crops' regions."""

    def check(self) -> None:
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"loader.dali.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.decode not in DALI_DECODE:
            raise ValueError(f"loader.dali.decode must be one of {', '.join(DALI_DECODE)}, got {self.decode!r}")


@dataclass
class NvjpegOptions:
    """Not a recipe section: the output dtype is float32 by the Batch contract; benchmarks on a GPU
    with a bf16 recipe ask for bfloat16 (what the first convolution reads under autocast)."""

    dtype: torch.dtype = torch.float32

    def check(self) -> None:
        if not self.dtype.is_floating_point:
            raise ValueError(f"nvjpeg dtype must be a floating dtype, got {self.dtype}")


def option_names() -> set[str]:
    """Every backend option name (the factory's keyword form accepts and routes them)."""
    from dataclasses import fields

    return {f.name for cls in (DaliOptions, NvjpegOptions) for f in fields(cls)}


def make_options(cls: type | None, values: dict[str, Any]) -> Any:
    """`cls(**values)` keeping only the fields `cls` has (None when the backend has no options)."""
    if cls is None:
        return None
    from dataclasses import fields

    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own})
