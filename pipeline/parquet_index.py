"""Parquet index of SA-1B shards, built without decoding a single mask.

Layout (one part per shard, so a directory reads as one dataset)::

    <out>/images/<shard>.parquet        one row per image   (schemas.IMAGES_SCHEMA)
    <out>/annotations/<shard>.parquet   one row per mask    (schemas.ANNOTATIONS_SCHEMA)
    <out>/seek/<shard>.sidx             seek index for random access (optional)
    <out>/_reports/<shard>.json         what the pass found; written LAST (commit marker)

``pd.read_parquet(out + "/annotations", filters=[("area", ">", 10000)])`` works as is.
Locally every file is written to a hidden temp file then renamed; on object stores each
object is written once at its final key. A shard counts as indexed only when its report
exists and says the shard was complete, so re-running resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write, basename, describe, exists, join, open_url, redact, remove
from pipeline.sa1b_reader import (
    CorruptShardError,
    ShardReport,
    finish_stream,
    iter_members,
    open_shard_stream,
    parse_member_name,
)
from schemas import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, SCHEMA_VERSION, schema_metadata

__all__ = [
    "IndexPartBuilder",
    "ShardIndexResult",
    "index_rows_from_record",
    "index_shard",
    "is_indexed",
    "shard_stem",
    "write_index_part",
]

log = logging.getLogger(__name__)

_ANN_COLS = [f.name for f in ANNOTATIONS_SCHEMA]
_IMG_COLS = [f.name for f in IMAGES_SCHEMA]


def shard_stem(shard: str) -> str:
    """``sa_000020`` for ``.../sa_000020.tar`` (or an already bare name)."""
    return basename(shard).split(".", 1)[0]


def index_rows_from_record(
    record: Mapping[str, Any],
    shard: str,
    *,
    jpg: tuple[int, int] | None = None,
    json_loc: tuple[int, int] | None = None,
    with_counts: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Index rows of one per-image record: ``(image_row, annotation_rows)``.

    ``jpg``/``json_loc`` are ``(offset, size)`` of the members in the uncompressed
    shard when known (``None`` for records that never were in a tar).
    """
    img = record["image"]
    anns = record["annotations"]
    image_row = {
        "image_id": int(img["image_id"]),
        "file_name": img["file_name"],
        "width": int(img["width"]),
        "height": int(img["height"]),
        "num_annotations": len(anns),
        "shard": shard_stem(shard),
        "jpg_offset": jpg[0] if jpg else None,
        "jpg_size": jpg[1] if jpg else None,
        "json_offset": json_loc[0] if json_loc else None,
        "json_size": json_loc[1] if json_loc else None,
    }
    image_id = image_row["image_id"]
    rows = []
    for a in anns:
        rows.append(
            {
                "image_id": image_id,
                "id": int(a["id"]),
                "area": int(a["area"]),
                "bbox": _floats(a["bbox"], 4, "bbox"),
                "predicted_iou": float(a["predicted_iou"]),
                "stability_score": float(a["stability_score"]),
                "point_coords": _floats(a["point_coords"][0], 2, "point_coords[0]"),
                "crop_box": _floats(a["crop_box"], 4, "crop_box"),
                "counts": _counts(a["segmentation"]) if with_counts else None,
            }
        )
    return image_row, rows


def _floats(values: Any, n: int, what: str) -> list[float]:
    """``values`` as ``n`` floats (the index's fixed-size list columns)."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"{what} must be a list of {n} numbers, got {values!r:.80}")
    return [float(v) for v in values]


def _int(value: Any, what: str, bits: int = 64) -> int:
    """``value`` as an integer that fits the index's ``int<bits>`` column."""
    try:
        v = int(value)
    except OverflowError as e:  # int(inf)
        raise ValueError(f"{what} is not a finite number: {value!r:.40}") from e
    if not -(2 ** (bits - 1)) <= v < 2 ** (bits - 1):
        raise ValueError(f"{what} {v} does not fit a {bits}-bit integer")
    return v


def _counts(segmentation: Any) -> str:
    counts = segmentation["counts"]
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise TypeError(f"segmentation counts must be a COCO RLE string, got {type(counts).__name__}")
    return counts


