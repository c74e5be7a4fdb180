"""Where each sample of a split lives: sample index -> key, original path, web label, JPEG location.

The loaders only carry the sample index (the `.sid` field); `mopro-fast clean` writes keys and
paths, and `mopro-fast report` shows images, so both need the way back from an index. The DALI
index file next to every shard (`.idx`, written by `mopro-fast convert`) lists each member's
offset and size, so the small `.json` member of every sample is read with one seek and one short
read, and the JPEG of a chosen sample is fetched the same way, without walking the tar.
A shard without its index file is read with `tarfile` instead (slower, same result).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_tools.shards import split_name
from mopro_fast.data.manifest import ManifestError, read_manifest


@dataclass(frozen=True)
class Entry:
    """One sample: its key, original path, web label, and where its JPEG bytes are."""

    index: int
    key: str
    path: str
    label: int
    shard: Path
    jpg_offset: int
    jpg_size: int


class Catalog:
    """The samples of one split by sample index (`entries[i]` is None for a rejected record)."""

    def __init__(self, entries: list[Entry | None], num_classes: int, class_names: list[str]):
        self.entries = entries
        self.num_classes = num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.entries)

    def jpeg(self, index: int) -> bytes:
        """The stored JPEG bytes of sample `index`."""
        entry = self.entries[index]
        if entry is None:
            raise KeyError(f"sample {index} was not written to the shards")
        with open(entry.shard, "rb") as fh:
            fh.seek(entry.jpg_offset)
            return fh.read(entry.jpg_size)


def _members_from_idx(idx: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Per sample, ext -> (data offset, size, member name), from a DALI wds2idx v1.2 file."""
    lines = idx.read_text().splitlines()
    samples = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) % 4:
            raise ManifestError(f"{idx}: malformed index line {line[:80]!r}; re-run `mopro-fast convert`")
        samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)})
    return samples


def _members_from_tar(shard: Path) -> list[dict[str, tuple[int, int, str]]]:
    samples: list[dict[str, tuple[int, int, str]]] = []
    last = None
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, ext = split_name(member.name)
            if base != last:
                samples.append({})
                last = base
            samples[-1][ext] = (member.offset_data, member.size, member.name)
    return samples


def read_catalog(shards: Path | str, split: str) -> Catalog:
    """Index every written sample of `split` (reads each sample's `.json` member, never a JPEG)."""
    manifest = read_manifest(shards)
    if manifest.remote:
        raise ManifestError(f"this command reads samples by file offset and needs the shards in a local folder, "
                            f"not at {manifest.root}: copy them (e.g. aws s3 sync) and set data.shards=/that/folder")
    info = manifest.split(split)
    entries: list[Entry | None] = [None] * int(info["num_listed"])
    for shard in manifest.shards(split):
        idx = shard.path.with_suffix(".idx")
        members = _members_from_idx(idx) if idx.is_file() else _members_from_tar(shard.path)
        with open(shard.path, "rb") as fh:
            for fields in members:
                if "json" not in fields or "jpg" not in fields:
                    raise ManifestError(f"{shard.path}: a sample lacks its .json or .jpg member; re-run convert")
                offset, size, name = fields["json"]
                fh.seek(offset)
                meta = json.loads(fh.read(size))
                index = int(meta["index"])
                if not 0 <= index < len(entries):
                    raise ManifestError(f"{shard.path}: sample index {index} outside the split's {len(entries)}")
                jpg_offset, jpg_size, _ = fields["jpg"]
                entries[index] = Entry(index, split_name(name)[0], meta["path"], int(meta["label"]), shard.path,
                                       jpg_offset, jpg_size)
    names = [c.get("name", str(c.get("id"))) for c in _classes(shards)] or [str(c) for c in range(manifest.num_classes)]
    return Catalog(entries, manifest.num_classes, names)


def _classes(shards: Path | str) -> list[dict]:
    raw = json.loads((Path(shards) / "manifest.json").read_text())
    return sorted(raw.get("classes", []), key=lambda c: c.get("id", 0))
