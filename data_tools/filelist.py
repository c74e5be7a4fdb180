"""Reading a WebVision file list ("<relative path> <label>" per line) in chunks, with numpy.

`read_file_list` streams the file in chunks of whole lines (2 MB) and parses each with array
operations: line bounds, the one space before the label, the label's digits, the path checks. A
chunk that holds anything this fast path does not handle exactly (non-ASCII bytes, tabs, a lone
CR, leading, trailing or repeated spaces, a bad line) is parsed line by line in Python with the
rules of `data_tools.webvision` (which also gives the one-line error naming file and line), so
both paths give the same result; the fast one only ever sees plain lines. What comes back is
compact (`Columns`, filled in place): labels (int32), source codes (uint8), the paths' bytes back
to back (uint8) and their lengths (int64), only for lines with a label below `limit`.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

CHUNK = 2 << 20  # bytes of file text parsed at once: bounds the temporaries (~40 bytes per byte)
_DIGITS = 9  # longer labels take the slow path (no class count comes near 10^9)
_POW10 = 10 ** np.arange(_DIGITS, dtype=np.int64)


class Columns:
    """The compact columns that file lists are read into, preallocated from the files' sizes (so
    nothing is concatenated, or copied twice, on the way): labels (int32), source codes (uint8),
    path lengths (int64) per line, and the paths' bytes back to back (uint8)."""

    def __init__(self, paths: list[Path]) -> None:
        lines = sum(_count_lines(p) for p in paths)
        self.label = np.empty(lines, np.int32)
        self.source = np.empty(lines, np.uint8)
        self.length = np.empty(lines, np.int64)
        self.blob = np.empty(sum(p.stat().st_size for p in paths), np.uint8)  # paths are shorter than lines
        self.n = self.nbytes = 0

    def add(self, label: np.ndarray, blob: np.ndarray, length: np.ndarray, code: int) -> None:
        n, b = len(label), len(blob)
        self.label[self.n:self.n + n] = label
        self.source[self.n:self.n + n] = code
        self.length[self.n:self.n + n] = length
        self.blob[self.nbytes:self.nbytes + b] = blob
        self.n, self.nbytes = self.n + n, self.nbytes + b

    def offsets(self) -> np.ndarray:
        """n + 1 int64 offsets of the paths in the blob."""
        out = np.empty(self.n + 1, np.int64)
        out[0] = 0
        np.cumsum(self.length[:self.n], out=out[1:])
        return out


def _count_lines(path: Path) -> int:
    """An upper bound on the lines of `path` (newlines + 1), read in chunks."""
    count = 1
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            count += block.count(b"\n")
    return count


def read_file_list(path: Path, limit: int, slow_line: Callable[[str, int], tuple[str, int] | None],
                   undecodable: Callable[[UnicodeDecodeError, int], Exception],
                   num_classes: int, out: Columns, code: int) -> None:
    """Add to `out` (with source `code`) the lines of `path` whose label is below `limit`.

    `slow_line(text, lineno)` parses one stripped, non-comment line exactly (raising the listing's
    error for a bad one); `undecodable(exc, offset)` makes the error for bytes that are not UTF-8.
    Labels at or above `num_classes` are errors (the slow path raises them).
    """
    lineno = 0
    for chunk, offset in _chunks(path):
        try:
            codecs.decode(chunk, "utf-8")
        except UnicodeDecodeError as exc:
            raise undecodable(exc, offset) from None
        data = np.frombuffer(chunk, dtype=np.uint8)
        parsed = _fast(data, num_classes)
        if parsed is None:
            parsed, lines = _slow(chunk.decode(), lineno, slow_line)
        else:
            lines = int(np.count_nonzero(data == 10)) + (1 if len(data) and data[-1] != 10 else 0)
        lineno += lines
        y, blob, length = parsed
        keep = y < limit
        if not keep.all():
            blob = blob[np.repeat(keep, length)]
            y, length = y[keep], length[keep]
        out.add(y, blob, length, code)


