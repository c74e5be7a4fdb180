"""The plan of `mopro-fast convert`: which records go into which shard (data_tools/convert.py).

`plan` is a pure function of the listing and the settings: each split's records (the training
split in a seeded random order, so shards are class-mixed) are cut into shards of `shard_size`.
A `ShardTask` is one shard: a view of rows of the split's compact table (data_tools/records.py),
so planning 16 M records costs one index array, not a Record each; `records_digest` is what a
re-run compares to reuse a finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_tools.outdir import FORMAT
from data_tools.records import RecordTable, RecordView

if TYPE_CHECKING:
    from data_tools.convert import ConvertSettings
    from data_tools.webvision import Split


@dataclass(frozen=True, eq=False)
class ShardTask:
    """One shard to write: rows `rows` of the split's compact `table` (data_tools/records.py).

    A task holds a view, not Records: a plan of 16 M records is the table plus one index array.
    Sent to a worker process it pickles as a copy of its own rows only (`__reduce__`)."""

    split: str
    number: int
    table: RecordTable
    rows: np.ndarray  # int64 rows of `table`, in shard order
    out: str
    fingerprint: str
    prefix: str = ""  # "" = the shard is output; WORK + "/" = a work file of an ffcv-only conversion

    def __reduce__(self):
        own = self.table.take(self.rows)
        return ShardTask, (self.split, self.number, own, np.arange(len(own), dtype=np.int64), self.out,
                           self.fingerprint, self.prefix)

    @property
    def records(self) -> RecordView:
        return RecordView(self.table, self.rows)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"

    @property
    def tar_rel(self) -> str:
        return f"{self.prefix}{self.split}/{self.name}.tar"

    @property
    def idx_rel(self) -> str:
        return f"{self.prefix}{self.split}/{self.name}.idx"

    @property
    def state_path(self) -> Path:
        return Path(self.out) / ".state" / f"{self.name}.json"

    def records_digest(self) -> str:
        """A digest of the shard's records and of what is on disk for each: file type, size and
        mtime_ns from one stat (no read), or the error stat gave.

        Stat, rather than content hashes, keeps a resume cheap; it is done here, streaming into
        the digest, so nothing per record is held beyond the plan. A worker computes the digest
        before it reads any file of the shard (a file changed during the conversion then fails
        the next check, never the other way round) and stores it in the shard's state; a re-run
        recomputes it for each shard that has a state file (in threads: stat waits on the disk),
        and a change in any input file redoes that shard only.
        """
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.key}\t{r.path}\t{r.label}\t{r.index}\t{r.source}\t{_stat_tag(r.file())}\n".encode())
        return digest.hexdigest()


def _stat_tag(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"error:{exc.errno}"
    return f"{stat.S_IFMT(st.st_mode):o}:{st.st_size}:{st.st_mtime_ns}"


def plan(splits: dict[str, Split], settings: ConvertSettings, out: Path, prefix: str = "") -> list[ShardTask]:
    fingerprint = _fingerprint(settings)
    tasks = []
    for name, split in splits.items():
        rows = split.rows
        if name == "train":
            # Shards in listing order would be class-sorted; a seeded shuffle mixes them once. (The
            # permutation random.shuffle gives a list of the records, drawn on a compact array.)
            order = array("q", range(len(rows)))
            random.Random(settings.seed).shuffle(order)
            rows = rows[np.frombuffer(order, dtype=np.int64)]
            del order
        size = settings.shard_size
        for number, start in enumerate(range(0, len(rows), size)):
            tasks.append(ShardTask(name, number, split.table, rows[start:start + size], str(out), fingerprint, prefix))
    return tasks


def _fingerprint(settings: ConvertSettings) -> str:
    blob = json.dumps({"settings": asdict(settings), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
