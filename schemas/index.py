"""Arrow schemas of the Parquet index tables.

``images``: one row per image, with where its members lie in the shard's *uncompressed*
tar stream (``*_offset`` is the first data byte, ``*_size`` its length), so a seek index
or a plain range read can fetch them.

``annotations``: one row per mask. ``counts`` (the COCO RLE string) is nullable: it is
filled only when the index is built with counts, which keeps the default index small;
every part has the same columns so a directory reads as one dataset.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["ANNOTATIONS_SCHEMA", "IMAGES_SCHEMA", "INDEX_SCHEMA_VERSION", "schema_metadata"]

INDEX_SCHEMA_VERSION = "1"

_box = pa.list_(pa.float64(), 4)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_annotations", pa.int32(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("jpg_offset", pa.int64()),
        pa.field("jpg_size", pa.int64()),
        pa.field("json_offset", pa.int64()),
        pa.field("json_size", pa.int64()),
    ]
)

ANNOTATIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", _box, nullable=False),
        pa.field("predicted_iou", pa.float64(), nullable=False),
        pa.field("stability_score", pa.float64(), nullable=False),
        pa.field("point_coords", pa.list_(pa.float64(), 2), nullable=False),
        pa.field("crop_box", _box, nullable=False),
        pa.field("counts", pa.string(), nullable=True),
    ]
)


def schema_metadata(schema_version: str) -> dict[bytes, bytes]:
    """Key/value metadata stored in every Parquet part."""
    return {
        b"sa1b_engine.schema_version": schema_version.encode(),
        b"sa1b_engine.index_schema_version": INDEX_SCHEMA_VERSION.encode(),
    }
