"""Writing outputs without losing data: atomic files, checked output folders, one-line OS errors.

Every file a command produces is written to a temporary name beside its target, flushed to disk
and renamed over it, so a reader sees the old file or the new one, never half of one. On any
failure (disk full, read-only file system, a signal) the temporary file is removed and the
previous file stays as it was; the caller gets an `OutputError` whose message is one line saying
what could not be written, where, and (for a full disk) how much space was needed and is free.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from mopro_fast.errors import MoproError


class OutputError(MoproError):
    """An output that cannot be written (full disk, read-only, not a folder); the message is one line."""


def describe(exc: OSError, path: Path, what: str = "write", needed: int | None = None) -> str:
    """One line for an OS error on `path`: what failed, where, and what would help."""
    reason = exc.strerror or type(exc).__name__
    line = f"cannot {what} {path}: {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        need = f"needs about {_mb(needed)}, " if needed else ""
        line += f" ({need}{_mb(free)} free there); free some space or choose another output folder"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        line += "; choose a writable output folder"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        line += "; a file is in the way: choose a folder path"
    elif exc.errno == errno.ENOENT:
        line += "; choose a folder on a writable file system"
    return line


def free_bytes(path: Path) -> int | None:
    for folder in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _mb(n: int | None) -> str:
    """A size for a person: kB below 1 MB (a small index file), else MB with one decimal."""
    if n is None:
        return "? MB"
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def temp_name(path: Path) -> Path:
    """The temporary name `path` is written under: hidden, beside it, unique per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None],
                 needed: int | Callable[[], int | None] | None = None) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, rename it to `path`.

    On any failure the temporary file is removed and `path` keeps its previous content; an OS
    error becomes an `OutputError` (one line). `needed`: the expected size, quoted on a full disk
    (or a function computing it then, for a file whose size is only known once it is written).
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        discard(tmp)
        raise OutputError(describe(exc, path, needed=needed() if callable(needed) else needed)) from None
    except BaseException:
        discard(tmp)
        raise
    return path


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; never raises (it runs while another error is on its way)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), needed=len(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def output_dir(path: Path, what: str) -> Path:
    """Create the output folder `path` (and parents) or raise one line saying why it cannot be used.

    `what` names it for the user, e.g. "run.out" or "--out". Checks that it is a folder and that
    a file can be created in it (a read-only mount or /proc fails here, before any work).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{what} {path} is a file, not a folder; choose a folder path")
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_name(path / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{what}: " + describe(exc, path, what="write into")) from None
    return path
