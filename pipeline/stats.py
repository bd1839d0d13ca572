"""Distributions of a Parquet index: masks per image, mask size, predicted IoU and
stability, as a printed summary and a picture.

Reads either index layout, streaming the annotation parts a batch at a time, so memory
stays bounded by the image table (one row per image) however many masks there are:

* a generation output (``jobs.generate``): the parts of committed shards only;
* an ``sa1b-decode index`` folder: the parts of shards whose report was written (the
  report comes last; a damaged shard's parts hold what was readable and are counted).

Quantiles come from fixed-width histograms (:data:`BINS` bins over each range), so they are
exact to one bin; counts, means and the masks-per-image distribution are exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import basename, exists, join, list_dir, open_url, redact, url_to_fs

__all__ = ["BINS", "IndexStats", "StatsError", "draw_stats", "index_parts", "index_stats", "pyplot"]

BINS = 1000
# histogram -> (axis label, range): values outside the range land in its first or last bin
_RANGES = {
    "size": ("relative mask size sqrt(mask area / image area)", (0.0, 1.0)),
    "predicted_iou": ("predicted IoU", (0.0, 1.2)),  # no sigmoid: can exceed 1
    "stability_score": ("stability score", (0.0, 1.0)),
}


class StatsError(ValueError):
    """The path is not an index, or its parts do not fit together; names it."""


@dataclass
class _Hist:
    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    total: float = 0.0
    n: int = 0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        idx = np.clip(((values - self.lo) / (self.hi - self.lo) * BINS).astype(np.int64), 0, BINS - 1)
        self.counts += np.bincount(idx, minlength=BINS)
        self.total += float(values.sum())
        self.n += len(values)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, BINS + 1)

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bin holding the ``q`` quantile (exact to one bin)."""
        if self.n == 0:
            return None
        k = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return float(self.edges[min(k, BINS - 1) + 1])

    def share_below(self, x: float) -> float | None:
        """Share of values in bins entirely below ``x`` (``x`` on a bin edge: exact)."""
        if self.n == 0:
            return None
        k = int(np.searchsorted(self.edges, x, side="right")) - 1
        return float(self.counts[: max(k, 0)].sum() / self.n)

    def summary(self) -> dict[str, float | None]:
        return {
            "mean": self.total / self.n if self.n else None,
            "p05": self.quantile(0.05),
            "median": self.quantile(0.5),
            "p95": self.quantile(0.95),
        }


@dataclass
class IndexStats:
    source: str
    layout: str  # "generation output" or "sa1b-decode index"
    shards: int
    images: int
    annotations: int
    masks_per_image: np.ndarray  # count of images by number of masks
    hists: dict[str, _Hist]
    damaged_shards: list[str] = field(default_factory=list)

    def masks_per_image_summary(self) -> dict[str, float | None]:
        n = self.masks_per_image
        if n.sum() == 0:
            return {"mean": None, "median": None, "p95": None, "max": None, "without_masks": 0}
        cum = np.cumsum(n)

        def q(p: float) -> int:
            return int(np.searchsorted(cum, p * cum[-1], side="left"))

        return {
            "mean": float((np.arange(len(n)) * n).sum() / n.sum()),
            "median": q(0.5),
            "p95": q(0.95),
            "max": int(np.flatnonzero(n)[-1]),
            "without_masks": int(n[0]),
        }

    def as_dict(self) -> dict[str, Any]:
        size = self.hists["size"]
        return {
            "source": redact(self.source),
            "layout": self.layout,
            "shards": self.shards,
            "damaged_shards": self.damaged_shards,
            "images": self.images,
            "annotations": self.annotations,
            "masks_per_image": self.masks_per_image_summary(),
            "relative_size": {
                **size.summary(),
                "share_below_0.1": size.share_below(0.1),
            },
            "predicted_iou": self.hists["predicted_iou"].summary(),
            "stability_score": self.hists["stability_score"].summary(),
        }


def _names(url: str, suffix: str) -> list[str]:
    return sorted(
        basename(u)[: -len(suffix)]
        for u in list_dir(url)
        if basename(u).endswith(suffix) and not basename(u).startswith(".")
    )


def index_parts(path: str) -> tuple[str, str, list[str], list[str]]:
    """``(layout, table root, shard names, damaged shard names)`` of the index at ``path``;
    :class:`StatsError` when ``path`` holds neither layout."""
    from pipeline.manifest import RUN_DIR, load_manifest, run_markers

    if exists(join(path, RUN_DIR, "manifest.json")):
        markers = run_markers(path, load_manifest(path)["run_id"])
        # an SA-1B input shard found damaged: its readable images were committed
        damaged = sorted(k for k, m in markers.items() if m.get("input_error"))
        return "generation output", join(path, "index"), sorted(markers), damaged
    if exists(join(path, "_reports")):
        damaged = []
        names = _names(join(path, "_reports"), ".json")
        for name in names:
            with open_url(join(path, "_reports", f"{name}.json")) as f:
                try:
                    if not json.loads(f.read()).get("complete", False):
                        damaged.append(name)
                except ValueError:
                    raise StatsError(f"{redact(path)}: report of {name} is not JSON") from None
        return "sa1b-decode index", path, names, damaged
    raise StatsError(
        f"{redact(path)}: not an index (neither a generation output with _run/manifest.json "
        "nor an `sa1b-decode index` folder with _reports/); index shards first with "
        "`sa1b-decode index SHARDS --out DIR`"
    )


