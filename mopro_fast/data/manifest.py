"""Read `OUT/manifest.json`, as written by `mopro-fast convert` (data_tools/convert.py); its
structure, `ManifestDoc`, is defined once in mopro_fast/manifest_doc.py for both sides.

Only what the loaders need: the class count, and per split its shard files (with their sample
counts, so the loaders can plan who reads what without opening a tar) and its sample total.
Every problem is a `ManifestError` with a one-line message naming the file or split; a shard
whose size differs from the manifest's record (a truncated copy) is a `ShardError` (errors.py),
checked with one stat per shard when the loaders start (a full sha256 check is `mopro-fast verify`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mopro_fast.errors import MoproError
from mopro_fast.data.errors import check_size
from mopro_fast.manifest_doc import BetonEntry, ManifestDoc, ShardEntry, SplitSummary

__all__ = ["MANIFEST", "BetonEntry", "Manifest", "ManifestDoc", "ManifestError", "ShardEntry", "ShardInfo",
           "SplitSummary", "read_manifest"]

MANIFEST = "manifest.json"


class ManifestError(MoproError):
    """The shards folder cannot be used as it is; one line saying why."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # absolute path of the .tar
    samples: int  # samples in it, as the manifest says
    bytes: int | None = None  # its size, as the manifest says (None in manifests without it)


@dataclass(frozen=True)
class Manifest:
    root: Path  # the folder holding manifest.json
    doc: ManifestDoc

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
            raise ManifestError(f"split {name!r} is not in {self.root / MANIFEST} (it has: {have})") from None

    def num_written(self, name: str) -> int:
        """Samples of split `name` that made it into shards."""
        return self.split(name).num_written

    def shards(self, name: str, check_files: bool = True) -> list[ShardInfo]:
        """The shards of split `name`, in manifest order (the order convert wrote them)."""
        info = self.split(name)
        if not info.shards and info.num_written and info.beton is not None:
            raise ManifestError(f"{self.root} holds FFCV .beton files only (convert --format ffcv): use "
                                f"loader.backend=ffcv, or convert with --format both for the other backends")
        shards = [ShardInfo(self.root / s.file, s.samples, s.bytes) for s in info.shards]
        if sum(s.samples for s in shards) != info.num_written:
            raise ManifestError(f"{self.root / MANIFEST}: split {name!r} lists shards with "
                                f"{sum(s.samples for s in shards)} samples but num_written is {info.num_written}")
        if check_files:
            for shard in shards:
                if not shard.path.is_file():
                    raise ManifestError(f"shard {shard.path} of split {name!r} is listed in the manifest but missing")
                check_size(shard.path, shard.bytes)
        return shards


def read_manifest(root: Path | str) -> Manifest:
    """Load `root/manifest.json`; a missing or unreadable manifest raises ManifestError."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        if not root.is_absolute() and not root.exists():
            # e.g. a checkpoint's config from a run started in another folder
            raise ManifestError(f"no {MANIFEST} in {root}: the path is relative and {Path.cwd()} has no {root}; "
                                f"pass the shards as an absolute path, data.shards=/path/to/shards") from None
        raise ManifestError(f"no {MANIFEST} in {root}: run `mopro-fast convert SRC {root}` first") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    try:
        return Manifest(root, ManifestDoc.from_json(raw))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path} is not a mopro-fast manifest (missing or bad key {exc})") from None
