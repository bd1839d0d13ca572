"""fsspec helpers: every path in the pipeline goes through here.

Local paths, ``file://``, ``s3://``, ``https://`` and ``memory://`` behave the same. S3
endpoints come from the standard chain (``FSSPEC_S3_ENDPOINT_URL``, ``AWS_*``); nothing
here logs credentials or query strings of signed URLs.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "atomic_write",
    "basename",
    "describe",
    "exists",
    "is_local",
    "join",
    "list_dir",
    "makedirs",
    "open_url",
    "redact",
    "remove",
    "scrub",
    "url_to_fs",
    "write_bytes",
]


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def redact(url: str) -> str:
    """``url`` safe to print: no query string (signed URLs carry secrets there) and no
    ``user:password@``."""
    url = url.split("?", 1)[0]
    scheme, sep, rest = url.partition("://")
    if sep:
        host, slash, path = rest.partition("/")
        url = f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"
    return url


# a query string with parameters (``?X-Amz-Signature=...``), also after a bare path as
# in requests' "Max retries exceeded with url: /sa_000020.tar?..."; and ``user:pass@``
_QUERY = re.compile(r"\?[^\s'\"<>()?]*=[^\s'\"<>()]*")
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@'\"]+@")
_URL_QUERY = re.compile(r"(\w+://[^\s?'\"]+)\?[^\s'\"]*")  # any query after a full URL


def scrub(text: str) -> str:
    """``text`` (an error message, a log line) without the secrets that URLs in it may
    carry: query strings with parameters and ``user:password@``."""
    return _USERINFO.sub(r"\1", _URL_QUERY.sub(r"\1", _QUERY.sub("", text)))


def describe(e: BaseException) -> str:
    """``"TypeName: message"`` of an exception, safe to print or store (see scrub)."""
    return scrub(f"{type(e).__name__}: {e}")


# client libraries of the stores whose errors are not OSErrors (aiohttp's
# ClientResponseError for an HTTP status, botocore's, ...): retried, and wrapped
CLIENT_MODULES = ("botocore", "aiohttp", "urllib3", "requests")


def is_client_error(e: BaseException) -> bool:
    return (type(e).__module__ or "").startswith(CLIENT_MODULES)


class StoreError(OSError):
    """A store client's failure that is no OSError, as one: its message scrubbed (an
    aiohttp error shows the whole URL, a signature included) and its HTTP ``status``
    kept. Raised ``from None``: the original, URL and all, goes nowhere."""

    def __init__(self, e: BaseException):
        super().__init__(describe(e))
        status = getattr(e, "status", None)
        self.status = status if isinstance(status, int) else None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def basename(url: str) -> str:
    return posixpath.basename(redact(url).rstrip("/"))


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open ``url`` through fsspec (no compression inference: we sniff bytes ourselves).
    ``kwargs`` go to the file (e.g. ``block_size``), not to the filesystem."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode, **kwargs)


def exists(url: str) -> bool:
    """Whether ``url`` exists, asking the store (not fsspec's listing cache)."""
    fs, path = url_to_fs(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    return fs.exists(path)


def list_dir(url: str) -> list[str]:
    """Full paths directly under ``url``, bypassing the listing cache; [] if absent."""
    fs, path = url_to_fs(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except TypeError:  # filesystems without a refresh flag
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    proto = _protocols(fs)[0]
    if proto in ("file", "local"):
        return sorted(entries)
    return sorted(e if "://" in e else f"{proto}://{e}" for e in entries)


def remove(url: str) -> None:
    """Delete the file ``url``; nothing if it is already gone."""
    fs, path = url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Write ``url`` so that a reader sees either nothing or the complete file.

    Local files: a hidden sibling temp file, ``fsync``, then ``os.replace``. Object
    stores (no rename): the file is opened with ``autocommit=False`` and committed (the
    multipart upload completed) only when the block exits without error; on error it is
    discarded (the upload aborted). ``memory://``, which publishes a file as soon as it is
    opened, gets the data in one ``pipe_file`` at the end instead.
    """
    fs, path = url_to_fs(url)
    if "file" in _protocols(fs) or "local" in _protocols(fs):
        path = os.path.abspath(path)
        d, name = os.path.split(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    if _commits_on_open(fs):
        # the store's file object is the stored object itself (memory://): write into a
        # private buffer and store it in one step on success
        buf = io.BytesIO()
        out: IO = buf if "b" in mode else io.TextIOWrapper(buf, encoding="utf-8")
        yield out
        out.flush()
        fs.pipe_file(path, buf.getvalue())
        return
    # deferred commit (s3fs, gcsfs, ...): parts are uploaded as they fill, but the
    # object appears only on commit(); discard() aborts the upload
    f = fs.open(path, mode if "b" in mode else mode.replace("t", "") + "b", autocommit=False)
    try:
        if "b" in mode:
            yield f
        else:
            text = io.TextIOWrapper(f, encoding="utf-8")
            yield text
            text.flush()
        f.close()
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        with contextlib.suppress(Exception):
            f.closed = True
        _forget(fs, f)
        raise
    try:
        f.commit()
    finally:
        _forget(fs, f)


def _commits_on_open(fs: fsspec.AbstractFileSystem) -> bool:
    """Filesystems whose ``open(..., autocommit=False)`` still publishes the file at once
    (fsspec's MemoryFileSystem ignores ``autocommit`` outside a transaction)."""
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, MemoryFileSystem)


def _forget(fs: fsspec.AbstractFileSystem, f: Any) -> None:
    """fsspec queues files opened with ``autocommit=False`` on the filesystem's
    transaction for a later ``commit()``; this one is settled, so drop it from there."""
    with contextlib.suppress(Exception):
        fs.transaction.files.remove(f)


def write_bytes(url: str, data: bytes) -> None:
    """Atomically write ``data`` to ``url`` (see :func:`atomic_write`)."""
    with atomic_write(url) as f:
        f.write(data)
