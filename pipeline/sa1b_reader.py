"""Streaming reader of SA-1B shards.

A shard is read in one sequential pass from any fsspec URL (local, ``s3://``,
``https://``...). Compression is sniffed from the first bytes (real shards are gzip
despite the ``.tar`` name; plain tars work too). The tar stream is parsed here rather than
by :mod:`tarfile` so that member offsets are exact, unsafe members (``..``, absolute
paths, links) are skipped and reported, and a missing end-of-archive is detected.

Members come in random order, so ``.jpg`` and ``.json`` are paired by stem. Memory bound:
members waiting for their partner are kept in RAM up to ``max_pending_bytes`` (default
256 MiB); past that they are spilled to an anonymous temporary file and read back when
the partner arrives. A member is read into memory only up to ``max_member_bytes``
(default 64 MiB; an SA-1B member is at most tens of MB); a larger one is skipped and
reported. Peak memory is therefore about ``max_pending_bytes`` plus one member (at most
``max_member_bytes``) plus the inflate buffers, whatever the shard size.

A corrupt or truncated shard does not lose what came before the damage: records read so
far are yielded, and :attr:`ShardReader.report` says the shard is incomplete and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any

import numpy as np

from pipeline.io import StoreError, basename, describe, is_client_error, open_url, redact

__all__ = [
    "Member",
    "RecordError",
    "SA1BRecord",
    "ShardFormatError",
    "ShardReader",
    "ShardReport",
    "TruncatedShardError",
    "CorruptShardError",
    "inflate_backends",
    "iter_members",
    "open_shard_stream",
    "parse_member_name",
]

log = logging.getLogger(__name__)

BLOCK = 512
_CHUNK = 1 << 20  # compressed bytes read per call
_MAX_OUT = 4 << 20  # inflated bytes produced per call (bounds a zip-bomb chunk)
_NAME_RE = re.compile(r"^sa_(\d+)\.(jpg|json)$")
DEFAULT_MAX_PENDING = 256 << 20
DEFAULT_MAX_MEMBER = 64 << 20  # an SA-1B member is at most tens of MB
_MAX_EXT_HEADER = 1 << 20  # GNU long names and pax headers are a few hundred bytes


class ShardFormatError(ValueError):
    """The input is neither a tar nor a gzip-compressed tar."""


class CorruptShardError(IOError):
    """The shard's bytes are damaged (bad gzip data, CRC mismatch, bad tar header)."""


class TruncatedShardError(CorruptShardError):
    """The shard ends before its compressed stream or tar archive does."""


class RecordError(ValueError):
    """A member of a shard cannot be decoded (corrupt JSON, unreadable image)."""


# ------------------------------------------------------------------------ inflate backends


def _zlib_backends() -> dict[str, Any]:
    out: dict[str, Any] = {"zlib": zlib}
    try:
        from isal import isal_zlib

        out["isal"] = isal_zlib
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        out["zlib-ng"] = zlib_ng
    except ImportError:
        pass
    return out


def inflate_backends() -> list[str]:
    """Names of the inflate backends importable here, fastest preferred first."""
    names = list(_zlib_backends())
    order = ["zlib-ng", "isal", "zlib"]  # measured by bench/decode.py
    return sorted(names, key=order.index)


def _backend(name: str) -> Any:
    backends = _zlib_backends()
    if name == "auto":
        return backends[inflate_backends()[0]]
    if name not in backends:
        raise ValueError(f"inflate backend {name!r} unavailable; have {inflate_backends()}")
    return backends[name]


# ------------------------------------------------------------------------ byte streams


class _CountingReader:
    """Raw (compressed) bytes: counts them and optionally hashes them (md5)."""

    def __init__(self, raw: IO[bytes], md5: bool = False):
        self.raw = raw
        self.nbytes = 0
        self.md5 = hashlib.md5() if md5 else None

    def read(self, n: int) -> bytes:
        try:
            b = self.raw.read(n)
        except OSError:
            raise
        except Exception as e:  # a ranged GET's 403 or 503 comes as aiohttp's error
            if is_client_error(e):
                raise StoreError(e) from None
            raise
        self.nbytes += len(b)
        if self.md5 is not None:
            self.md5.update(b)
        return b

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        while self.read(_CHUNK):
            pass


