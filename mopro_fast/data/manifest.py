"""Read `OUT/manifest.json`, as written by `mopro-fast convert` (data_tools/convert.py); its
structure, `ManifestDoc`, is defined once in mopro_fast/manifest_doc.py for both sides.

Only what the loaders need: the class count, and per split its shard files (with their sample
counts, so the loaders can plan who reads what without opening a tar) and its sample total.
Every problem is a `ManifestError` with a one-line message naming the file or split; a shard
whose size differs from the manifest's record (a truncated copy) is a `ShardError` (errors.py),
checked with one stat per shard when the loaders start (a full sha256 check is `mopro-fast verify`).

The root may be a URL (`s3://`, `gs://`, `http(s)://`; remote.py): the manifest is then read over
the network, the shard paths are URLs, and the per-shard checks happen where the shards are read
(source.py: the cache verifies each shard's sha256 once; a stream is checked by its sample count).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mopro_fast.errors import MoproError
from mopro_fast.data.errors import ShardError, check_size
from mopro_fast.data.remote import is_url, join, location, read_url
from mopro_fast.manifest_doc import BetonEntry, ManifestDoc, ShardEntry, SplitSummary

__all__ = ["MANIFEST", "BetonEntry", "Manifest", "ManifestDoc", "ManifestError", "ShardEntry", "ShardInfo",
           "SplitSummary", "read_manifest"]

MANIFEST = "manifest.json"


class ManifestError(MoproError):
    """The shards folder cannot be used as it is; one line saying why."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path | str  # absolute path (or URL) of the .tar
    samples: int  # samples in it, as the manifest says
    bytes: int | None = None  # its size, as the manifest says (None in manifests without it)
    file: str = ""  # the .tar relative to the root, as the manifest names it
    sha256: str | None = None
    index: str = ""  # its DALI .idx, relative to the root
    index_sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    root: Path | str  # the folder holding manifest.json (a URL kept as a string: remote.location)
    doc: ManifestDoc
    sha256: str = ""  # of manifest.json's bytes (names the shard cache's folder: cache.py)

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    @property
    def num_classes(self) -> int:
        return self.doc.num_classes

    @property
    def splits(self) -> dict[str, SplitSummary]:
        return self.doc.splits

    def split(self, name: str) -> SplitSummary:
        try:
            return self.splits[name]
        except KeyError:
            have = ", ".join(sorted(self.splits)) or "none"
            raise ManifestError(f"split {name!r} is not in {join(self.root, MANIFEST)} (it has: {have})") from None

    def num_written(self, name: str) -> int:
        """Samples of split `name` that made it into shards."""
        return self.split(name).num_written

    def shards(self, name: str, check_files: bool = True) -> list[ShardInfo]:
        """The shards of split `name`, in manifest order (the order convert wrote them)."""
        info = self.split(name)
        if not info.shards and info.num_written and info.beton is not None:
            raise ManifestError(f"{self.root} holds FFCV .beton files only (convert --format ffcv): use "
                                f"loader.backend=ffcv, or convert with --format both for the other backends")
        shards = [ShardInfo(join(self.root, s.file), s.samples, s.bytes, s.file, s.sha256, s.index, s.index_sha256)
                  for s in info.shards]
        if sum(s.samples for s in shards) != info.num_written:
            raise ManifestError(f"{join(self.root, MANIFEST)}: split {name!r} lists shards with "
                                f"{sum(s.samples for s in shards)} samples but num_written is {info.num_written}")
        if check_files and not self.remote:
            for shard in shards:
                if not shard.path.is_file():
                    raise ManifestError(f"shard {shard.path} of split {name!r} is listed in the manifest but missing")
                check_size(shard.path, shard.bytes)
        return shards


def read_manifest(root: Path | str) -> Manifest:
    """Load `root/manifest.json` (root a folder or a URL); a missing or unreadable manifest raises ManifestError."""
    root = location(root)
    if isinstance(root, str):
        return _parse(root, f"{root}/{MANIFEST}", _read_remote(root))
    path = root / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not root.is_absolute() and not root.exists():
            # e.g. a checkpoint's config from a run started in another folder
            raise ManifestError(f"no {MANIFEST} in {root}: the path is relative and {Path.cwd()} has no {root}; "
                                f"pass the shards as an absolute path, data.shards=/path/to/shards") from None
        raise ManifestError(f"no {MANIFEST} in {root}: run `mopro-fast convert SRC {root}` first") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return _parse(root, path, data)


def _read_remote(root: str) -> bytes:
    try:
        return read_url(f"{root}/{MANIFEST}")
    except ShardError as exc:  # remote.RemoteError: not there, not allowed, unreachable
        raise ManifestError(str(exc)) from None


def _parse(root: Path | str, path: Path | str, data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    try:
        return Manifest(root, ManifestDoc.from_json(raw), hashlib.sha256(data).hexdigest())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path} is not a mopro-fast manifest (missing or bad key {exc})") from None
