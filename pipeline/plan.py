"""Image sources -> shard plan with stable ids.

An input is one of

- a folder or prefix (local, ``s3://``, ...): every image file under it, recursively,
  in sorted path order;
- a list file (``.txt``: one URI per line; ``.csv``/``.tsv``/``.parquet``: a column named
  ``uri``, ``url``, ``path``, ``file`` or ``image``, optionally an ``image_id`` column);
  relative entries are resolved against the list file's folder;
- existing SA-1B shards (``sa_NNNNNN.tar``: a folder of them, one shard, or a list file of
  them): re-annotation, where the input shard id becomes the output shard id and images
  keep their ids;
- an ``SA-1B_links.txt`` file (TSV, header ``file_name<TAB>cdn_link``): re-annotation of
  the listed shards streamed from their links. A link's path is an opaque signed token,
  so the shard id comes from ``file_name`` and so does the shard's identity in the plan:
  a refreshed links file (the links expire after about a month) resumes the same run.
  Its other rows (``sa_images_ids.txt``, ...) are skipped.

Images get ids ``first_image_id, first_image_id + 1, ...`` in plan order (SA-1B ids start at
1 and are not zero-padded) unless the list file carries them; consecutive runs of
``shard_size`` images form shards ``sa_000000``, ``sa_000001``, ... The plan therefore
depends only on the input listing and the options, never on workers or timing, and its
:meth:`ShardPlan.fingerprint` identifies it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.io import atomic_write, basename, describe, open_url, redact, scrub

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_KINDS",
    "ImageItem",
    "InputError",
    "ShardPlan",
    "ShardSpec",
    "build_plan",
    "links_rows",
    "shard_stem_of",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst", ".csv", ".tsv", ".parquet")
INPUT_KINDS = ("auto", "images", "list", "sa1b")
URI_COLUMNS = ("uri", "url", "path", "file", "image", "image_path", "file_name")
_SHARD_RE = re.compile(r"^sa_(\d+)\.tar$")

_PLAN_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.int64()),  # null for SA-1B input shards (ids come from the tar)
        pa.field("uri", pa.string(), nullable=False),
        # an input shard's file name where its URI is not its identity (SA-1B links)
        pa.field("source_name", pa.string()),
    ]
)
LINKS_HEADER = ("file_name", "cdn_link")


class InputError(ValueError):
    """An input the user gave cannot be planned (missing, empty, malformed); names it."""


def shard_stem_of(shard_id: int) -> str:
    """``sa_000020`` for shard 20 (the SA-1B shard naming)."""
    return f"sa_{shard_id:06d}"


@dataclass(frozen=True)
class ImageItem:
    image_id: int
    uri: str


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of commit.

    ``items`` lists the images of an image shard; ``source`` is the input SA-1B shard of a
    re-annotation shard (its images are known only once it is read). ``source_name``
    stands for ``source`` in the plan's identity when the URI changes but the shard does
    not (an SA-1B link: its ``file_name``).
    """

    shard_id: int
    items: tuple[ImageItem, ...] = ()
    source: str | None = None
    source_name: str | None = None

    @property
    def name(self) -> str:
        return shard_stem_of(self.shard_id)

    @property
    def num_images(self) -> int | None:
        return None if self.source is not None else len(self.items)


# query parameters of signed links (S3, GCS, CloudFront, Azure SAS, the SA-1B CDN) and of
# credentials: secrets or expiry, not the identity of the file
_SIGNING = re.compile(
    r"x-amz-.*|x-goog-.*|signature|expires|key-pair-id|policy|oh|oe|_nc_.*|ccb|"
    r"sig|se|sp|sv|sr|st|ss|srt|spr|skoid|sktid|skt|ske|sks|skv|"
    r".*key|.*secret.*|.*token.*|.*passw.*|.*credential.*|auth.*",
    re.IGNORECASE,
)


def _stable_uri(uri: str) -> str:
    """An http(s) URI without signing parameters and user info; other URIs unchanged."""
    if not uri.startswith(("http://", "https://")):
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not _SIGNING.fullmatch(k)]  # fmt: skip
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


