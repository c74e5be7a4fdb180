"""The local shard cache (`data.cache_dir`): remote shards copied once, verified once, kept.

For shards behind a URL (remote.py). A shard is fetched when a reader of this rank first needs it
(each rank fetches only the shards it reads; ranks of one node may share one folder), kept for the
next epochs and the next runs, and verified once, while it is fetched, against the sha256 (and
size) the manifest records. The download goes to a temporary name beside its final one
(`.NAME.<pid>-<random>.part`) and is renamed into place only when complete and verified, so a reader
never sees a partial or unverified file: a file under its final name IS a verified copy, and later
uses check only its size (one stat), as local shards are checked (manifest.py).

Layout: `CACHE_DIR/<url as a folder name>-<first 12 hex digits of the manifest's sha256>/<the
manifest's relative file name>`, so a re-conversion uploaded to the same URL (a new manifest) gets
a new folder and never mixes with older copies, and each .tar keeps its .idx beside it (DALI). Nothing
outside CACHE_DIR is written; nothing in it is deleted but the temporary files of a failed fetch.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mopro_fast.data.errors import ShardError
from mopro_fast.data.remote import open_url

_CHUNK = 1 << 20


def cache_folder(cache_dir: Path | str, root: str, manifest_sha256: str) -> Path:
    """The folder of one remote shards location (and one manifest version) under `cache_dir`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.split("://", 1)[-1]).strip("_")[:100]
    return Path(cache_dir) / f"{name}-{manifest_sha256[:12]}"


@dataclass(frozen=True)
class ShardCache:
    """Verified local copies of the files under the URL `root` (picklable: workers get a copy)."""

    folder: Path  # cache_folder(...)
    root: str  # the URL the manifest was read from

    def local(self, relative: str, sha256: str | None, size: int | None) -> Path:
        """The verified local copy of `root/relative`, fetched now if it is not cached yet."""
        rel = PurePosixPath(relative)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ShardError(f"{self.root}/manifest.json names the file {relative!r}, outside its folder; "
                             f"refusing to cache it")
        dest = self.folder.joinpath(*rel.parts)
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            return dest  # verified when it was renamed into place
        self._fetch(f"{self.root}/{relative}", dest, sha256, size)
        return dest

    def _fetch(self, url: str, dest: Path, sha256: str | None, size: int | None) -> None:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        digest, written = hashlib.sha256(), 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open_url(url) as source, open(tmp, "wb") as out:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            if size is not None and written != size:
                raise ShardError(f"bad shard {url}: {written} bytes, the manifest says {size}; the copy there is "
                                 f"damaged or was replaced: upload the folder `mopro-fast convert` wrote again")
            if sha256 and digest.hexdigest() != sha256:
                raise ShardError(f"bad shard {url}: its sha256 is {digest.hexdigest()[:16]}..., the manifest "
                                 f"records {sha256[:16]}...; the copy there is damaged or was replaced: upload "
                                 f"the folder `mopro-fast convert` wrote again")
            os.replace(tmp, dest)  # atomic: readers see the whole verified file or none
        except OSError as exc:
            raise ShardError(f"cannot write the cached copy {dest} of {url} ({exc.strerror or exc}); "
                             f"free some space or set data.cache_dir to another folder") from None
        finally:
            tmp.unlink(missing_ok=True)