class IndexPartBuilder:
    """Accumulates the rows of one shard column by column (fast for 1M masks)."""

    def __init__(self, shard: str, *, with_counts: bool = False):
        self.shard = shard_stem(shard)
        self.with_counts = with_counts
        self.img: dict[str, list] = {c: [] for c in _IMG_COLS}
        self.ann: dict[str, list] = {c: [] for c in _ANN_COLS}
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.img["image_id"])

    @property
    def num_annotations(self) -> int:
        return len(self.ann["id"])

    def add_record(
        self,
        record: Mapping[str, Any],
        *,
        jpg: tuple[int, int] | None = None,
        json_loc: tuple[int, int] | None = None,
    ) -> None:
        """Add one per-image record. Checks the fields the index needs first, so a
        malformed record raises (``KeyError``/``TypeError``/``ValueError``) without
        leaving half its rows behind."""
        img = record["image"]
        anns = record["annotations"]
        image_id = _int(img["image_id"], "image_id")
        if not isinstance(anns, list):
            raise TypeError(f"annotations is a {type(anns).__name__}, not a list")
        cols = (
            [image_id] * len(anns),
            [_int(a["id"], "annotation id") for a in anns],
            [_int(a["area"], "area") for a in anns],
            [_floats(a["bbox"], 4, "bbox") for a in anns],
            [float(a["predicted_iou"]) for a in anns],
            [float(a["stability_score"]) for a in anns],
            [_floats(a["point_coords"][0], 2, "point_coords[0]") for a in anns],
            [_floats(a["crop_box"], 4, "crop_box") for a in anns],
            [_counts(a["segmentation"]) for a in anns] if self.with_counts else [None] * len(anns),
        )
        row = (
            image_id,
            str(img["file_name"]),
            _int(img["width"], "width", 32),
            _int(img["height"], "height", 32),
            len(anns),
            self.shard,
            jpg[0] if jpg else None,
            jpg[1] if jpg else None,
            json_loc[0] if json_loc else None,
            json_loc[1] if json_loc else None,
        )
        for c, v in zip(_ANN_COLS, cols):
            self.ann[c].extend(v)
        self._row_of[image_id] = len(self)
        for c, v in zip(_IMG_COLS, row):
            self.img[c].append(v)

    def set_jpg(self, image_id: int, offset: int, size: int) -> bool:
        i = self._row_of.get(image_id)
        if i is None:
            return False
        self.img["jpg_offset"][i] = offset
        self.img["jpg_size"][i] = size
        return True

    def tables(self) -> tuple[pa.Table, pa.Table]:
        images = pa.Table.from_pydict(self.img, schema=IMAGES_SCHEMA)
        anns = pa.Table.from_pydict(self.ann, schema=ANNOTATIONS_SCHEMA)
        return images, anns


def _to_table(rows: Any, schema: pa.Schema) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema)


def _write_table(table: pa.Table, url: str) -> None:
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **schema_metadata(SCHEMA_VERSION)}
    )
    with atomic_write(url) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=256 * 1024)


def write_index_part(
    out_dir: str,
    shard_name: str,
    images_rows: Iterable[Mapping[str, Any]] | pa.Table,
    ann_rows: Iterable[Mapping[str, Any]] | pa.Table,
) -> tuple[str, str]:
    """Write ``<out>/annotations/<shard>.parquet`` then ``<out>/images/<shard>.parquet``.

    Rows are dicts as made by :func:`index_rows_from_record` (or Arrow tables). Each part
    is complete or absent. Returns the two URLs (images, annotations).
    """
    stem = shard_stem(shard_name)
    ann_url = join(out_dir, "annotations", f"{stem}.parquet")
    img_url = join(out_dir, "images", f"{stem}.parquet")
    _write_table(_to_table(ann_rows, ANNOTATIONS_SCHEMA), ann_url)
    _write_table(_to_table(images_rows, IMAGES_SCHEMA), img_url)
    return img_url, ann_url


def _report_url(out_dir: str, shard: str) -> str:
    return join(out_dir, "_reports", f"{shard_stem(shard)}.json")


def is_indexed(out_dir: str, shard: str) -> bool:
    """Whether ``shard`` has a complete index part under ``out_dir`` (resume check)."""
    url = _report_url(out_dir, shard)
    if not exists(url):
        return False
    try:
        with open_url(url) as f:
            rep = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return bool(rep.get("complete")) and exists(
        join(out_dir, "images", f"{shard_stem(shard)}.parquet")
    )


@dataclass
class ShardIndexResult:
    shard: str
    report: ShardReport
    images: int
    annotations: int
    seconds: float
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "annotations": self.annotations,
            "seconds": round(self.seconds, 3),
            **self.report.as_dict(),
            "already_indexed": self.skipped,
        }


