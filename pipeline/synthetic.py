"""Synthetic SA-1B-like data for tests, benchmarks and demos.

Masks are ellipses whose RLE is computed directly from their column intervals (no pixel
work), so a 1500x2250 image with 100 masks costs milliseconds; areas and boxes are exact.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from sam.rle import counts_to_string

__all__ = ["ellipse_rle", "synthetic_jpeg", "synthetic_record", "write_synthetic_shard"]


def ellipse_rle(
    h: int, w: int, cx: float, cy: float, rx: float, ry: float
) -> tuple[dict[str, Any], int, list[int]]:
    """RLE, area and SA-1B bbox of a filled axis-aligned ellipse clipped to the image."""
    x0, x1 = max(0, int(np.ceil(cx - rx))), min(w - 1, int(np.floor(cx + rx)))
    xs = np.arange(x0, x1 + 1)
    hh = ry * np.sqrt(np.clip(1 - ((xs - cx) / rx) ** 2, 0, None))
    ylo = np.clip(np.ceil(cy - hh), 0, h - 1).astype(np.int64)
    yhi = np.clip(np.floor(cy + hh), 0, h - 1).astype(np.int64)
    keep = yhi >= ylo
    xs, ylo, yhi = xs[keep], ylo[keep], yhi[keep]
    if xs.size == 0:
        return {"size": [h, w], "counts": counts_to_string([h * w])}, 0, [0, 0, 0, 0]
    starts = xs * h + ylo
    ends = xs * h + yhi + 1
    # merge runs that touch across a column boundary (a zero-length gap is not a run)
    touch = starts[1:] == ends[:-1]
    if touch.any():
        starts = np.concatenate(([starts[0]], starts[1:][~touch]))
        ends = np.concatenate((ends[:-1][~touch], [ends[-1]]))
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, h * w
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds)
    if counts.size > 1 and counts[-1] == 0:  # no trailing empty run (as pycocotools)
        counts = counts[:-1]
    area = int((ends - starts).sum())
    bbox = [int(xs[0]), int(ylo.min()), int(xs[-1] - xs[0]), int(yhi.max() - ylo.min())]
    return {"size": [h, w], "counts": counts_to_string(counts)}, area, bbox


def synthetic_record(
    image_id: int,
    h: int,
    w: int,
    n_masks: int,
    rng: np.random.Generator,
    *,
    first_ann_id: int | None = None,
) -> dict[str, Any]:
    """A per-image SA-1B record with ``n_masks`` ellipse masks."""
    anns = []
    ann_id = image_id * 1000 if first_ann_id is None else first_ann_id
    crop_boxes = [[0.0, 0.0, float(w), float(h)], [0.0, 0.0, w * 0.63, h * 0.67]]
    for k in range(n_masks):
        rx = float(rng.uniform(2, w / 4))
        ry = float(rng.uniform(2, h / 4))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        seg, area, box = ellipse_rle(h, w, cx, cy, rx, ry)
        anns.append(
            {
                "bbox": [float(v) for v in box],
                "area": area,
                "segmentation": seg,
                "predicted_iou": float(np.float32(rng.uniform(0.88, 1.02))),
                "point_coords": [[float(np.clip(cx, 0, w - 1)), float(np.clip(cy, 0, h - 1))]],
                "crop_box": [round(v, 1) for v in crop_boxes[k % 2]],
                "id": ann_id + k,
                "stability_score": float(np.float32(rng.uniform(0.95, 1.0))),
            }
        )
    return {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }


def synthetic_jpeg(h: int, w: int, rng: np.random.Generator, quality: int = 85) -> bytes:
    """A smooth-plus-noise RGB JPEG (sizes in the range of real photos)."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(xx / rng.uniform(20, 200) + rng.uniform(0, 6)),
            127 + 100 * np.cos(yy / rng.uniform(20, 200)),
            127 + 60 * np.sin((xx + yy) / rng.uniform(10, 100)),
        ],
        axis=-1,
    )
    base += rng.normal(0, 12, base.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def iter_synthetic(
    n_images: int,
    *,
    h: int = 48,
    w: int = 64,
    masks: int = 5,
    first_id: int = 1,
    seed: int = 0,
    jpeg_variants: int = 4,
) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """``(image_id, jpeg_bytes, record)`` for a synthetic shard (JPEGs are reused)."""
    rng = np.random.default_rng(seed)
    jpegs = [synthetic_jpeg(h, w, rng) for _ in range(max(1, min(jpeg_variants, n_images)))]
    for i in range(n_images):
        image_id = first_id + i
        yield image_id, jpegs[i % len(jpegs)], synthetic_record(image_id, h, w, masks, rng)


def write_synthetic_shard(url: str, n_images: int, **kwargs: Any) -> list[int]:
    """Write a synthetic shard (in order); returns the image ids."""
    from pipeline.sa1b_writer import ShardWriter

    writer_kw = {k: kwargs.pop(k) for k in ("gzip", "compresslevel") if k in kwargs}
    ids = []
    with ShardWriter(url, **writer_kw) as w:
        for image_id, jpeg, rec in iter_synthetic(n_images, **kwargs):
            w.add(image_id, jpeg, rec)
            ids.append(image_id)
    return ids
