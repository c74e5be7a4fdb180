"""Shards behind a URL: `s3://`, `gs://`, `http(s)://` locations read with fsspec (DESIGN.md section 5).

`data.shards` may be a local folder or a URL of the folder `mopro-fast convert` wrote (copied as it
is: manifest.json next to the split's .tar/.idx files). This module is the only one that talks to
the storage: `location()` keeps a URL as a string (a `Path` would fold `s3://` to `s3:/`), `join()`
names a file under it, `open_url()` gives a read-only byte stream, `read_url()` the whole file.

Libraries: fsspec picks the implementation by scheme: s3fs for `s3://` (installed with the project),
gcsfs for `gs://` (optional: `pip install gcsfs`), aiohttp for `http(s)://`. (webdataset's own URL
opening shells out to curl / gsutil and has no `s3://`, so streams come from fsspec and webdataset
reads the tar out of them: torch_loader.read_piece.)

Credentials and endpoints come only from the standard environment of each library, never from a
recipe: for S3, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`,
`AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (an S3-compatible server: MinIO, Ceph, moto; botocore
reads it), or ~/.aws/config; for GCS, `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's default login.

Failures. A file that is not there (404, NoSuchKey) or not allowed (403) is one line at once. Any
other error while opening or reading (connection refused or reset, a timeout, a 5xx) is retried:
`TRIES` = 3 tries in all per read, `BACKOFF` = 0.5 s then 1 s apart, each reopening the file where
the last one stopped; then `RemoteError`, one line naming the URL. The libraries' own retries are
turned down to one try and their timeouts set (`CONNECT_TIMEOUT`, `READ_TIMEOUT`), so a server that
is gone ends a run in seconds, never hangs it.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from mopro_fast.data.errors import ShardError, reason

SCHEMES = ("s3", "gs", "gcs", "http", "https")
TRIES = 3  # tries per open or read, in all
BACKOFF = 0.5  # seconds before the second try, doubled for each next one
CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 60.0  # seconds
_BLOCK = 8 << 20  # bytes per ranged read (s3, gs)
_HINT = {"s3": "pip install s3fs (in requirements.lock)", "gs": "pip install gcsfs", "gcs": "pip install gcsfs",
         "http": "pip install aiohttp (in requirements.lock)", "https": "pip install aiohttp (in requirements.lock)"}


class RemoteError(ShardError):
    """A URL that cannot be read (after the retries where a retry can help); one line naming it."""


def scheme(where: str | Path) -> str:
    """'s3', 'gs', 'http', ... for a URL; '' for a local path."""
    text = str(where)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else ""


def is_url(where: str | Path) -> bool:
    return bool(scheme(where))


def location(where: str | Path) -> str | Path:
    """A shards location as the loaders keep it: a URL as a string without a trailing '/', else a Path."""
    if isinstance(where, Path):
        return where
    if is_url(where):
        return where.rstrip("/")
    head = str(where).partition("://")[0]
    if "://" in str(where) and "/" not in head:
        raise RemoteError(f"data.shards={where}: unknown URL scheme {head!r}; use a local folder or one of "
                          f"{', '.join(s + '://' for s in SCHEMES)}")
    return Path(where)


def join(root: str | Path, relative: str) -> str | Path:
    """The file `relative` (a manifest's '/'-separated name) under `root`."""
    return f"{root}/{relative}" if is_url(root) else Path(root) / relative


def _filesystem(url: str) -> Any:
    """The fsspec file system of `url`'s scheme, with the libraries' retries down to one try."""
    import fsspec

    kind = scheme(url)
    options: dict[str, Any] = {}
    if kind == "s3":
        options = {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                     "retries": {"max_attempts": 1}}}
    elif kind in ("http", "https"):
        import aiohttp

        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT,
                                                                      sock_read=READ_TIMEOUT)}}
    try:
        fs = fsspec.filesystem(kind, **options)
    except ImportError as exc:
        raise RemoteError(f"cannot read {url}: {kind}:// needs a library that is not installed ({reason(exc)}); "
                          f"{_HINT.get(kind, '')}") from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs retries 5 times by default; ours are counted here (TRIES)
    return fs


def _kind(exc: BaseException) -> tuple[str, BaseException]:
    """('missing' | 'denied' | 'fatal' (a retry cannot cure it) | 'transient' (retry), the root cause)."""
    root = exc
    while isinstance(root, FileNotFoundError) and root.__cause__ is not None:
        root = root.__cause__  # fsspec's http file system wraps every failed HEAD/GET in FileNotFoundError
    status = getattr(root, "status", None)  # aiohttp.ClientResponseError
    if status == 404 or isinstance(root, FileNotFoundError):
        return "missing", root
    if status in (401, 403) or isinstance(root, PermissionError):
        return "denied", root
    if isinstance(status, int) and 400 <= status < 500 or isinstance(root, (ImportError, ValueError)):
        return "fatal", root
    return "transient", root


class _UrlReader(io.RawIOBase):
    """A forward read-only byte stream of one URL that reopens where it stopped on a transient error."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.pos, self._file = url, 0, None

    def readable(self) -> bool:
        return True

    def _open(self) -> Any:
        fs = _filesystem(self.url)
        if scheme(self.url) in ("http", "https"):
            # one streaming GET: no Range requests (plain HTTP servers need not support them)
            file = fs.open(self.url, "rb", block_size=0)
            skipped = 0
            while skipped < self.pos:  # a retry after a cut: skip what was read already
                chunk = file.read(min(self.pos - skipped, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"the file ends at byte {skipped}, before byte {self.pos}")
                skipped += len(chunk)
            return file
        file = fs.open(self.url, "rb", block_size=_BLOCK, cache_type="readahead")
        file.seek(self.pos)
        return file

    def readinto(self, buffer: Any) -> int:
        delay = BACKOFF
        for attempt in range(1, TRIES + 1):
            try:
                if self._file is None:
                    self._file = self._open()
                data = self._file.read(len(buffer))
                buffer[:len(data)] = data
                self.pos += len(data)
                return len(data)
            except ShardError:
                self._drop()
                raise  # ours already (a library that is not installed)
            except Exception as exc:  # noqa: BLE001 - the libraries raise many types for one cut connection
                self._drop()
                kind, exc = _kind(exc)
                if kind == "missing":
                    raise RemoteError(f"{self.url} is not there (is the whole folder `mopro-fast convert` "
                                      f"wrote uploaded, as it is?)") from None
                if kind == "denied":
                    raise RemoteError(f"{self.url}: access denied ({reason(exc)}); credentials come from the "
                                      f"environment only (AWS_*, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None
                if kind == "fatal":
                    raise RemoteError(f"cannot read {self.url}: {reason(exc)}") from None
                if attempt == TRIES:
                    raise RemoteError(f"cannot read {self.url} after {TRIES} tries ({reason(exc)}); is the "
                                      f"server up and reachable, with the credentials of the environment?") from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self._file = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_url(url: str) -> io.BufferedReader:
    """A buffered read-only stream of `url` (see the module docstring for retries and errors)."""
    return io.BufferedReader(_UrlReader(url), buffer_size=1 << 20)


def read_url(url: str) -> bytes:
    """The whole file at `url` (a manifest)."""
    with open_url(url) as stream:
        return stream.read()

