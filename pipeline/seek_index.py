"""Random access into SA-1B shards: a seek index per shard.

A gzip stream cannot be seeked, so one image of an 11 GB shard would cost inflating half
of it on average. The seek index holds

* the member table: name, data offset and size of every member in the *uncompressed* tar
  stream, and
* zran-style inflate checkpoints (compressed offset, bit offset and the 32 KiB window
  every ``spacing`` uncompressed bytes), made and used by ``indexed_gzip``,

so fetching one member inflates at most ``spacing`` bytes (default 8 MiB) from the nearest
checkpoint. Only the compressed bytes from that checkpoint on are read, which over S3 or
HTTP means a couple of range requests. Plain (uncompressed) tars need only the member
table and are read with a direct range read.

File format (``<shard stem>.sidx``)::

    b"SA1BSIDX" | u8 version | u64 LE header length | zlib(JSON header) | gzip checkpoints

The checkpoints are ``indexed_gzip``'s own export (absent for plain tars).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from pipeline.io import basename, describe, open_url, redact, scrub, url_to_fs, write_bytes
from pipeline.sa1b_reader import (
    CorruptShardError,
    Member,
    RecordError,
    SA1BRecord,
    iter_members,
    parse_member_name,
)

__all__ = [
    "DEFAULT_SPACING",
    "SeekIndex",
    "SeekIndexError",
    "ShardRandomAccess",
    "build_seek_index",
    "check_index_matches",
    "find_record_by_scan",
    "gzip_checkpoints",
    "seek_index_name",
]

MAGIC = b"SA1BSIDX"
VERSION = 1
DEFAULT_SPACING = 8 << 20


class SeekIndexError(ValueError):
    """A seek index that is unreadable or does not match its shard."""


def seek_index_name(shard_url: str) -> str:
    """``sa_000020.sidx`` for ``.../sa_000020.tar``."""
    name = basename(shard_url)
    stem = name.split(".", 1)[0]
    return f"{stem}.sidx"


def _require_indexed_gzip() -> Any:
    try:
        import indexed_gzip
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("seek indexes of gzip shards need `pip install indexed_gzip`") from e
    return indexed_gzip


@dataclass
class SeekIndex:
    """Member table plus inflate checkpoints of one shard."""

    shard: str
    compression: str  # "gzip" | "none"
    compressed_size: int
    uncompressed_size: int
    spacing: int
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    checkpoints: bytes = b""
    source: str = field(default="", compare=False, repr=False)  # where it was loaded from

    def __post_init__(self) -> None:
        self._by_name: dict[str, int] = {}
        for i, n in enumerate(self.names):
            self._by_name.setdefault(n, i)  # a duplicate name: its first copy

    def add(self, m: Member) -> None:
        # a duplicate name resolves to its first copy, as the readers and index keep it
        self._by_name.setdefault(m.name, len(self.names))
        self.names.append(m.name)
        self.offsets.append(m.offset)
        self.sizes.append(m.size)

    def locate(self, name: str) -> tuple[int, int]:
        """``(offset, size)`` of member ``name`` (with or without ``./``)."""
        for n in (name, f"./{name}", name[2:] if name.startswith("./") else None):
            if n is not None and n in self._by_name:
                i = self._by_name[n]
                return self.offsets[i], self.sizes[i]
        raise KeyError(f"{self.shard}: no member {name!r}")

    def image_ids(self) -> list[int]:
        ids = set()
        for n in self.names:
            p = parse_member_name(n)
            if p is not None and p[1] == "json":
                ids.add(p[0])
        return sorted(ids)

    # ------------------------------------------------------------------ (de)serialise
    def to_bytes(self) -> bytes:
        header = {
            "version": VERSION,
            "shard": self.shard,
            "compression": self.compression,
            "compressed_size": self.compressed_size,
            "uncompressed_size": self.uncompressed_size,
            "spacing": self.spacing,
            "names": self.names,
            "offsets": self.offsets,
            "sizes": self.sizes,
        }
        h = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 6)
        return MAGIC + struct.pack("<BQ", VERSION, len(h)) + h + self.checkpoints

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "") -> SeekIndex:
        where = source or "seek index"
        if data[:8] != MAGIC:
            raise SeekIndexError(f"{where}: not an SA-1B seek index")
        try:
            version, hlen = struct.unpack("<BQ", data[8:17])
            if version != VERSION:
                raise SeekIndexError(f"{where}: seek index version {version} unsupported")
            header = json.loads(zlib.decompress(data[17 : 17 + hlen]))
            return cls(
                shard=header["shard"],
                compression=header["compression"],
                compressed_size=header["compressed_size"],
                uncompressed_size=header["uncompressed_size"],
                spacing=header["spacing"],
                names=header["names"],
                offsets=header["offsets"],
                sizes=header["sizes"],
                checkpoints=bytes(data[17 + hlen :]),
                source=source,
            )
        except (struct.error, zlib.error, ValueError, KeyError, TypeError) as e:
            raise SeekIndexError(f"{where}: damaged seek index: {describe(e)}") from e

    def save(self, url: str) -> None:
        write_bytes(url, self.to_bytes())

    @classmethod
    def load(cls, url: str) -> SeekIndex:
        with open_url(url) as f:
            return cls.from_bytes(f.read(), redact(url))

    def open(self, shard_url: str, **kwargs: Any) -> ShardRandomAccess:
        return ShardRandomAccess(shard_url, self, **kwargs)


def gzip_checkpoints(url: str, spacing: int = DEFAULT_SPACING) -> bytes:
    """Inflate checkpoints of a gzip file every ``spacing`` uncompressed bytes
    (``indexed_gzip``'s export format). One full inflate pass at zlib speed."""
    igz = _require_indexed_gzip()
    with open_url(url) as raw:
        gz = igz.IndexedGzipFile(fileobj=raw, spacing=spacing, readbuf_size=1 << 20)
        try:
            gz.raw.build_full_index()
            buf = io.BytesIO()
            gz.raw.export_index(fileobj=buf)
            return buf.getvalue()
        except OSError as e:
            raise CorruptShardError(f"{redact(url)}: {scrub(str(e))}") from e
        finally:
            gz.close()


def build_seek_index(
    url: str, *, spacing: int = DEFAULT_SPACING, backend: str = "auto"
) -> SeekIndex:
    """Seek index of ``url``: one pass for the member table (no member data kept) and,
    for gzip shards, one for the inflate checkpoints.

    Raises :class:`CorruptShardError` if the shard is damaged: an index of a partial
    shard would look complete.
    """
    from pipeline.sa1b_reader import finish_stream, open_shard_stream

    stream, counter, compression = open_shard_stream(url, backend=backend)
    idx = SeekIndex(basename(url), compression, 0, 0, spacing)
    try:
        for m in iter_members(stream, want=lambda n: False):
            idx.add(m)
        finish_stream(stream, counter)
    except OSError as e:  # CorruptShardError is an OSError
        raise CorruptShardError(f"{redact(url)}: {scrub(str(e))}") from e
    finally:
        counter.raw.close()
    idx.uncompressed_size = getattr(stream, "total_out", counter.nbytes)
    idx.compressed_size = counter.nbytes
    if compression == "gzip":
        idx.checkpoints = gzip_checkpoints(url, spacing)
    return idx


def check_index_matches(index: SeekIndex, shard_url: str) -> None:
    """Raise :class:`SeekIndexError` unless ``index`` was made for ``shard_url``: same file
    name and same compressed size (a re-downloaded or re-written shard with other bytes
    would make every offset wrong). The size is skipped where the store cannot tell it."""
    what = f"seek index {index.source}" if index.source else "the seek index"
    name = basename(shard_url)
    if index.shard != name:
        raise SeekIndexError(
            f"{what} was made for shard {index.shard}, not for {redact(shard_url)}"
        )
    fs, path = url_to_fs(shard_url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise
    except Exception:  # a store that cannot tell (e.g. HTTP without a length)
        size = None
    if size is not None and int(size) != index.compressed_size:
        raise SeekIndexError(
            f"{what} does not match {redact(shard_url)}: it was made for "
            f"{index.compressed_size} compressed bytes of {index.shard}, the shard has {size}"
        )


class ShardRandomAccess:
    """Read single members / images of a shard through its :class:`SeekIndex`.

    >>> with SeekIndex.load("idx/sa_000020.sidx").open("s3://b/sa_000020.tar") as ra:
    ...     rec = ra.get(226381)

    Raises :class:`SeekIndexError` when the index was made for another shard (name or
    compressed size differ) or its checkpoints cannot be loaded.
    """

    def __init__(self, shard_url: str, index: SeekIndex, *, block_size: int = 1 << 20):
        self.url = shard_url
        self.index = index
        check_index_matches(index, shard_url)
        remote = "://" in shard_url and not shard_url.startswith("file://")
        self._gz: Any = None
        self._raw = open_url(shard_url, **({"block_size": block_size} if remote else {}))
        try:
            if index.compression == "gzip":
                igz = _require_indexed_gzip()
                self._gz = igz.IndexedGzipFile(
                    fileobj=self._raw, readbuf_size=block_size, buffer_size=block_size
                )
                try:
                    self._gz.raw.import_index(fileobj=io.BytesIO(index.checkpoints))
                except Exception as e:  # indexed_gzip raises its own ZranError etc.
                    raise SeekIndexError(
                        f"seek index of {index.shard}: its inflate checkpoints do not load "
                        f"for {redact(shard_url)}: {scrub(str(e))}"
                    ) from e
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ShardRandomAccess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._gz is not None:
                self._gz.close()
        finally:
            self._gz = None
            self._raw.close()

    def read_member(self, name: str) -> bytes:
        offset, size = self.index.locate(name)
        f = self._gz if self._gz is not None else self._raw
        try:
            f.seek(offset)
            data = f.read(size)
        except OSError as e:
            raise CorruptShardError(f"{redact(self.url)}: reading {name}: {scrub(str(e))}") from e
        if len(data) != size:
            raise CorruptShardError(f"{redact(self.url)}: {name} is cut short")
        return data

    def get(self, image_id: int, *, load_image: bool = True) -> SA1BRecord:
        """The record of ``image_id`` (``KeyError`` when the shard has no such image,
        ``RecordError`` when it has the image's JSON but not its JPEG)."""
        js = self.read_member(f"sa_{image_id}.json")
        try:
            jpg_off, jpg_size = self.index.locate(f"sa_{image_id}.jpg")
        except KeyError:
            raise RecordError(
                f"{redact(self.url)}: sa_{image_id}.jpg: no such member (the JSON has no image)"
            ) from None
        json_off, json_size = self.index.locate(f"sa_{image_id}.json")
        return SA1BRecord(
            image_id=int(image_id),
            json_bytes=js,
            jpeg_bytes=self.read_member(f"sa_{image_id}.jpg") if load_image else None,
            shard=self.index.shard,
            jpg_offset=jpg_off,
            jpg_size=jpg_size,
            json_offset=json_off,
            json_size=json_size,
        )


def find_record_by_scan(url: str, image_id: int, *, backend: str = "auto") -> SA1BRecord:
    """Fetch one image without a seek index: stream the shard until both members are in
    (only those two members' bytes are kept)."""
    from pipeline.sa1b_reader import open_shard_stream

    want = {f"sa_{image_id}.jpg", f"sa_{image_id}.json"}
    stream, counter, _ = open_shard_stream(url, backend=backend)
    found: dict[str, Member] = {}
    try:
        for m in iter_members(stream, want=lambda n: n.removeprefix("./") in want):
            key = m.name.removeprefix("./")
            if key not in want:
                continue
            found[key] = m
            if len(found) == 2:
                js, jpg = found[f"sa_{image_id}.json"], found[f"sa_{image_id}.jpg"]
                return SA1BRecord(
                    image_id=int(image_id),
                    json_bytes=js.data or b"",
                    jpeg_bytes=jpg.data,
                    shard=basename(url),
                    jpg_offset=jpg.offset,
                    jpg_size=jpg.size,
                    json_offset=js.offset,
                    json_size=js.size,
                )
    except OSError as e:  # CorruptShardError is an OSError
        raise CorruptShardError(
            f"{redact(url)}: image {image_id} not found before the shard's damage: {scrub(str(e))}"
        ) from e
    finally:
        counter.raw.close()
    raise KeyError(f"{redact(url)}: no image {image_id}")
