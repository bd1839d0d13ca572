"""A PyTorch-compatible iterable dataset over SA-1B shards.

Shards are split across DataLoader workers (and across distributed ranks when
``torch.distributed`` is initialised): worker ``k`` of ``n`` reads shards ``k, k+n, ...``,
so every image is seen once per epoch. Each item is ``transform(record)``; the default
gives a dict with the decoded image and the parsed annotations (masks stay RLE: decode
the ones you need with :func:`sam.rle.decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from pipeline.sa1b_reader import SA1BRecord, ShardReader

__all__ = ["SA1BDataset", "default_sample", "shards_for_worker"]


def default_sample(rec: SA1BRecord) -> dict[str, Any]:
    return {
        "image_id": rec.image_id,
        "image": rec.image(),
        "annotations": rec.annotations,
        "shard": rec.shard,
    }


def shards_for_worker(
    shards: Sequence[str], worker: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> list[str]:
    """The shards one (rank, worker) pair reads: a round-robin split, disjoint, covering."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return list(shards[slot::slots])


class SA1BDataset(IterableDataset):
    """Iterate SA-1B records of ``shards`` (fsspec URLs).

    >>> loader = DataLoader(SA1BDataset(urls), batch_size=None, num_workers=4)

    ``reader_kwargs`` go to :class:`ShardReader`. A damaged shard (truncated, corrupt)
    yields the records before the damage and a warning; ``on_error="raise"`` makes it
    raise instead, which also reaches the main process from DataLoader workers.
    ``reports`` collects each shard's :class:`ShardReport` (also when iteration stops
    early) in the process that reads it: the main process only with ``num_workers=0``.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        transform: Callable[[SA1BRecord], Any] | None = default_sample,
        **reader_kwargs: Any,
    ):
        super().__init__()
        self.shards = list(shards)
        self.transform = transform
        self.reader_kwargs = reader_kwargs
        self.reports: list[Any] = []

    def _my_shards(self) -> list[str]:
        info = get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover
            pass
        return shards_for_worker(self.shards, worker, num, rank, world)

    def __iter__(self) -> Iterator[Any]:
        for url in self._my_shards():
            reader = ShardReader(url, **self.reader_kwargs)
            try:
                for rec in reader:
                    yield self.transform(rec) if self.transform else rec
            finally:
                self.reports.append(reader.report)