@dataclass
class ShardPlan:
    kind: str  # "images" or "sa1b"
    shards: list[ShardSpec] = field(default_factory=list)
    shard_size: int | None = None

    @property
    def num_images(self) -> int | None:
        """Planned images (``None`` for SA-1B input, whose image count is read later)."""
        if self.kind == "sa1b":
            return None
        return sum(len(s.items) for s in self.shards)

    def shard(self, name: str) -> ShardSpec:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    def _rows(self) -> Iterable[tuple[int, int | None, str, str | None]]:
        """``(shard id, image id, uri, source name)``; an http(s) URI without its signing
        parameters: they are secrets, and a refreshed signature (SA-1B's links expire) is
        the same input, so they are neither recorded nor part of the fingerprint."""
        for s in self.shards:
            if s.source is not None:
                yield s.shard_id, None, _stable_uri(s.source), s.source_name
            else:
                for it in s.items:
                    yield s.shard_id, it.image_id, _stable_uri(it.uri), None

    def fingerprint(self) -> str:
        """sha256 of the plan's content (kind, shard ids, image ids, URIs or, where given,
        input shard names)."""
        h = hashlib.sha256(f"sa1b-engine plan v1\n{self.kind}\n".encode())
        for sid, iid, uri, name in self._rows():
            ident = uri if name is None else f"name:{name}"
            h.update(f"{sid}\t{'' if iid is None else iid}\t{ident}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "num_shards": len(self.shards),
            "num_images": self.num_images,
            "shard_size": self.shard_size,
            "sha256": self.fingerprint(),
        }

    def to_table(self) -> pa.Table:
        sids, iids, uris, names = [], [], [], []
        for sid, iid, uri, name in self._rows():
            sids.append(sid)
            iids.append(iid)
            uris.append(uri)
            names.append(name)
        meta = {b"sa1b_engine.plan_kind": self.kind.encode()}
        if self.shard_size is not None:
            meta[b"sa1b_engine.shard_size"] = str(self.shard_size).encode()
        table = pa.Table.from_pydict(
            {"shard_id": sids, "image_id": iids, "uri": uris, "source_name": names},
            schema=_PLAN_SCHEMA,
        )
        return table.replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> ShardPlan:
        meta = table.schema.metadata or {}
        kind = meta.get(b"sa1b_engine.plan_kind", b"images").decode()
        size = meta.get(b"sa1b_engine.shard_size")
        d = table.to_pydict()
        names = d.get("source_name") or [None] * table.num_rows  # (plans of older versions)
        shards: dict[int, list] = {}
        for sid, iid, uri, name in zip(d["shard_id"], d["image_id"], d["uri"], names):
            shards.setdefault(sid, []).append((iid, uri, name))
        specs = []
        for sid, rows in shards.items():
            if kind == "sa1b":
                specs.append(ShardSpec(sid, source=rows[0][1], source_name=rows[0][2]))
            else:
                specs.append(ShardSpec(sid, tuple(ImageItem(i, u) for i, u, _ in rows)))
        return cls(kind, specs, int(size) if size else None)

    def save(self, url: str) -> None:
        with atomic_write(url) as f:
            pq.write_table(self.to_table(), f, compression="zstd")

    @classmethod
    def load(cls, url: str) -> ShardPlan:
        with open_url(url) as f:
            return cls.from_table(pq.read_table(f))


# ----------------------------------------------------------------------------- listing


def _fs_path(url: str):
    try:
        return url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise InputError(f"input {redact(url)}: cannot open ({scrub(str(e))})") from None


def _full(fs, path: str) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return os.path.abspath(path)
    return path if "://" in path else f"{proto}://{path}"


