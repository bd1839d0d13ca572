"""Writing SA-1B: per-image JSON byte-compatible with the dataset, and shards as SA-1B
ships them (``sa_NNNNNN.tar``, gzip-compressed, flat ``./sa_<id>.jpg`` + ``./sa_<id>.json``).

Output is deterministic: the same records in the same order give the same bytes (fixed
tar metadata, gzip header without name or time).

The JSON form is Python's ``json.dumps`` with its default separators (``", "`` and
``": "``), keys in SA-1B order (``image`` then ``annotations``; ``image_id, width,
height, file_name``; ``bbox, area, segmentation, predicted_iou, point_coords, crop_box,
id, stability_score``), numbers kept as the caller typed them (int boxes stay ints, float
boxes floats; numpy float32 scores are printed at double precision like the reference).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pipeline.io import atomic_write

__all__ = [
    "ANNOTATION_KEYS",
    "IMAGE_KEYS",
    "ShardWriter",
    "nonempty",
    "shard_name",
    "to_sa1b_record",
    "write_image_json",
    "write_shard",
]

IMAGE_KEYS = ("image_id", "width", "height", "file_name")
ANNOTATION_KEYS = (
    "bbox",
    "area",
    "segmentation",
    "predicted_iou",
    "point_coords",
    "crop_box",
    "id",
    "stability_score",
)
_SEG_KEYS = ("size", "counts")


def shard_name(index: int) -> str:
    """``sa_000020.tar`` for shard 20."""
    return f"sa_{index:06d}.tar"


def _plain(v: Any) -> Any:
    """numpy/torch scalars and arrays to JSON-native Python values."""
    if isinstance(v, (str, bool, int, float)) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("ascii")
    if hasattr(v, "tolist"):  # torch tensors
        return v.tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _ordered(d: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = {k: d[k] for k in keys if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)  # extra keys keep their order
    return out


def to_sa1b_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with SA-1B key order and JSON-native values (numpy -> Python)."""
    rec = _plain(record)
    image = _ordered(rec["image"], IMAGE_KEYS)
    anns = []
    for a in rec["annotations"]:
        a = _ordered(a, ANNOTATION_KEYS)
        if isinstance(a.get("segmentation"), Mapping):
            a["segmentation"] = _ordered(a["segmentation"], _SEG_KEYS)
        anns.append(a)
    out = {"image": image, "annotations": anns}
    out.update((k, v) for k, v in rec.items() if k not in out)
    return out


def nonempty(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generator's records that are SA-1B annotations: an empty mask (kept only at a
    stability threshold of 0, its score 0/0) is none, and its NaN no JSON."""
    return [r for r in records if r["area"] > 0]


def write_image_json(record: Mapping[str, Any]) -> bytes:
    """Serialise one per-image record exactly as SA-1B files are written."""
    return json.dumps(to_sa1b_record(record), ensure_ascii=True, allow_nan=False).encode()


class ShardWriter:
    """Write one SA-1B shard to any fsspec URL.

    >>> with ShardWriter("out/sa_000000.tar") as w:
    ...     w.add(1, jpeg_bytes, write_image_json(record))

    Locally the shard appears (``os.replace``) only when the context exits cleanly; on an
    object store it is uploaded once at its final key. ``gzip=False`` writes a plain tar.
    """

    def __init__(
        self,
        url: str,
        *,
        compresslevel: int = 6,
        gzip: bool = True,
        member_prefix: str = "./",
        mtime: int = 0,
    ):
        self.url = url
        self.compresslevel = compresslevel
        self.gzip = gzip
        self.member_prefix = member_prefix
        self.mtime = mtime
        self.count = 0
        self._ctx: Any = None
        self._gz: Any = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        self._ctx = atomic_write(self.url)
        f = self._ctx.__enter__()
        target = f
        if self.gzip:
            self._gz = gzip.GzipFile(
                filename="", mode="wb", fileobj=f, compresslevel=self.compresslevel, mtime=0
            )
            target = self._gz
        self._tar = tarfile.open(fileobj=target, mode="w|", format=tarfile.GNU_FORMAT)
        return self

    def add_member(self, name: str, data: bytes) -> tuple[int, int]:
        """Append a raw member (for tests and special layouts; no name checks).
        Returns ``(offset, size)`` of its data in the uncompressed tar stream."""
        if self._tar is None:
            raise RuntimeError("ShardWriter used outside its `with` block")
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mtime = self.mtime
        ti.mode = 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        self._tar.addfile(ti, io.BytesIO(data))
        end = self._tar.offset
        return end - (len(data) + 511) // 512 * 512, len(data)

    def add(
        self, image_id: int, jpeg_bytes: bytes, annotation_json: bytes | Mapping[str, Any]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Append ``sa_<id>.jpg`` then ``sa_<id>.json`` (a dict is serialised first).
        Returns the ``(offset, size)`` of the jpg and of the json data, as the Parquet
        index's ``jpg_*``/``json_*`` columns want them."""
        if not isinstance(annotation_json, (bytes, bytearray)):
            annotation_json = write_image_json(annotation_json)
        image_id = int(image_id)
        jpg = self.add_member(f"{self.member_prefix}sa_{image_id}.jpg", bytes(jpeg_bytes))
        js = self.add_member(f"{self.member_prefix}sa_{image_id}.json", bytes(annotation_json))
        self.count += 1
        return jpg, js

    def _abandon(self) -> None:
        """Drop the tar and gzip streams without flushing into the discarded output."""
        if self._tar is not None:
            self._tar.closed = True
            self._tar.fileobj.closed = True
        if self._gz is not None:
            self._gz.fileobj = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ctx = self._ctx
        try:
            if exc_type is not None:
                self._abandon()
                ctx.__exit__(exc_type, exc, tb)
                return
            try:
                assert self._tar is not None
                self._tar.close()
                if self._gz is not None:
                    self._gz.close()
            except BaseException:
                # the shard is incomplete: the output must be discarded, not committed
                self._abandon()
                ctx.__exit__(*sys.exc_info())
                raise
            ctx.__exit__(None, None, None)  # commit only after both closes succeeded
        finally:
            self._tar = self._gz = self._ctx = None


def write_shard(
    url: str, items: Iterable[tuple[int, bytes, bytes | Mapping[str, Any]]], **kwargs: Any
) -> int:
    """Write ``(image_id, jpeg_bytes, json)`` items to a shard; returns the image count."""
    with ShardWriter(url, **kwargs) as w:
        for image_id, jpeg, js in items:
            w.add(image_id, jpeg, js)
    return w.count
