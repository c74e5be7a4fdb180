"""WebDataset shard files: deterministic tar writing, DALI index files, sample fields.

A sample is a group of tar members `<key>.<ext>` (WebDataset convention). Fields written:
    jpg   RGB JPEG bytes
    cls   web label as ASCII decimal (WebDataset's convention, read by `webdataset`)
    lbl   web label, int32 little-endian (read by DALI's reader without Python callbacks)
    sid   sample index within the split, int32 little-endian (same reason)
    json  {"path", "source", "label", "index", "query", "width", "height", "orig_width", ...}

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644) so the same samples always give
the same bytes. The index file is the text format of DALI's `wds2idx` (version v1.2): a header
line `v1.2 <samples>`, then one line per sample listing `<ext> <data offset> <size> <member name>`
for each of its members, in tar order.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mopro_fast import safe_io
from mopro_fast.safe_io import atomic_write

FIELDS = ("cls", "jpg", "json", "lbl", "sid")  # written in this order for every sample
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    label: int
    index: int
    meta: dict

    def members(self) -> dict[str, bytes]:
        return {
            "cls": str(self.label).encode(),
            "jpg": self.jpg,
            "json": json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode(),
            "lbl": struct.pack("<i", self.label),
            "sid": struct.pack("<i", self.index),
        }


class _NoSamples(Exception):
    """Raised inside `write_tar`'s writer so that safe_io discards the temporary file of an empty shard."""


def write_tar(path: Path, samples: Iterable[Sample], expected: int | None = None) -> list[tuple[str, int, int]] | None:
    """Write samples to `path` with byte-stable tar headers (GNU format, no timestamps), atomically.

    The tar goes to a temporary name beside `path` and is renamed once complete (mopro_fast.safe_io):
    on any failure the temporary file is gone and an OS error is an `OutputError` (one line; on a
    full disk it quotes the size the shard would have, extrapolated from `expected` samples).
    Returns (member name, data offset, size) per member, so the index needs no second read; or
    None, with no file written, when `samples` yields nothing (DALI refuses empty tars).
    """
    members: list[tuple[str, int, int]] = []
    done = {"samples": 0, "bytes": 0}

    def write(fh) -> None:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.members().items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    start = tar.offset
                    done["bytes"] = start + len(data)
                    tar.addfile(info, io.BytesIO(data))
                    # Data follows the header block(s): padded size = end - start - header length.
                    header = len(info.tobuf(tarfile.GNU_FORMAT, tar.encoding, tar.errors))
                    members.append((info.name, start + header, info.size))
                done["samples"] += 1
        if not members:
            raise _NoSamples

    def needed() -> int:
        per_sample = done["bytes"] / max(done["samples"], 1)
        return int(max(done["bytes"], per_sample * (expected or 0)))

    try:
        atomic_write(path, write, needed=needed)
    except _NoSamples:
        return None
    return members


def split_name(name: str) -> tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`): the first dot of the base name splits."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def iter_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of each regular file in the tar, in order."""
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, member.offset_data, member.size


def build_index(path: Path) -> str:
    """The DALI `wds2idx` index text for the tar at `path` (same grouping rule as DALI)."""
    return index_text(iter_members(path))


def index_text(members: Iterable[tuple[str, int, int]]) -> str:
    """Index text from (member name, data offset, size) in tar order."""
    groups: list[list[str]] = []
    last = None
    for name, offset, size in members:
        base, ext = split_name(name)
        if not base or base.endswith("/"):
            continue  # hidden files such as `.keep`, skipped by DALI's tool too
        entry = f"{ext} {offset} {size} {name}"
        if base != last:
            groups.append([entry])
            last = base
        else:
            groups[-1].append(entry)
    lines = [f"{INDEX_VERSION} {len(groups)}"] + [" ".join(g) for g in groups]
    return "\n".join(lines) + "\n"


def read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a shard into samples: (key, {ext: bytes})."""
    with tarfile.open(path, mode="r:") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isreg():
                continue
            base, ext = split_name(member.name)
            if base != key and key is not None:
                yield key, fields
                fields = {}
            key = base
            fields[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, flush to disk, then rename over `path`
    (mopro_fast.safe_io: no temporary file survives a failure; OS errors are one-line `OutputError`s)."""
    safe_io.atomic_write_bytes(path, data)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