def _stat(url: str) -> str:
    """``"dir"``, ``"file"`` or raise :class:`InputError` (missing / unreachable)."""
    fs, path = _fs_path(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache()  # resume must see the store, not fsspec's listing cache
    try:
        if fs.isdir(path):
            return "dir"
        if fs.isfile(path):
            return "file"
    except FileNotFoundError:
        pass
    except PermissionError as e:
        raise InputError(f"input {redact(url)}: access denied ({type(e).__name__})") from None
    except Exception as e:  # connection refused, unknown bucket, bad endpoint ...
        raise InputError(f"input {redact(url)}: unreachable ({describe(e)})") from None
    raise InputError(f"input {redact(url)}: not found")


def list_files(url: str) -> list[str]:
    """Every file under ``url`` (recursive, hidden names skipped), sorted, as full URIs."""
    fs, path = _fs_path(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache()
    try:
        found = fs.find(path, withdirs=False)
    except FileNotFoundError:
        found = []
    except Exception as e:
        raise InputError(f"input {redact(url)}: cannot list ({describe(e)})") from None
    root = path.rstrip("/")
    out = []
    for p in found:
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/")):
            continue
        out.append(_full(fs, p))
    return sorted(out)


def _is_image(uri: str) -> bool:
    return redact(uri).lower().endswith(IMAGE_EXTENSIONS)


def _is_shard(uri: str) -> bool:
    return _SHARD_RE.match(basename(uri)) is not None


def _resolve(entry: str, base: str) -> str:
    entry = entry.strip()
    if "://" in entry or os.path.isabs(entry):
        return entry
    if "://" in base:
        return posixpath.join(base, entry)
    return os.path.abspath(os.path.join(base, entry))


def _pick_column(names: Sequence[str], url: str) -> str:
    lower = {n.lower(): n for n in names}
    for c in URI_COLUMNS:
        if c in lower:
            return lower[c]
    if len(names) == 1:
        return names[0]
    raise InputError(
        f"input {redact(url)}: no URI column; name one of {', '.join(URI_COLUMNS)} "
        f"(columns: {', '.join(names)})"
    )


def _parquet_id(value: object, row: int, url: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise InputError(f"input {redact(url)}: row {row}: image_id {value!r} is not an integer")


def _text(data: bytes, url: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"input {redact(url)}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
            "save the list as UTF-8"
        ) from None


_LINK_ROW = re.compile(r"\s*sa_\d+\.tar\t\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_ANY_LINK_ROW = re.compile(r"\s*[^\t]+\t\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def links_rows(text: str, url: str, *, every_row: bool = False) -> list[tuple[str, str]] | None:
    """``[(file_name, link), ...]`` of the shard rows of an SA-1B links file, or ``None``
    when ``text`` is not one: its first line is neither the header
    ``file_name<TAB>cdn_link`` nor a shard row (``grep`` output without the header).

    ``every_row``: rows of other files count too (and may start a headerless file), for
    callers that were told the file is a links file; malformed rows raise ``InputError``
    naming the line either way."""
    start = len(text) - len(text.lstrip())
    first = text[start:].split("\n", 1)[0]  # (peek: a long image list is split once, later)
    header = tuple(c.strip() for c in first.split("\t")) == LINKS_HEADER
    if not header and not (_ANY_LINK_ROW if every_row else _LINK_ROW).match(first):
        return None
    rows, skipped = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if header:  # the first line that is not blank
            header = False
            continue
        parts = [c.strip() for c in line.split("\t")]
        if len(parts) != 2 or not all(parts) or "://" not in parts[1]:
            raise InputError(
                f"input {redact(url)}: line {n}: expected file_name<TAB>cdn_link (an SA-1B "
                "links file)"
            )
        if every_row or _SHARD_RE.match(parts[0]):
            rows.append((parts[0], parts[1]))
        else:
            skipped.append(parts[0])
    if skipped:
        log.info("%s: skipping %d rows that are not shards (%s)", redact(url), len(skipped),
                 ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))  # fmt: skip
    if not rows:
        raise InputError(f"input {redact(url)}: an SA-1B links file without sa_NNNNNN.tar rows")
    return rows


def read_list_file(url: str) -> list[tuple[str, int | None]]:
    """``[(uri, image_id or None), ...]`` from a txt/csv/tsv/parquet list file (for an
    SA-1B links file: its shards' links)."""
    return _read_entries(url)[0]


def _read_entries(url: str) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """``(entries, names)``: ``names`` are the shards' file names when ``url`` is an SA-1B
    links file, else ``None``."""
    lower = redact(url).lower()
    base = posixpath.dirname(url) if "://" in url else os.path.dirname(os.path.abspath(url))
    try:
        with open_url(url) as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"input {redact(url)}: not found") from None
    except OSError as e:
        raise InputError(f"input {redact(url)}: unreadable ({describe(e)})") from None
    entries: list[tuple[str, int | None]]
    if lower.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"input {redact(url)}: not a Parquet file ({scrub(str(e))})") from None
        col = _pick_column(table.column_names, url)
        uris = [str(u) for u in table.column(col).to_pylist()]
        ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else None
        if ids is not None:
            ids = [_parquet_id(i, n, url) for n, i in enumerate(ids)]
        entries = list(zip(uris, ids or [None] * len(uris)))
    elif (links := links_rows(text := _text(data, url), url)) is not None:
        return [(link, None) for _, link in links], [name for name, _ in links]
    elif lower.endswith((".csv", ".tsv")):
        reader = csv.DictReader(
            io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ","
        )
        if not reader.fieldnames:
            raise InputError(f"input {redact(url)}: empty list file")
        col = _pick_column(reader.fieldnames, url)
        entries = []
        for n, row in enumerate(reader, start=2):
            uri = (row.get(col) or "").strip()
            if not uri:
                continue
            iid = (row.get("image_id") or "").strip() if "image_id" in row else ""
            try:
                entries.append((uri, int(iid) if iid else None))
            except ValueError:
                raise InputError(
                    f"input {redact(url)}: line {n}: image_id {iid!r} is not an integer"
                ) from None
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line.strip():  # columns: a .tsv, or a links file's row
                raise InputError(
                    f"input {redact(url)}: line {n}: a TAB in a one-URI-per-line list (name "
                    "a list with columns .tsv; an SA-1B links file starts with its header "
                    "file_name<TAB>cdn_link)"
                )
            entries.append((line.strip(), None))
    return [(_resolve(u, base), i) for u, i in entries], None


# ----------------------------------------------------------------------------- planning


def _sa1b_plan(uris: Sequence[str], origin: str, names: Sequence[str] | None = None) -> ShardPlan:
    """Re-annotation of the shards ``uris``; their ids come from their names (``names``
    where given: the file names of a links file, whose links are opaque)."""
    shards: dict[int, tuple[str, str | None]] = {}
    shown: dict[int, str] = {}
    for n, u in enumerate(uris):
        this = redact(u) if names is None else names[n]
        m = _SHARD_RE.match(basename(u) if names is None else names[n])
        if m is None:
            raise InputError(f"input {redact(origin)}: {this} is not named sa_NNNNNN.tar")
        sid = int(m.group(1))
        if sid in shards:
            both = this if names is not None else f"{shown[sid]}, {this}"  # (links: opaque)
            raise InputError(f"input {redact(origin)}: shard id {sid} appears twice ({both})")
        shards[sid] = (u, None if names is None else names[n])
        shown[sid] = this
    specs = [ShardSpec(sid, (), *shards[sid]) for sid in sorted(shards)]
    return ShardPlan("sa1b", specs)


def _image_plan(
    entries: Sequence[tuple[str, int | None]],
    shard_size: int,
    first_image_id: int,
    first_shard_id: int,
    origin: str,
) -> ShardPlan:
    given = [i for _, i in entries if i is not None]
    if given and len(given) != len(entries):
        raise InputError(f"input {redact(origin)}: image_id is given for some entries but not all")
    ids = given if given else list(range(first_image_id, first_image_id + len(entries)))
    if len(set(ids)) != len(ids):
        raise InputError(f"input {redact(origin)}: duplicate image ids")
    if any(i < 0 for i in ids):
        raise InputError(f"input {redact(origin)}: negative image ids")
    items = [ImageItem(int(i), u) for (u, _), i in zip(entries, ids)]
    shards = [
        ShardSpec(first_shard_id + n, tuple(items[s : s + shard_size]))
        for n, s in enumerate(range(0, len(items), shard_size))
    ]
    return ShardPlan("images", shards, shard_size)


def build_plan(
    input_url: str,
    *,
    shard_size: int = 1000,
    input_kind: str = "auto",
    first_image_id: int = 1,
    first_shard_id: int = 0,
) -> ShardPlan:
    """The shard plan of ``input_url`` (see the module docstring).

    Raises :class:`InputError` naming the input when it is missing, unreachable, empty or
    malformed.
    """
    if input_kind not in INPUT_KINDS:
        raise InputError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    if first_image_id < 0 or first_shard_id < 0:
        raise InputError("first image id and first shard id must be >= 0")
    what = _stat(input_url)
    if what == "dir":
        if input_kind == "list":
            raise InputError(f"input {redact(input_url)}: is a folder, not a list file")
        files = list_files(input_url)
        shards = [u for u in files if _is_shard(u)]
        images = [u for u in files if _is_image(u)]
        if input_kind == "sa1b" or (input_kind == "auto" and shards and not images):
            if not shards:
                raise InputError(f"input {redact(input_url)}: no sa_NNNNNN.tar shards found")
            return _sa1b_plan(shards, input_url)
        if not images:
            raise InputError(
                f"input {redact(input_url)}: no images found "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        entries: list[tuple[str, int | None]] = [(u, None) for u in images]
        return _image_plan(entries, shard_size, first_image_id, first_shard_id, input_url)
    # a single file: an SA-1B shard, an image or a list file
    is_list = redact(input_url).lower().endswith(LIST_EXTENSIONS)
    if (input_kind == "sa1b" and not is_list) or (input_kind == "auto" and _is_shard(input_url)):
        return _sa1b_plan([input_url], input_url)
    if input_kind == "images" or (input_kind == "auto" and _is_image(input_url)):
        return _image_plan(
            [(input_url, None)], shard_size, first_image_id, first_shard_id, input_url
        )
    if input_kind == "auto" and not is_list:
        raise InputError(
            f"input {redact(input_url)}: not a folder, image, SA-1B shard or list file "
            f"({', '.join(LIST_EXTENSIONS)})"
        )
    entries, names = _read_entries(input_url)
    if names is not None:
        return _sa1b_plan([u for u, _ in entries], input_url, names)
    if not entries:
        raise InputError(f"input {redact(input_url)}: the list is empty")
    if input_kind == "sa1b" or all(_is_shard(u) for u, _ in entries):
        return _sa1b_plan([u for u, _ in entries], input_url)
    return _image_plan(entries, shard_size, first_image_id, first_shard_id, input_url)
