"""Host memory for batches: keep freed large blocks for reuse instead of returning them to the OS.

A float32 batch of one view, 64 x 3 x 224 x 224, is 38.5 MB. glibc's malloc serves blocks above its
mmap threshold (dynamic, at most 32 MB) with a fresh `mmap` and gives them back with `munmap` on
free, so every such tensor is new memory: its first write page-faults once per 4 KiB page. On this
2-core machine that made normalising a batch (`batch.normalize_uint8`: uint8 -> float, then two
ops) cost 1.5 ms per image and view, 2 of the 3 ms that the `torch` backend's main process spent
per sample; with freed blocks kept for reuse it costs 0.15 ms (`mopro-fast bench loader`; the
same in every backend, each of which hands over fresh tensors).

`keep_freed_blocks()` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB
(`mallopt(M_MMAP_THRESHOLD)`, `mallopt(M_TRIM_THRESHOLD)`), once per process, when a loader is
built: freed batch memory stays in the heap and the next batch of the same size reuses it, already
mapped. The cost: the process keeps up to about that much freed memory mapped instead of giving it
back. Values are unchanged (only where memory comes from). A no-op off glibc (macOS, musl), and
off altogether with MOPRO_FAST_HOST_MEMORY=os (the glibc defaults), so its effect can be measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below this come from the heap (and go back to it)
TRIM_THRESHOLD = (1 << 31) - 1  # free heap top kept mapped up to this size
ENV = "MOPRO_FAST_HOST_MEMORY"  # "os": leave glibc's defaults
_state: dict[str, str] = {}


def keep_freed_blocks() -> str:
    """Tune this process's glibc malloc once (module docstring); returns what was done:
    "reuse" (tuned), "os" (left to the defaults on request) or "unavailable" (no glibc)."""
    if "mode" in _state:
        return _state["mode"]
    mode = "os" if os.environ.get(ENV, "").lower() == "os" else "reuse"
    if mode == "reuse":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mode = "unavailable"
        else:
            ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            mode = "reuse" if ok else "unavailable"
    _state["mode"] = mode
    return mode
