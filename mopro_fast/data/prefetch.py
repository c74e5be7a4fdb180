"""Run a batch-making function a few items ahead in a background thread (on a side CUDA stream).

The `nvjpeg` backend decodes and augments on the training device in the main process. Done
inline, that work would sit between two training steps; here a thread makes the next `depth`
batches while the current step runs. On CUDA the thread issues its kernels on its own stream,
records an event per item, and the consumer makes its stream wait on that event (no host sync)
and marks the item's tensors as used by its stream, so the caching allocator cannot hand their
memory back to the side stream too early. torch ops release the GIL, so on a CPU the thread
overlaps too. Errors in the thread are raised in the consumer; stopping the consumer early
stops the thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")
_END = object()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside `obj` (dataclasses, tuples, lists, dict values)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def prefetch(items: Iterable[T], make: Callable[[T], U], depth: int, device: torch.device) -> Iterator[U]:
    """`make(item)` for each item, in order, computed up to `depth` items ahead (depth 0: inline)."""
    if depth < 1:
        for item in items:
            yield make(item)
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the thread must name the device it works on
        device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device) if cuda else None

    def put(entry: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            if cuda:
                torch.cuda.set_device(device)
            for item in items:
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(side):
                        result = make(item)
                        event = torch.cuda.Event()
                        event.record(side)
                else:
                    result, event = make(item), None
                if not put((result, event)):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=work, name="mopro-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            entry = out.get()
            if entry is _END:
                return
            if isinstance(entry, BaseException):
                raise entry
            result, event = entry
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)  # the GPU waits, the host does not
                for tensor in _tensors(result):
                    if tensor.is_cuda:
                        tensor.record_stream(current)
            yield result
    finally:
        stop.set()
        while thread.is_alive():  # unblock a thread waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)