class _Inflater:
    """Sequential gzip decompression (multi-member aware) with a ``read(n)`` interface."""

    def __init__(self, raw: _CountingReader, prefix: bytes, backend: str = "auto"):
        self.raw = raw
        self.mod = _backend(backend)
        self.d: Any = self.mod.decompressobj(wbits=31)
        self.pending = prefix  # compressed input not yet given to the decompressor
        self.buf = b""
        self.pos = 0
        self.done = False
        self.total_out = 0

    def _start_member(self) -> bool:
        """Between gzip members: start the next one, or return ``False`` at a clean end of
        the file. Zero bytes after the last member (block padding) are allowed and read
        to the end; anything else there is garbage."""
        rest, self.pending = self.pending, b""
        while len(rest) < 2:  # a member's magic may straddle two reads
            more = self.raw.read(_CHUNK)
            if not more:
                break
            rest += more
        if not rest:
            return False
        if rest[:2] == b"\x1f\x8b":  # another member: its data continues the stream
            self.d = self.mod.decompressobj(wbits=31)
            self.pending = rest
            return True
        while rest:
            if rest.strip(b"\x00"):
                raise CorruptShardError("trailing garbage after the gzip stream")
            rest = self.raw.read(_CHUNK)
        return False

    def _produce(self) -> bytes:
        while True:
            if self.d is None and not self._start_member():
                self.done = True
                return b""
            d = self.d
            if d.eof:  # this member is complete; what follows it is the next one's input
                self.pending = d.unused_data + self.pending
                self.d = None
                continue
            data = d.unconsumed_tail or self.pending
            if data is self.pending:
                self.pending = b""
            if not data:
                data = self.raw.read(_CHUNK)
                if not data:
                    return self._at_raw_end(d)
            try:
                out = d.decompress(data, _MAX_OUT)
            except Exception as e:  # zlib.error and its isal/zlib-ng twins
                raise CorruptShardError(f"corrupt gzip data: {e}") from e
            if out:
                return out

    def _at_raw_end(self, d: Any) -> bytes:
        """The file ended inside a member. The decompressor may still hold output it
        could not return under the ``_MAX_OUT`` limit: collect it, else it is truncated."""
        try:
            out = d.flush()
        except Exception as e:
            raise CorruptShardError(f"corrupt gzip data: {e}") from e
        if out or d.eof:
            return out if out else self._produce()
        raise TruncatedShardError("gzip stream ends early (truncated shard)")

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail == 0:
                if self.done:
                    break
                self.buf = self._produce()
                self.pos = 0
                self.total_out += len(self.buf)
                if not self.buf:
                    break
                continue
            take = min(avail, n)
            parts.append(self.buf[self.pos : self.pos + take])
            self.pos += take
            n -= take
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)


class _Plain:
    def __init__(self, raw: _CountingReader, prefix: bytes):
        self.raw = raw
        self.prefix = prefix

    def read(self, n: int) -> bytes:
        if self.prefix:
            head, self.prefix = self.prefix[:n], self.prefix[n:]
            if len(head) == n:
                return head
            return head + self.raw.read(n - len(head))
        return self.raw.read(n)


def _looks_like_tar(block: bytes) -> bool:
    if len(block) < BLOCK:
        return False
    if block[257:262] == b"ustar":
        return True
    try:  # v7 tar: only the checksum tells
        stored = int(block[148:156].replace(b"\x00", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    calc = sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK])
    return stored == calc


def open_shard_stream(
    url: str, *, backend: str = "auto", md5: bool = False, raw: IO[bytes] | None = None
) -> tuple[Any, _CountingReader, str]:
    """Open ``url`` and return ``(uncompressed stream, raw counter, compression)``.

    ``compression`` is ``"gzip"`` or ``"none"``; raises :class:`ShardFormatError` for
    anything that is not a (gzip-compressed) tar. The caller closes ``counter.raw``; when
    this raises, a handle it opened itself is already closed (a ``raw`` given by the
    caller stays the caller's).
    """
    handle = raw if raw is not None else open_url(url)
    try:
        counter = _CountingReader(handle, md5=md5)
        head = counter.read(BLOCK)
        while len(head) < BLOCK:
            more = counter.read(BLOCK - len(head))
            if not more:
                break
            head += more
        if head[:2] == b"\x1f\x8b":
            return _Inflater(counter, head, backend), counter, "gzip"
        if _looks_like_tar(head):
            return _Plain(counter, head), counter, "none"
        if not head:
            raise ShardFormatError(f"{redact(url)}: empty file, not a shard")
        raise ShardFormatError(
            f"{redact(url)}: not a tar or gzip-compressed tar (starts with {head[:8]!r})"
        )
    except BaseException:
        if raw is None:
            handle.close()
        raise


