"""The data plane: fsspec I/O, SA-1B shard reader/writer, seek and Parquet indexes."""

from __future__ import annotations

from typing import Any

from pipeline.manifest import read_index
from pipeline.parquet_index import (
    IndexPartBuilder,
    index_rows_from_record,
    index_shard,
    is_indexed,
    write_index_part,
)
from pipeline.sa1b_reader import (
    CorruptShardError,
    RecordError,
    SA1BRecord,
    ShardFormatError,
    ShardReader,
    ShardReport,
    TruncatedShardError,
)
from pipeline.sa1b_writer import ShardWriter, shard_name, write_image_json, write_shard
from pipeline.seek_index import (
    SeekIndex,
    ShardRandomAccess,
    build_seek_index,
    find_record_by_scan,
)

__all__ = [
    "CorruptShardError",
    "IndexPartBuilder",
    "RecordError",
    "SA1BDataset",
    "SA1BRecord",
    "SeekIndex",
    "ShardFormatError",
    "ShardRandomAccess",
    "ShardReader",
    "ShardReport",
    "ShardWriter",
    "TruncatedShardError",
    "build_seek_index",
    "find_record_by_scan",
    "index_rows_from_record",
    "index_shard",
    "is_indexed",
    "read_index",
    "shard_name",
    "write_image_json",
    "write_index_part",
    "write_shard",
]


def __getattr__(name: str) -> Any:  # torch is imported only when the dataset is used
    if name == "SA1BDataset":
        from pipeline.sa1b_dataset import SA1BDataset

        return SA1BDataset
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


# Generation runs (shard plans, run manifest and markers, the Ray driver).
from pipeline.driver import GenerateConfig, RunSummary, run_generation  # noqa: E402
from pipeline.manifest import RunConflictError, RunStatus, run_status  # noqa: E402
from pipeline.plan import InputError, ShardPlan, build_plan  # noqa: E402

__all__ += [
    "GenerateConfig",
    "InputError",
    "RunConflictError",
    "RunStatus",
    "RunSummary",
    "ShardPlan",
    "build_plan",
    "run_generation",
    "run_status",
]
