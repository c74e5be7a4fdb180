"""Damaged shards, one line: the error every loader backend raises when a shard (or .beton) is unreadable.

A truncated tar, a JPEG whose bytes were overwritten, a .beton cut short: training, `eval` and
`clean` read the same loaders, so each backend maps what its library raises (tarfile errors,
torchvision's decode_jpeg, DALI's pipeline errors, FFCV's decoder status) to one `ShardError`
whose message names the file, the sample when it is known, and suggests `mopro-fast verify`.

`ShardError` keeps its message as its only argument, so it survives pickling. torch's DataLoader
re-raises a worker's exception as `type(exc)("Caught ... Original Traceback ...")`; the
constructor recognises that text and keeps only the original one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path

from mopro_fast.errors import MoproError


class ShardError(MoproError):
    """A shard or .beton that cannot be read; the message is one line naming it and what to do."""

    def __init__(self, message: str) -> None:
        text = str(message)
        mark = f"{type(self).__name__}: "  # ShardError, or a subclass's name (remote.RemoteError)
        if "Original Traceback" in text and mark in text:  # re-raised from a DataLoader worker
            text = text[text.rindex(mark) + len(mark):].strip().splitlines()[0]
        super().__init__(" ".join(text.split()))
        self.message = str(self)  # kept apart: libraries that re-raise may append to `args`


def shards_root(path: Path | str) -> Path:
    """The shards folder (the one with manifest.json) holding `path`; its parent when none is found."""
    path = Path(path)
    for folder in path.parents:
        if (folder / "manifest.json").is_file():
            return folder
    return path.parent


def reason(exc: BaseException) -> str:
    """A short one-line reason from a library exception (torchvision's source location dropped)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\w+, \S+\.(?:cpp|cu|h):\d+, ", "", text)  # "decode_jpeg, /x/decode_jpeg.cpp:171, ..."
    if isinstance(exc, KeyError):
        text = f"a sample lacks its {text} member"
    return text[:200]


def damaged(shard: Path | str, what: str, key: str | None = None, after: str | None = None) -> ShardError:
    """The ShardError for `shard`: `what` went wrong, at sample `key` (or just after sample `after`)."""
    where = (f"sample {key} of {shard}" if key else f"after sample {after} of {shard}" if after
             else f"{shard}")
    return ShardError(f"damaged shard: {what} ({where}); run `mopro-fast verify {shards_root(shard)}` to list "
                      f"every damaged file, then re-convert or restore it")


def damaged_split(root: Path | str, split: str, what: str) -> ShardError:
    """The ShardError when the damaged file cannot be named (DALI decode errors): name the split."""
    return ShardError(f"damaged shard: {what} (one of the shards of split {split!r} in {root}); run "
                      f"`mopro-fast verify {root}` to find it, then re-convert or restore it")


def check_size(path: Path, expected: int | None, what: str = "shard") -> None:
    """Raise ShardError when `path`'s size differs from the manifest's record (cheap: one stat)."""
    if expected is None:
        return
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise damaged(path, f"cannot read the {what} ({exc.strerror})") from None
    if size != int(expected):
        cut = "truncated" if size < int(expected) else "grown"
        raise damaged(path, f"the {what} is {size} bytes but the manifest says {int(expected)} ({cut} or replaced)")