# ------------------------------------------------------------------------ tar parsing


@dataclass
class Member:
    """One tar member: its name, where its data lies in the uncompressed stream, and the
    data when it was read (``None`` when skipped)."""

    name: str
    offset: int
    size: int
    data: bytes | None = None


def parse_member_name(name: str) -> tuple[int, str] | None:
    """``(image_id, "jpg"|"json")`` for ``sa_<id>.jpg``/``.json`` (optionally ``./``)."""
    if name.startswith("./"):
        name = name[2:]
    m = _NAME_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2)


def _unsafe_reason(name: str, typeflag: bytes) -> str | None:
    if typeflag in (b"1", b"2"):
        return "link member (hard or symbolic) not allowed"
    if typeflag not in (b"0", b"\x00", b"7"):
        return f"not a regular file (tar type {typeflag!r})"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "path escapes the archive ('..')"
    return None


def _nts(b: bytes) -> str:
    return b.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _octal(b: bytes) -> int:
    if b and b[0] & 0x80:  # GNU base-256
        n = int.from_bytes(b[1:], "big")
        return n
    s = b.replace(b"\x00", b" ").strip()
    return int(s, 8) if s else 0


def finish_stream(stream: Any, counter: _CountingReader) -> None:
    """After the end-of-archive marker: read the rest of ``stream`` to its end, which must
    be zero padding, then the rest of the file (hashed when md5 is on). Reading on makes
    the gzip decompressor reach the end of every member, so its CRC-32 and length are
    checked: a shard cut in its last bytes, a flipped bit, or data after the archive is
    reported instead of read as complete."""
    while True:
        b = stream.read(_CHUNK)
        if not b:
            break
        if b.strip(b"\x00"):
            raise CorruptShardError("data after the tar end-of-archive marker")
    counter.drain()


