"""Data contracts: the per-image SA-1B JSON Schema and the Parquet index Arrow schemas."""

from schemas.index import (
    ANNOTATIONS_SCHEMA,
    IMAGES_SCHEMA,
    INDEX_SCHEMA_VERSION,
    schema_metadata,
)
from schemas.sa1b import (
    SA1BSchemaError,
    iter_schema_errors,
    sa1b_image_schema,
    semantic_errors,
    validate_sa1b_image,
)

SCHEMA_VERSION = "1.0.0"

__all__ = [
    "ANNOTATIONS_SCHEMA",
    "IMAGES_SCHEMA",
    "INDEX_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "SA1BSchemaError",
    "iter_schema_errors",
    "sa1b_image_schema",
    "schema_metadata",
    "semantic_errors",
    "validate_sa1b_image",
]
