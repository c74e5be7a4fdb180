"""Listed records in bounded memory: a split as a few numpy columns, not one Python object per line.

DESIGN.md section 5: WebVision 2.0 lists 16 M training images, and nothing in the listing, the
planner or the manifest may hold a Python object per record for all of them at once. A
`RecordTable` holds one split's lines in listing order as columns: the line's position in the split
(`index`, int64), its label (int32), its source (uint8, a code into `sources`) and its path (one
uint8 blob of UTF-8 bytes plus int64 offsets). A `Record` is made only when asked for
(`RecordTable.record`, `RecordView`), e.g. for the 2,000 records of the shard a worker converts.

Keys (`make_key`) are computed from the path when a record is made; the few that are not
(`make_key` of two different paths alike: a path-hash suffix; a path listed again: `-dup<index>`)
are kept in a dict. Duplicates and key clashes are found without a set of 16 M strings: each path
gets a 64-bit polynomial hash of its bytes and one of the characters its key keeps but '_' (equal
keys give equal hashes of the second kind), the hashes are sorted, and only rows whose hash is not
unique are compared as strings, in listing order, exactly as a sequential listing would.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Record:
    """One listed image. `path` is relative to `root`; `index` is its position in its split."""

    key: str
    root: str
    path: str
    label: int
    source: str
    index: int
    query: int | None = None

    def file(self) -> Path:
        return Path(self.root) / self.path

    def to_json(self) -> dict:
        out = {"key": self.key, "path": self.path, "label": self.label, "source": self.source,
               "index": self.index}
        if self.query is not None:
            out["query"] = self.query
        return out


def make_key(path: str) -> str:
    """A WebDataset-safe key from a relative path: extension dropped, no dots or slashes.

    WebDataset (and DALI's reader) split a member name at the first dot of its base name, so a
    key must hold no '.', and '/' would make it a directory.
    """
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "x"


def query_of(path: str) -> int | None:
    """The query id of a WebVision path (`google/q0001/...` -> 1), None if it has none."""
    match = re.search(r"(?:^|/)q(\d+)/", path)
    return int(match.group(1)) if match else None


HASH_ROWS = 1 << 16  # paths hashed at once (temporaries: ~60 bytes per path byte)
_P = np.uint64(0x100000001B3)  # an odd 64-bit multiplier (FNV's prime); arithmetic wraps mod 2^64
_KEPT = np.zeros(256, dtype=bool)  # bytes a key keeps besides '_' (make_key's [A-Za-z0-9-])
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-":
    _KEPT[_c] = True


def _powers(n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.cumprod(np.full(max(n, 1), _P, dtype=np.uint64), dtype=np.uint64)


def _segment_hash(values: np.ndarray, rank: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per segment (consecutive runs of `counts` elements): sum of values * P^(rank+1), mod 2^64."""
    out = np.zeros(len(counts), dtype=np.uint64)
    if len(values) == 0:
        return out
    with np.errstate(over="ignore"):
        terms = values.astype(np.uint64) * _powers(int(rank.max()) + 1)[rank]
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    out[nonempty] = np.add.reduceat(terms, starts)
    return out


def path_hashes(blob: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each path's bytes, hash of the key characters but '_' of its stem), both uint64 per
    path, for paths stored back to back in `blob` (uint8) with `lengths` (int64)."""
    n = len(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    line = np.repeat(np.arange(n, dtype=np.int64), lengths)  # path of each byte
    pos = np.arange(len(blob), dtype=np.int64) - starts[line]
    h_path = _segment_hash(blob, pos, lengths)
    # the stem ends at the last '.' of the base name (make_key drops the extension)
    stem_end = starts + lengths
    slash = np.full(n, -1, dtype=np.int64)
    at = np.flatnonzero(blob == ord("/"))
    if len(at):
        last = np.r_[line[at][1:] != line[at][:-1], True]
        slash[line[at][last]] = at[last]
    at = np.flatnonzero(blob == ord("."))
    if len(at):
        last = np.r_[line[at][1:] != line[at][:-1], True]
        rows, dots = line[at][last], at[last]
        after = dots > slash[rows]
        stem_end[rows[after]] = dots[after]
    kept = _KEPT[blob] & (np.arange(len(blob), dtype=np.int64) < stem_end[line])
    rank = np.cumsum(kept) - 1
    counts = np.bincount(line[kept], minlength=n).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_kept = rank[kept] - first[line[kept]]
    return h_path, _segment_hash(blob[kept], rank_kept, counts)


class RecordTable:
    """One split's listed lines as columns (see the module docstring); rows in listing order."""

    def __init__(self, root: str, sources: Sequence[str], index: np.ndarray | None, label: np.ndarray,
                 source: np.ndarray, blob: np.ndarray, offsets: np.ndarray, keys: dict[int, str] | None = None,
                 prefix: str = "") -> None:
        self.root, self.sources, self.prefix = str(root), tuple(sources), prefix
        # n (int64; None: the row itself, as in a split's own table), n (int32), n (uint8)
        self._index, self.label, self.source = index, label, source
        self.blob, self.offsets = blob, offsets  # total bytes (uint8), n + 1 (int64)
        self.keys = keys or {}  # index -> key, where it is not make_key(path)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def index(self) -> np.ndarray:
        """Each row's position in its split (int64)."""
        return np.arange(len(self), dtype=np.int64) if self._index is None else self._index

    def index_of(self, row: int) -> int:
        return row if self._index is None else int(self._index[row])

    @property
    def nbytes(self) -> int:
        own = [] if self._index is None else [self._index]
        return sum(a.nbytes for a in (*own, self.label, self.source, self.blob, self.offsets))

    def path(self, row: int) -> str:
        return self.prefix + self.blob[self.offsets[row]:self.offsets[row + 1]].tobytes().decode()

    def record(self, row: int) -> Record:
        path, index = self.path(row), self.index_of(row)
        return Record(key=self.keys.get(index) or make_key(path), root=self.root, path=path,
                      label=int(self.label[row]), source=self.sources[self.source[row]], index=index,
                      query=query_of(path))

    def take(self, rows: np.ndarray) -> RecordTable:
        """A compact copy holding only `rows` (in that order): what a shard task sends to a worker."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        index = rows.copy() if self._index is None else self._index[rows]
        keys = {i: self.keys[i] for i in index.tolist() if i in self.keys} if self.keys else {}
        return RecordTable(self.root, self.sources, index, self.label[rows], self.source[rows], self.blob[starts],
                           offsets, keys, self.prefix)

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """Find repeated paths and key clashes; returns (rows of records, rows of duplicates), both in
        listing order, and fills `keys` for the rows whose key is not make_key(path)."""
        n = len(self)
        h_path, h_key = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
        for a in range(0, n, HASH_ROWS):  # in slices: the hashing's temporaries are ~40 bytes per path byte
            b = min(a + HASH_ROWS, n)
            h_path[a:b], h_key[a:b] = path_hashes(self.blob[self.offsets[a]:self.offsets[b]],
                                                  np.diff(self.offsets[a:b + 1]))
        dup = np.zeros(n, dtype=bool)
        seen: dict[str, int] = {}
        for row in _clashing(h_path, np.arange(n)):
            path = self.path(row)
            if path in seen:
                dup[row] = True
            else:
                seen[path] = row
        records, duplicates = np.flatnonzero(~dup), np.flatnonzero(dup)
        taken: set[str] = set()
        for row in _clashing(h_key[records], records):
            path = self.path(row)
            key = make_key(path)
            if key in taken:  # two different paths that sanitise alike: a path hash keeps keys unique and stable
                key = f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"
                self.keys[self.index_of(row)] = key
            taken.add(key)
        for row in duplicates.tolist():
            index = self.index_of(row)
            self.keys[index] = f"{make_key(self.path(row))}-dup{index}"
        return records, duplicates


def _clashing(hashes: np.ndarray, rows: np.ndarray) -> list[int]:
    """The rows (ascending) whose hash another row shares."""
    if len(hashes) < 2:
        return []
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(same) == 0:
        return []
    return sorted(set(rows[order[same]].tolist()) | set(rows[order[same + 1]].tolist()))


class RecordView(Sequence):
    """Records of a table's `rows` as a read-only sequence; each is made when it is read."""

    def __init__(self, table: RecordTable, rows: np.ndarray) -> None:
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordView(self.table, self.rows[i])
        return self.table.record(int(self.rows[i]))

    def __iter__(self) -> Iterator[Record]:
        for row in self.rows.tolist():
            yield self.table.record(row)

    def __bool__(self) -> bool:
        return len(self.rows) > 0


def table_of(root: str, lines: Sequence[tuple[str, int, str]], prefix: str = "") -> RecordTable:
    """A table from (path, label, source) tuples (small listings: ImageNet val, tests)."""
    sources = tuple(dict.fromkeys(s for _, _, s in lines))
    code = {s: i for i, s in enumerate(sources)}
    encoded = [p.encode() for p, _, _ in lines]
    lengths = np.array([len(b) for b in encoded], dtype=np.int64)
    return RecordTable(root, sources, None,
                       np.array([y for _, y, _ in lines], dtype=np.int32),
                       np.array([code[s] for _, _, s in lines], dtype=np.uint8),
                       np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
                       np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), prefix=prefix)