def _part(fs: Any, root: str, table: str, name: str) -> pq.ParquetFile:
    url = join(root, table, f"{name}.parquet")
    _, p = url_to_fs(url)
    try:
        return pq.ParquetFile(p, filesystem=fs)
    except FileNotFoundError:
        raise StatsError(f"{redact(url)}: missing (shard {name} is listed as done)") from None
    except (OSError, pa.ArrowException) as e:
        raise StatsError(f"{redact(url)}: not a readable Parquet file ({e})") from None


def index_stats(
    path: str, *, progress: Any = None, parts: tuple[str, str, list[str], list[str]] | None = None
) -> IndexStats:
    """Stream the index at ``path`` into :class:`IndexStats`. ``progress`` (optional) is
    called once per shard read; ``parts``: :func:`index_parts` of ``path`` if known."""
    layout, root, names, damaged = index_parts(path) if parts is None else parts
    fs, _ = url_to_fs(root)
    image_ids, image_area, num_masks = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0, np.int64)]
    for name in names:
        t = _part(fs, root, "images", name).read(columns=["image_id", "width", "height", "num_annotations"])
        image_ids.append(t.column("image_id").to_numpy())
        image_area.append(
            t.column("width").to_numpy().astype(np.float64) * t.column("height").to_numpy()
        )
        num_masks.append(t.column("num_annotations").to_numpy().astype(np.int64))
    ids, area = np.concatenate(image_ids), np.concatenate(image_area)
    counts = np.bincount(np.concatenate(num_masks), minlength=1)
    order = np.argsort(ids, kind="stable")
    ids, area = ids[order], area[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        dup = int(ids[1:][np.diff(ids) == 0][0])
        raise StatsError(f"{redact(path)}: image {dup} is in more than one shard's index")
    hists = {k: _Hist(*r) for k, (_, r) in _RANGES.items()}
    annotations = 0
    cols = ["image_id", "area", "predicted_iou", "stability_score"]
    for name in names:
        part = _part(fs, root, "annotations", name)
        for batch in part.iter_batches(batch_size=1 << 16, columns=cols):
            img = batch.column(0).to_numpy()
            pos = np.searchsorted(ids, img)
            ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == img)
            if not ok.all():
                bad = int(img[~ok][0])
                raise StatsError(f"{redact(path)}: {name}: a mask of image {bad}, which has no image row")
            hists["size"].add(np.sqrt(batch.column(1).to_numpy() / area[pos]))
            hists["predicted_iou"].add(batch.column(2).to_numpy(zero_copy_only=False))
            hists["stability_score"].add(batch.column(3).to_numpy(zero_copy_only=False))
            annotations += batch.num_rows
        if progress is not None:
            progress()
    return IndexStats(path, layout, len(names), len(ids), annotations, counts, hists, damaged)


def pyplot() -> Any:
    """matplotlib's pyplot on a file backend; :class:`ImportError` that says how to get
    it (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "the picture needs matplotlib: pip install 'sa1b-engine[plot]' (or leave out --picture)"
        ) from None
    return plt


def draw_stats(stats: IndexStats, out: str) -> None:
    """A 2x2 PNG of the four distributions (needs matplotlib: the ``plot`` extra)."""
    from pipeline.io import atomic_write

    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    per_image = stats.masks_per_image
    ax = axes[0][0]
    ax.bar(np.arange(len(per_image)), per_image, width=1.0, color="#4477aa")
    ax.set_xlabel("masks per image")
    ax.set_ylabel("images")
    for ax, key in zip((axes[0][1], axes[1][0], axes[1][1]), _RANGES):
        h = stats.hists[key]
        ax.set_xlabel(_RANGES[key][0])
        ax.set_ylabel("masks")
        nz = np.flatnonzero(h.counts)
        if len(nz):
            # zoom to the data (SAM's scores crowd at the top of their range), in ~60 bars
            a, n = nz[0], nz[-1] + 1 - nz[0]
            g = -(-n // 60)
            span = g * -(-n // g)
            counts = np.pad(h.counts, (0, span))[a : a + span].reshape(-1, g).sum(1)
            edges = h.lo + (h.hi - h.lo) / BINS * np.arange(a, a + span + 1, g)
            ax.stairs(counts, edges, fill=True, color="#ee6677" if key == "size" else "#228833")
            lo, hi = edges[0], edges[-1]
            pad = max(hi - lo, 0.05) * 0.05
            ax.set_xlim(max(h.lo, lo - pad), min(h.hi, hi + pad))
            med = h.quantile(0.5)
            ax.axvline(med, color="black", linestyle="--", linewidth=1)
            ax.annotate(f" median {med:.3f}", (med, 0.95), xycoords=("data", "axes fraction"))
    mpi = stats.masks_per_image_summary()["mean"]
    fig.suptitle(
        f"{basename(stats.source.rstrip('/')) or stats.source}: {stats.shards} shards, "
        f"{stats.images:,} images, {stats.annotations:,} masks"
        + (f" ({mpi:.1f} per image)" if mpi is not None else "")
    )
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