def iter_members(
    stream: Any,
    *,
    want: Callable[[str], bool] = lambda name: True,
    skipped: list[tuple[str, str]] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER,
) -> Iterator[Member]:
    """Regular-file members of an uncompressed tar stream, in archive order.

    Data is read only for members where ``want(name)`` is true. Directories are ignored;
    unsafe members (links, ``..``, absolute names, devices) and wanted members larger than
    ``max_member_bytes`` (never read into memory) are skipped and appended to ``skipped``
    as ``(name, reason)``. Raises :class:`TruncatedShardError` when the stream ends before
    the end-of-archive marker, :class:`CorruptShardError` on a bad header (checksum, size
    field, pax record).
    """
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}

    def read_exact(n: int) -> bytes:
        nonlocal pos
        b = stream.read(n)
        if len(b) != n:
            raise TruncatedShardError(f"tar stream ends early at byte {pos + len(b)}")
        pos += n
        return b

    def skip(n: int) -> None:
        nonlocal pos
        while n > 0:
            b = stream.read(min(n, _MAX_OUT))
            if not b:
                raise TruncatedShardError(f"tar stream ends early at byte {pos}")
            pos += len(b)
            n -= len(b)

    while True:
        b = stream.read(BLOCK)
        if len(b) == 0:
            raise TruncatedShardError(f"tar archive ends without its end marker at byte {pos}")
        if len(b) != BLOCK:
            raise TruncatedShardError(f"tar stream ends inside a header at byte {pos}")
        header_at = pos
        pos += BLOCK
        if b == b"\x00" * BLOCK:
            return  # end of archive (the second zero block is not required)
        chk = sum(b[:148]) + 8 * 32 + sum(b[156:])
        try:
            stored = _octal(b[148:156])
        except ValueError:
            stored = -1
        if stored != chk:
            raise CorruptShardError(f"bad tar header checksum at byte {header_at}")
        typeflag = b[156:157]
        try:
            size = _octal(b[124:136])
        except ValueError as e:
            raise CorruptShardError(f"bad tar size field at byte {header_at}") from e
        name = _nts(b[0:100])
        if b[257:263] == b"ustar\x00" and b[345:500].strip(b"\x00"):
            name = _nts(b[345:500]) + "/" + name
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in (b"L", b"K", b"x", b"g") and size > _MAX_EXT_HEADER:
            raise CorruptShardError(
                f"tar extended header of {size} bytes at byte {header_at} (limit {_MAX_EXT_HEADER})"
            )
        if typeflag in (b"L", b"K"):  # GNU long name / long link
            data = read_exact(padded)[:size]
            if typeflag == b"L":
                long_name = _nts(data)
            continue
        if typeflag in (b"x", b"g"):  # pax headers
            data = read_exact(padded)[:size]
            if typeflag == b"x":
                pax = _parse_pax(data)
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise CorruptShardError(f"bad pax size {pax['size']!r} at byte {header_at}")
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        pax = {}
        if typeflag == b"5":  # directory
            skip(padded)
            continue
        reason = _unsafe_reason(name, typeflag)
        if reason is not None:
            if skipped is not None:
                skipped.append((name, reason))
            log.warning("skipping tar member %r: %s", name, reason)
            skip(padded)
            continue
        offset = pos
        wanted = want(name)
        if wanted and size > max_member_bytes:
            reason = f"member of {size} bytes exceeds the {max_member_bytes}-byte limit"
            if skipped is not None:
                skipped.append((name, reason))
            log.warning("skipping tar member %r: %s", name, reason)
            skip(padded)
            continue
        if wanted:
            data = read_exact(size)
            skip(padded - size)
            yield Member(name, offset, size, data)
        else:
            skip(padded)
            yield Member(name, offset, size, None)


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\\n"`` of a pax extended header, where
    ``length`` counts the whole record. Raises :class:`CorruptShardError` on a malformed
    one (a length that does not move forward or overruns the header would otherwise
    loop forever or read garbage)."""
    out: dict[str, str] = {}
    i = 0
    n = len(data)
    while i < n:
        if data[i] == 0 and not data[i:].strip(b"\x00"):
            break  # NUL padding after the last record
        sp = data.find(b" ", i)
        digits = data[i:sp] if sp >= 0 else b""
        if not digits.isdigit():
            raise CorruptShardError(f"bad pax header record at byte {i}: no length")
        length = int(digits)
        if not sp - i < length <= n - i:
            raise CorruptShardError(f"bad pax header record at byte {i}: length {length}")
        rec = data[sp + 1 : i + length]
        if not rec.endswith(b"\n") or b"=" not in rec:
            raise CorruptShardError(f"bad pax header record at byte {i}")
        k, _, v = rec[:-1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        i += length
    return out


# ------------------------------------------------------------------------ records


@dataclass
class SA1BRecord:
    """One image of a shard: its JPEG and annotation JSON, decoded only on demand."""

    image_id: int
    json_bytes: bytes
    jpeg_bytes: bytes | None = None
    shard: str = ""
    jpg_offset: int | None = None
    jpg_size: int | None = None
    json_offset: int | None = None
    json_size: int | None = None

    @cached_property
    def data(self) -> dict[str, Any]:
        """The parsed per-image JSON (``{"image": ..., "annotations": [...]}``)."""
        try:
            data = json.loads(self.json_bytes)
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(
                f"{self.shard}: sa_{self.image_id}.json is not valid JSON: {e}"
            ) from e
        if not isinstance(data, dict):
            raise self.malformed(f"a JSON {type(data).__name__}, not an object")
        if not isinstance(data.get("image"), dict):
            raise self.malformed('no "image" object')
        if not isinstance(data.get("annotations"), list):
            raise self.malformed('no "annotations" list')
        return data

    def malformed(self, why: str) -> RecordError:
        """The error for this record's JSON not being an SA-1B per-image record."""
        return RecordError(f"{self.shard}: sa_{self.image_id}.json: malformed record: {why}")

    @property
    def image_info(self) -> dict[str, Any]:
        return self.data["image"]

    @property
    def annotations(self) -> list[dict[str, Any]]:
        return self.data["annotations"]

    def __len__(self) -> int:
        return len(self.annotations)

    def pil_image(self) -> Any:
        """The image as a ``PIL.Image`` (RGB)."""
        from PIL import Image, UnidentifiedImageError

        if self.jpeg_bytes is None:
            raise RecordError(f"{self.shard}: sa_{self.image_id}.jpg was not loaded")
        try:
            im = Image.open(io.BytesIO(self.jpeg_bytes))
            im.load()
        except (UnidentifiedImageError, OSError) as e:
            raise RecordError(f"{self.shard}: sa_{self.image_id}.jpg is unreadable: {e}") from e
        return im.convert("RGB")

    def image(self) -> np.ndarray:
        """The image as an HxWx3 uint8 array."""
        return np.asarray(self.pil_image())

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` decoded to an HxW bool array."""
        from sam.rle import decode

        return decode(self.annotations[i]["segmentation"])

    def masks(self) -> Iterator[np.ndarray]:
        """Every mask, decoded one at a time (all at once would be ~340 MB per image)."""
        for i in range(len(self.annotations)):
            yield self.mask(i)


@dataclass
class ShardReport:
    """What one pass over a shard found."""

    url: str
    compression: str = ""
    complete: bool = False
    error: str | None = None
    # the error was a failure to read (network, storage), not damage in the data:
    # another pass may well succeed
    read_failure: bool = False
    members: int = 0
    images: int = 0
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    md5: str | None = None
    unpaired: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bad_records: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.unpaired and not self.skipped and not self.bad_records

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.url,
            "compression": self.compression,
            "complete": self.complete,
            "error": self.error,
            "read_failure": self.read_failure,
            "members": self.members,
            "images": self.images,
            "compressed_bytes": self.compressed_bytes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "md5": self.md5,
            "unpaired": self.unpaired,
            "skipped": [list(s) for s in self.skipped],
            "bad_records": [list(s) for s in self.bad_records],
        }


class _Pending:
    """Members waiting for their partner: in RAM up to ``max_bytes``, then on disk."""

    def __init__(self, max_bytes: int, spill_dir: str | None):
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir
        self.mem_bytes = 0
        self.items: dict[tuple[int, str], tuple[Member, int, int]] = {}
        self.spill: IO[bytes] | None = None
        self.spill_end = 0
        self.spilled_bytes = 0

    def __contains__(self, key: tuple[int, str]) -> bool:
        return key in self.items

    def put(self, key: tuple[int, str], m: Member) -> None:
        if key in self.items:  # replacing would lose the first copy and its byte count
            raise ValueError(f"{m.name}: already waiting for its partner")
        data = m.data or b""
        if self.mem_bytes + len(data) <= self.max_bytes:
            self.items[key] = (m, -1, 0)
            self.mem_bytes += len(data)
            return
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix="sa1b-spill-")
        self.spill.seek(self.spill_end)
        self.spill.write(data)
        self.items[key] = (Member(m.name, m.offset, m.size, None), self.spill_end, len(data))
        self.spill_end += len(data)
        self.spilled_bytes += len(data)

    def pop(self, key: tuple[int, str]) -> Member | None:
        got = self.items.pop(key, None)
        if got is None:
            return None
        m, at, n = got
        if at < 0:
            self.mem_bytes -= len(m.data or b"")
            return m
        assert self.spill is not None
        self.spill.flush()
        m.data = os.pread(self.spill.fileno(), n, at)
        return m

    def keys(self) -> list[tuple[int, str]]:
        return list(self.items)

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None


class ShardReader:
    """Iterate the images of one shard as :class:`SA1BRecord`, pairing by stem.

    >>> reader = ShardReader("s3://bucket/sa_000020.tar")
    >>> for rec in reader:
    ...     rec.image_id, len(rec), rec.mask(0).sum()
    >>> reader.report.complete

    ``load_images=False`` skips JPEG payloads (records carry only their location).
    ``images=False`` reads shards that hold only the per-image JSON (as written with
    ``--no-copy-images``): every JSON member is a record, JPEG members are ignored.
    ``on_error="raise"`` re-raises the first corruption instead of reporting it.
    A member larger than ``max_member_bytes`` is not read (it is reported in
    :attr:`ShardReport.skipped`, its partner as unpaired), and so is the second copy of a
    member name already seen in the shard.
    """

    def __init__(
        self,
        url: str,
        *,
        load_images: bool = True,
        max_pending_bytes: int = DEFAULT_MAX_PENDING,
        max_member_bytes: int = DEFAULT_MAX_MEMBER,
        spill_dir: str | None = None,
        backend: str = "auto",
        md5: bool = False,
        on_error: str = "report",
        images: bool = True,
    ):
        if on_error not in ("report", "raise"):
            raise ValueError("on_error must be 'report' or 'raise'")
        self.url = url
        self.shard = basename(url)
        self.load_images = load_images
        self.max_pending_bytes = max_pending_bytes
        self.max_member_bytes = max_member_bytes
        self.spill_dir = spill_dir
        self.backend = backend
        self.md5 = md5
        self.on_error = on_error
        self.images = images
        self.load_images = load_images and images
        self.report = ShardReport(url=redact(url))
        self.spilled_bytes = 0

    def __iter__(self) -> Iterator[SA1BRecord]:
        rep = self.report
        try:  # closes its handle itself when it raises
            stream, counter, rep.compression = open_shard_stream(
                self.url, backend=self.backend, md5=self.md5
            )
        except (ShardFormatError, OSError) as e:
            rep.error = describe(e)
            raise
        pending = _Pending(self.max_pending_bytes, self.spill_dir)
        seen: set[tuple[int, str]] = set()

        def want(name: str) -> bool:
            parsed = parse_member_name(name)
            return parsed is not None and (self.load_images or parsed[1] == "json")

        try:
            members = iter_members(
                stream, want=want, skipped=rep.skipped, max_member_bytes=self.max_member_bytes
            )
            for m in members:
                rep.members += 1
                parsed = parse_member_name(m.name)
                if parsed is None:
                    rep.skipped.append((m.name, "not an sa_<id>.jpg/.json member"))
                    continue
                image_id, kind = parsed
                if (image_id, kind) in seen:
                    rep.skipped.append((m.name, "duplicate member name (first copy kept)"))
                    log.warning("%s: duplicate member %s skipped", rep.url, m.name)
                    continue
                seen.add((image_id, kind))
                if not self.images:  # JSON-only shards: each JSON is a whole record
                    if kind == "json":
                        rep.images += 1
                        yield SA1BRecord(
                            image_id=image_id, json_bytes=m.data or b"", jpeg_bytes=None,
                            shard=self.shard, jpg_offset=None, jpg_size=None,
                            json_offset=m.offset, json_size=m.size,
                        )  # fmt: skip
                    continue
                other = pending.pop((image_id, "json" if kind == "jpg" else "jpg"))
                if other is None:
                    pending.put((image_id, kind), m)
                    continue
                jpg, js = (m, other) if kind == "jpg" else (other, m)
                rep.images += 1
                yield SA1BRecord(
                    image_id=image_id,
                    json_bytes=js.data or b"",
                    jpeg_bytes=jpg.data,
                    shard=self.shard,
                    jpg_offset=jpg.offset,
                    jpg_size=jpg.size,
                    json_offset=js.offset,
                    json_size=js.size,
                )
            finish_stream(stream, counter)
            rep.complete = True
        except (CorruptShardError, OSError, EOFError) as e:
            rep.complete = False
            rep.error = describe(e)
            rep.read_failure = not isinstance(e, (CorruptShardError, EOFError))
            log.warning("%s: shard incomplete after %d images: %s", rep.url, rep.images, rep.error)
            if self.on_error == "raise":
                raise
        finally:
            rep.unpaired = sorted(f"sa_{i}.{k}" for i, k in pending.keys())
            self.spilled_bytes = pending.spilled_bytes
            pending.close()
            rep.compressed_bytes = counter.nbytes
            rep.uncompressed_bytes = getattr(stream, "total_out", counter.nbytes)
            if self.md5 and counter.md5 is not None and rep.complete:
                rep.md5 = counter.md5.hexdigest()
            raw = counter.raw
            if hasattr(raw, "close"):
                raw.close()
