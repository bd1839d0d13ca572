"""JSON Schema of the per-image SA-1B annotation file (``sa_<id>.json``).

The schema itself lives in ``sa1b_image.schema.json`` (package data, usable from any
language). It checks structure and types; :func:`semantic_errors` adds the checks JSON
Schema cannot express (segmentation size equals ``[height, width]``, file name matches the
image id, annotation ids unique, numbers finite).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

__all__ = [
    "SA1BSchemaError",
    "iter_schema_errors",
    "sa1b_image_schema",
    "semantic_errors",
    "validate_sa1b_image",
]


class SA1BSchemaError(ValueError):
    """A per-image SA-1B record that does not follow the format."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        head = messages[0] if messages else "invalid SA-1B record"
        more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
        super().__init__(head + more)


@lru_cache(maxsize=1)
def sa1b_image_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) as a dict."""
    text = resources.files(__package__).joinpath("sa1b_image.schema.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = sa1b_image_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _where(err: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return path.lstrip(".") or "<root>"


def iter_schema_errors(record: Any) -> Iterator[str]:
    """Human-readable schema violations of ``record`` (empty when valid)."""
    for err in sorted(_validator().iter_errors(record), key=lambda e: list(e.absolute_path)):
        yield f"{_where(err)}: {err.message}"


def _finite(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    return not isinstance(v, float) or math.isfinite(v)


def semantic_errors(record: dict[str, Any], *, sa1b_file_name: bool = True) -> list[str]:
    """Consistency checks beyond the schema; assumes the record passed the schema.

    ``sa1b_file_name``: the image's ``file_name`` must be ``sa_<image_id>.jpg``, as in
    every SA-1B record (turn off for records of other images, which the schema allows to
    have any plain file name)."""
    out: list[str] = []
    img = record["image"]
    h, w = img["height"], img["width"]
    if sa1b_file_name:
        want = f"sa_{img['image_id']}.jpg"
        if img["file_name"] != want:
            out.append(
                f"image.file_name: {img['file_name']!r} does not match image_id "
                f"{img['image_id']} (expected {want!r})"
            )
    seen: set[int] = set()
    for i, ann in enumerate(record["annotations"]):
        for key in ("area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"):
            if not _finite(ann.get(key)):  # JSON parsers accept NaN/Infinity; JSON does not
                out.append(f"annotations[{i}].{key}: not a finite number: {ann.get(key)!r:.60}")
        size = ann["segmentation"]["size"]
        if list(size) != [h, w]:
            out.append(
                f"annotations[{i}].segmentation.size: {size} differs from the image's "
                f"[height, width] = {[h, w]}"
            )
        if ann["id"] in seen:
            out.append(f"annotations[{i}].id: duplicate id {ann['id']}")
        seen.add(ann["id"])
    return out


def validate_sa1b_image(record: Any, *, semantic: bool = True, sa1b_file_name: bool = True) -> None:
    """Raise :class:`SA1BSchemaError` listing every problem of ``record``."""
    errors = list(iter_schema_errors(record))
    if not errors and semantic:
        errors = semantic_errors(record, sa1b_file_name=sa1b_file_name)
    if errors:
        raise SA1BSchemaError(errors)
