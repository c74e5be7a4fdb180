"""The structure of `OUT/manifest.json`, written by `mopro-fast convert` (data_tools/convert.py)
and read by the trainer (mopro_fast/data/manifest.py, `read_manifest`).

`ManifestDoc.to_json()` is the dict convert writes (with sorted keys, data_tools/shards.py
`atomic_write_json`); `ManifestDoc.from_json` parses it back and raises KeyError, TypeError or
ValueError for a missing or malformed entry. This module imports nothing heavy (no torch), so
convert and its worker processes can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardEntry:
    """One WebDataset shard of a split, with its DALI index file."""

    file: str  # the .tar, relative to OUT
    index: str  # its .idx, relative to OUT
    samples: int
    bytes: int | None  # None in manifests of versions before the loaders checked sizes
    sha256: str
    index_sha256: str


@dataclass(frozen=True)
class BetonEntry:
    """A split's FFCV .beton (convert --format ffcv|both)."""

    file: str  # relative to OUT
    samples: int
    jpg: int  # samples stored as JPEG
    raw: int  # samples stored as raw pixels
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitSummary:
    """A split's manifest entry: its accounting (listed = written + rejected), shards and counts."""

    num_listed: int
    num_written: int
    num_rejected: int
    rejected_by_reason: dict[str, int]
    num_repaired: int
    shards: list[ShardEntry]  # in the order convert wrote them; [] for an ffcv-only conversion
    class_counts: list[int]  # written samples per class id
    source_counts: dict[str, int]  # written samples per source (google, flickr, ...)
    rejects: list[dict[str, Any]]  # the record (key, path, label, source, index[, query]), reason, detail
    repaired: list[dict[str, Any]]  # key, path, repairs
    beton: BetonEntry | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.beton is None:
            del out["beton"]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SplitSummary:
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name != "beton"}
        values["shards"] = [ShardEntry(**{"bytes": None, **s}) for s in raw["shards"]]  # (older: no bytes)
        return cls(**values, beton=BetonEntry(**raw["beton"]) if "beton" in raw else None)

    def __getitem__(self, key: str) -> Any:
        """JSON-style access (`summary["num_listed"]`, as in `to_json()`) for code written against
        the raw manifest; prefer the attributes."""
        value = getattr(self, key) if key in _SPLIT_KEYS else None
        if value is None:
            raise KeyError(key)
        if key == "shards":
            return [dataclasses.asdict(s) for s in value]
        return dataclasses.asdict(value) if key == "beton" else value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


_SPLIT_KEYS = frozenset(f.name for f in dataclasses.fields(SplitSummary))


@dataclass(frozen=True)
class ManifestDoc:
    """The whole manifest.json. `formats` and `ffcv` only when the conversion wrote .beton files
    (a wds-only manifest stays byte-identical to earlier versions)."""

    format: str  # data_tools.outdir.FORMAT
    tool: dict[str, str]  # {"name": "mopro-fast", "version": ...}
    settings: dict[str, Any]  # the ConvertSettings that decided the bytes (data_tools/convert.py)
    source: str  # SRC, absolute
    fields: dict[str, str]  # member suffix in a shard -> what it holds
    index_format: str
    num_classes: int
    classes: list[dict[str, Any]]  # {"id", "wnid", "name"} per class id
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    formats: list[str] | None = None  # what was written: ["wds"], ["ffcv"] or ["wds", "ffcv"]
    ffcv: dict[str, Any] | None = None  # FFCV settings, fields, page size, versions

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) is not None}
        out["splits"] = {name: s.to_json() for name, s in self.splits.items()}
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ManifestDoc:
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name not in ("formats", "ffcv")}
        values["num_classes"] = int(raw["num_classes"])
        values["splits"] = {name: SplitSummary.from_json(s) for name, s in raw["splits"].items()}
        return cls(**values, formats=raw.get("formats"), ffcv=raw.get("ffcv"))