def index_shard(
    url: str,
    out_dir: str,
    *,
    with_counts: bool = False,
    seek_index: bool = True,
    spacing: int | None = None,
    overwrite: bool = False,
    backend: str = "auto",
    name: str | None = None,
) -> ShardIndexResult:
    """Index one shard in one sequential pass: Parquet parts (+ seek index).

    JSON members are parsed (no mask is decoded); JPEG members are skipped, only their
    location is kept. A damaged shard yields parts for everything read before the damage
    and a report with ``complete: false`` (so a later run retries it). ``name``
    (``sa_000020.tar``) names the shard when ``url`` does not (an SA-1B CDN link).
    """
    from pipeline.seek_index import DEFAULT_SPACING, SeekIndex, gzip_checkpoints, seek_index_name

    t0 = time.perf_counter()
    ident = name or url
    stem = shard_stem(ident)
    shown = name or redact(url)
    if not overwrite and is_indexed(out_dir, ident):
        rep = ShardReport(url=shown, complete=True)
        return ShardIndexResult(stem, rep, 0, 0, 0.0, skipped=True)

    # an old report marks the shard complete: it goes before any new part is written, so
    # a run killed half-way through an --overwrite never leaves a mixed index marked done
    remove(_report_url(out_dir, ident))
    rep = ShardReport(url=shown)
    builder = IndexPartBuilder(stem, with_counts=with_counts)
    spacing = spacing or DEFAULT_SPACING
    stream, counter, rep.compression = open_shard_stream(url, backend=backend)
    sidx = SeekIndex(basename(ident), rep.compression, 0, 0, spacing) if seek_index else None
    jpgs: dict[int, tuple[int, int]] = {}
    jsons: set[int] = set()  # indexed records
    seen: set[tuple[int, str]] = set()  # (image id, "jpg"/"json") of every member read

    def want(name: str) -> bool:
        p = parse_member_name(name)
        return p is not None and p[1] == "json"

    try:
        for m in iter_members(stream, want=want, skipped=rep.skipped):
            rep.members += 1
            if sidx is not None:
                sidx.add(m)
            p = parse_member_name(m.name)
            if p is None:
                rep.skipped.append((m.name, "not an sa_<id>.jpg/.json member"))
                continue
            image_id, kind = p
            if (image_id, kind) in seen:
                rep.bad_records.append((m.name, "duplicate member (the first one is indexed)"))
                log.warning("%s: skipping duplicate member %s", rep.url, m.name)
                continue
            seen.add((image_id, kind))
            if kind == "jpg":
                jpgs[image_id] = (m.offset, m.size)
                continue
            try:
                record = json.loads(m.data or b"")
                if int(record["image"]["image_id"]) != image_id:
                    raise ValueError(
                        f"image_id {record['image']['image_id']} differs from the member name"
                    )
                builder.add_record(record, json_loc=(m.offset, m.size))
            except (ValueError, KeyError, TypeError, IndexError, OverflowError) as e:
                rep.bad_records.append((m.name, f"{type(e).__name__}: {e}"))
                log.warning("%s: skipping %s: %s", rep.url, m.name, e)
                continue
            jsons.add(image_id)
        finish_stream(stream, counter)
        rep.complete = True
    except (CorruptShardError, OSError, EOFError) as e:
        rep.error = describe(e)
        log.warning("%s: shard incomplete after %d members: %s", rep.url, rep.members, rep.error)
    finally:
        rep.uncompressed_bytes = getattr(stream, "total_out", counter.nbytes)
        rep.compressed_bytes = counter.nbytes
        counter.raw.close()
    if sidx is not None and rep.complete and rep.compression == "gzip":
        sidx.checkpoints = gzip_checkpoints(url, spacing)

    for image_id, (off, size) in jpgs.items():
        builder.set_jpg(image_id, off, size)
    bad = {parse_member_name(n)[0] for n, _ in rep.bad_records if parse_member_name(n)}
    rep.unpaired = sorted(
        [f"sa_{i}.json" for i in jsons - set(jpgs)]
        + [f"sa_{i}.jpg" for i in set(jpgs) - jsons - bad]
    )
    rep.images = len(jsons & set(jpgs))
    images_t, anns_t = builder.tables()
    write_index_part(out_dir, stem, images_t, anns_t)
    if sidx is not None and rep.complete:
        sidx.uncompressed_size = rep.uncompressed_bytes
        sidx.compressed_size = rep.compressed_bytes
        sidx.save(join(out_dir, "seek", seek_index_name(ident)))
    result = ShardIndexResult(
        stem, rep, len(builder), builder.num_annotations, time.perf_counter() - t0
    )
    with atomic_write(_report_url(out_dir, ident)) as f:  # commit marker, last
        f.write(json.dumps(result.as_dict(), indent=1).encode())
    return result


def read_reports(out_dir: str, shards: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The per-shard reports under ``<out>/_reports``."""
    from pipeline.io import list_dir

    out = []
    for u in list_dir(join(out_dir, "_reports")):
        if not u.endswith(".json") or basename(u).startswith("."):
            continue
        if shards is not None and shard_stem(u) not in {shard_stem(s) for s in shards}:
            continue
        with open_url(u) as f:
            out.append(json.loads(f.read()))
    return out
