"""Where one split's shards are read from: a local folder, a URL stream, or a URL through the cache.

The one place the loader backends get their shard bytes from (base.py builds a `ShardSource` per
loader; DESIGN.md section 5), so no backend knows whether its shards are local:
- `open(i)`: a binary stream of shard i (webdataset-reading backends: torch, nvjpeg). Local: the
  file. A URL with `data.cache_dir`: the verified cached copy, fetched on first use (cache.py). A URL
  without a cache: a stream straight from the storage (remote.py), checked by its sample count as
  it is read (a wrong checksum is only caught with a cache, or by `mopro-fast verify` on a local copy).
- `local(i)` / `local_index(i)`: a local file path, for readers that open files themselves (DALI's
  reader, FFCV): the file itself, or the cached copy; a URL without a cache is one line asking for one.
A `ShardSource` holds only strings and numbers, so DataLoader workers receive it by pickling and
each fetches what its own window needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from mopro_fast.data.cache import ShardCache, cache_folder
from mopro_fast.data.manifest import Manifest, ShardInfo
from mopro_fast.data.remote import open_url
from mopro_fast.errors import MoproError


class CacheNeeded(MoproError):
    """A reader that needs local files was given shards behind a URL and no `data.cache_dir`."""


@dataclass(frozen=True)
class ShardSource:
    """The shards of one split (manifest order) and how to reach their bytes; see the module docstring."""

    names: tuple[str, ...]  # local paths or URLs: what errors and DALI name
    files: tuple[str, ...]  # the manifest's relative names of the .tar files
    indexes: tuple[str, ...]  # ... and of their .idx files
    sha256: tuple[str | None, ...]
    index_sha256: tuple[str | None, ...]
    nbytes: tuple[int | None, ...]  # sizes of the .tar files, as the manifest records them
    remote: bool
    cache: ShardCache | None  # set for a URL with data.cache_dir

    @classmethod
    def of(cls, manifest: Manifest, shards: Sequence[ShardInfo], cache_dir: Path | str | None) -> ShardSource:
        cache = None
        if manifest.remote and cache_dir is not None:
            cache = ShardCache(cache_folder(cache_dir, str(manifest.root), manifest.sha256), str(manifest.root))
        return cls(tuple(str(s.path) for s in shards), tuple(s.file for s in shards), tuple(s.index for s in shards),
                   tuple(s.sha256 for s in shards), tuple(s.index_sha256 for s in shards),
                   tuple(s.bytes for s in shards), manifest.remote, cache)

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int) -> BinaryIO:
        """A binary stream of shard i, from its start."""
        if not self.remote:
            return open(self.names[i], "rb")
        if self.cache is not None:
            return open(self.cache.local(self.files[i], self.sha256[i], self.nbytes[i]), "rb")
        return open_url(self.names[i])

    def local(self, i: int, what: str = "this loader") -> str:
        """A local path of shard i (the cached, verified copy of a remote one)."""
        if not self.remote:
            return self.names[i]
        return str(self._cache(what).local(self.files[i], self.sha256[i], self.nbytes[i]))

    def local_index(self, i: int, what: str = "this loader") -> str:
        """A local path of shard i's DALI .idx file."""
        if not self.remote:
            return self.names[i][:-4] + ".idx"
        return str(self._cache(what).local(self.indexes[i], self.index_sha256[i], None))

    def _cache(self, what: str) -> ShardCache:
        if self.cache is None:
            root = self.names[0].rsplit("/", 1)[0] if self.names else "the shards"
            raise CacheNeeded(f"{what} reads local files, and the shards are at {root}: set data.cache_dir=/a/local/"
                              f"folder (each rank then fetches and verifies the shards it reads), or copy them")
        return self.cache
