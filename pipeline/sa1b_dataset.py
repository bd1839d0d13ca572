"""A PyTorch-compatible iterable dataset over SA-1B shards.

Shards are split across DataLoader workers (and across distributed ranks when
``torch.distributed`` is initialised): worker ``k`` of ``n`` reads shards ``k, k+n, ...``,
so every image is seen once per epoch. Each item is ``transform(record)``; the default
gives a dict with the decoded image and the parsed annotations (masks stay RLE: decode
the ones you need with :func:`sam.rle.decode`).

For training, ``shuffle=True`` permutes the shard order every epoch (the same permutation
on every rank and worker, from ``seed`` and the epoch set by :meth:`SA1BDataset.set_epoch`,
so the split stays disjoint), and ``shuffle_buffer=N`` also mixes records across the
shards a worker reads through a buffer of N records (SA-1B's members are already in
random order within a shard). A buffered record holds its JPEG bytes and JSON, not
decoded pixels or masks: for SA-1B about 1-5 MB each.

Under DistributedDataParallel every rank must run the same number of steps, but shards
hold different numbers of images, so an epoch of whole shards gives ranks uneven counts
and the first rank to finish waits forever in a collective. ``samples_per_rank=N`` makes
every rank yield exactly N items per epoch (split across its DataLoader workers): a
reader that runs out of its shards reads them again (reordered when ``shuffle``), one
with more stops at its share; readers never share a shard. It needs at least
``world_size x num_workers`` shards, and ``shuffle=True`` (else a reader with more than
its share reads the same first items every epoch). ``rank`` and ``world_size`` override
what ``torch.distributed`` reports, for other launchers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.io import redact
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

    >>> ds = SA1BDataset(urls, shuffle=True, shuffle_buffer=256, seed=0)
    >>> loader = DataLoader(ds, batch_size=None, num_workers=4)
    >>> for epoch in range(3):
    ...     ds.set_epoch(epoch)  # before iterating: DataLoader workers copy the dataset
    ...     for sample in loader: ...

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
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        samples_per_rank: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **reader_kwargs: Any,
    ):
        super().__init__()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if samples_per_rank is not None and samples_per_rank < 1:
            raise ValueError(f"samples_per_rank must be >= 1, got {samples_per_rank}")
        if (rank is None) != (world_size is None):
            raise ValueError("give rank and world_size together")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        self.samples_per_rank = samples_per_rank
        self.rank, self.world_size = rank, world_size
        self.shards = list(shards)
        self.transform = transform
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.reader_kwargs = reader_kwargs
        self.reports: list[Any] = []

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle the next iteration uses (call it before each epoch)."""
        self.epoch = int(epoch)

    def _slot(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = (self.rank, self.world_size) if self.world_size is not None else (0, 1)
        try:
            import torch.distributed as dist

            if self.world_size is None and dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover
            pass
        return worker, num, rank, world

    def _my_shards(self) -> list[str]:
        worker, num, rank, world = self._slot()
        shards = self.shards
        if self.shuffle:  # one permutation for all ranks and workers: the split stays disjoint
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards_for_worker(shards, worker, num, rank, world)

    def _read(self, urls: Sequence[str]) -> Iterator[SA1BRecord]:
        for url in urls:
            reader = ShardReader(url, **self.reader_kwargs)
            try:
                yield from reader
            finally:
                self.reports.append(reader.report)

    def _records(self) -> Iterator[SA1BRecord]:
        if self.samples_per_rank is None:
            yield from self._read(self._my_shards())
            return
        worker, num, rank, world = self._slot()
        if len(self.shards) < world * num:  # every reader of every rank fails alike
            raise ValueError(
                f"samples_per_rank needs a shard for every reader: {len(self.shards)} shards "
                f"for {world} rank(s) x {num} DataLoader worker(s)"
            )
        mine = self._my_shards()
        for repeat in itertools.count():  # the caller stops at its share
            urls = mine
            if repeat and self.shuffle:  # its own shards again, in another order
                key = [self.seed, self.epoch, rank, worker, 2, repeat]
                urls = [mine[i] for i in np.random.default_rng(key).permutation(len(mine))]
            n = 0
            for rec in self._read(urls):
                n += 1
                yield rec
            if n == 0:
                shown = ", ".join(redact(u) for u in urls[:3]) + (", ..." if len(urls) > 3 else "")
                raise RuntimeError(f"no records in {shown}: cannot fill samples_per_rank")

    def _share(self) -> int | None:
        """Items this reader yields: its part of ``samples_per_rank`` (or all)."""
        if self.samples_per_rank is None:
            return None
        worker, num, _, _ = self._slot()
        base, extra = divmod(self.samples_per_rank, num)
        return base + (worker < extra)

    def __iter__(self) -> Iterator[Any]:
        records = self._records()
        if self.shuffle_buffer > 1:
            worker, _, rank, _ = self._slot()
            rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 1])
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        try:
            for rec in itertools.islice(records, self._share()):
                yield self.transform(rec) if self.transform else rec
        finally:
            records.close()  # a share filled mid-shard still closes it, with its report


def _buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Each item out is a random one of the next ``size`` in: a streaming shuffle."""
    buf: list[Any] = []
    try:
        for it in items:
            if len(buf) < size:
                buf.append(it)
                continue
            k = int(rng.integers(size))
            buf[k], it = it, buf[k]
            yield it
        order = rng.permutation(len(buf))
        for k in order:
            yield buf[k]
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # an early stop still closes the shard and records its report