def _chunks(path: Path) -> Iterator[tuple[bytes, int]]:
    """The file's bytes in pieces that end at a line end (the BOM of an editor dropped)."""
    with open(path, "rb") as fh:
        rest, offset = b"", 0
        first = True
        while True:
            block = fh.read(CHUNK)
            if first:
                first = False
                if block.startswith(codecs.BOM_UTF8):
                    block, offset = block[3:], 3
            if not block:
                if rest:
                    yield rest, offset
                return
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            yield block[:cut], offset
            offset += cut
            rest = block[cut:]


def _slow(text: str, lineno: int, slow_line) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    lines = text.splitlines()
    y, paths = [], []
    for i, line in enumerate(lines, lineno + 1):
        line = line.strip()
        if line and not line.startswith("#"):
            name, label = slow_line(line, i)
            y.append(label)
            paths.append(name.encode())
    blob = np.frombuffer(b"".join(paths), dtype=np.uint8)
    return (np.array(y, dtype=np.int32), blob, np.array([len(p) for p in paths], dtype=np.int64)), len(lines)


def _fast(data: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Parse a chunk of plain lines; None if it holds anything else (the caller parses it slowly)."""
    n = len(data)
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    odd = (data > 126) | ((data < 32) & (data != 10) & (data != 13))
    cr = np.flatnonzero(data == 13)
    if odd.any() or (len(cr) and (cr[-1] == n - 1 or (data[cr + 1] != 10).any())):
        return None  # non-ASCII, control bytes, tabs, a CR not ending a line
    ends = np.flatnonzero(data == 10)
    if data[-1] != 10:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1] + 1])
    ends = ends - (data[np.maximum(ends - 1, 0)] == 13) * (ends > starts)  # drop the CR of CRLF
    length = ends - starts
    used = length > 0
    used[used] = data[starts[used]] != ord("#")  # blank and comment lines are skipped
    starts, ends = starts[used], ends[used]
    if len(starts) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    spaces = np.flatnonzero(data == 32)
    line_of_space = np.searchsorted(starts, spaces, side="right") - 1
    inside = (line_of_space >= 0) & (spaces < ends[np.maximum(line_of_space, 0)])
    counts = np.bincount(line_of_space[inside], minlength=len(starts))
    if (counts != 1).any():
        return None  # no label, a space in a path, leading or trailing spaces
    space = spaces[inside]  # one per line, in line order
    digits = ends - space - 1
    if (space == starts).any() or (digits < 1).any() or (digits > _DIGITS).any():
        return None
    # label digits: bytes space+1 .. end-1 of each line
    line = np.repeat(np.arange(len(starts)), digits)
    at = np.arange(int(digits.sum()), dtype=np.int64) - np.repeat(np.cumsum(digits) - digits, digits) + \
        np.repeat(space + 1, digits)
    d = data[at].astype(np.int64) - ord("0")
    if ((d < 0) | (d > 9)).any():
        return None
    y = np.bincount(line, weights=d * _POW10[np.repeat(ends, digits) - 1 - at], minlength=len(starts))
    y = y.astype(np.int64)
    if (y >= num_classes).any():
        return None  # the slow path raises the error with the line number
    # paths: bytes start .. space-1
    length = space - starts
    at = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(np.cumsum(length) - length, length) + \
        np.repeat(starts, length)
    blob = data[at]
    if (data[starts] == ord("/")).any() or _dotdot(blob, length):
        return None
    return y.astype(np.int32), blob, length.astype(np.int64)


def _dotdot(blob: np.ndarray, length: np.ndarray) -> bool:
    """Whether any path has a '..' component (the slow path raises the error)."""
    at = np.flatnonzero((blob[:-1] == 46) & (blob[1:] == 46)) if len(blob) > 1 else np.zeros(0, np.int64)
    if len(at) == 0:
        return False
    bounds = np.cumsum(length)
    first = np.zeros(len(blob) + 1, dtype=bool)
    first[np.concatenate([[0], bounds[:-1]])] = True  # a path starts here
    last = np.zeros(len(blob) + 1, dtype=bool)
    last[bounds] = True  # a path ended just before
    before = first[at] | (blob[np.maximum(at - 1, 0)] == 47)
    after = last[at + 2] | (blob[np.minimum(at + 2, len(blob) - 1)] == 47)
    return bool((before & after).any())
