"""Options only one loader backend reads: the recipe's `loader.dali.*` (and programmatic ones).

`DaliOptions` is the recipe schema's `loader.dali` section (mopro_fast/config/schema.py), so the
recipe and code build the same object. FFCV has no options of its own (its knobs are the shared
`workers` and `prefetch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mopro_fast.config.schema import DaliConfig as DaliOptions

DALI_DECODE = ("once", "roi")


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
