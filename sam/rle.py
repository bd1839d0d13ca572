"""COCO run-length encoding (RLE) of binary masks, in vectorised numpy.

One implementation shared by the whole project (mask generator, SA-1B reader/writer,
validation). It follows cocoapi's ``maskApi.c`` exactly:

* masks are flattened column-major (Fortran order); runs alternate 0/1 and always start
  with a run of zeros, possibly of length 0;
* the compressed string packs every count in 5-bit groups as characters 48..111 with a
  continuation bit (0x20), sign-extended from bit 0x10 of the last group; from the third
  count on it stores the difference to the count two places earlier.

An RLE is the dict ``{"size": [h, w], "counts": str}`` that SA-1B stores; every function
that takes an RLE also accepts ``counts`` as ``bytes`` (pycocotools' form) or as a list /
array of integers (uncompressed RLE).

Boxes: :func:`bbox` is SA-1B's convention ``[x0, y0, x1 - x0, y1 - y0]`` with ``x1, y1``
the *inclusive* last pixel (what segment-anything's ``batched_mask_to_box`` +
``box_xyxy_to_xywh`` produce); :func:`coco_bbox` is pycocotools ``toBbox`` (one more in
width and height).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "RLEError",
    "area",
    "bbox",
    "coco_bbox",
    "counts_from_string",
    "counts_to_string",
    "decode",
    "encode",
    "mask_bbox",
    "rle_counts",
    "validate",
]

_MAX_GROUPS = 13  # 13 * 5 bits cover any int64 count


class RLEError(ValueError):
    """A malformed RLE: bad characters, negative runs, or runs that do not sum to h*w."""


# ---------------------------------------------------------------------------- string form


def counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """Compress integer run lengths to the COCO RLE string (``rleToString``)."""
    cnts = np.asarray(counts, dtype=np.int64).ravel()
    n = cnts.size
    if n == 0:
        return ""
    x = cnts.copy()
    if n > 3:  # the delta starts at index 3 (``m > 2`` in maskApi.c)
        x[3:] -= cnts[1:-2]
    # Split every value into 5-bit groups, least significant first.
    shifts = np.arange(_MAX_GROUPS, dtype=np.int64) * 5
    groups = (x[:, None] >> shifts[None, :]) & 0x1F  # (n, G)
    rest = x[:, None] >> (shifts[None, :] + 5)  # value left after each group
    more = np.where(groups & 0x10, rest != -1, rest != 0)
    # number of characters = index of the first group after which nothing is left, + 1
    nchars = np.argmin(more, axis=1) + 1
    take = np.arange(_MAX_GROUPS)[None, :] < nchars[:, None]
    chars = groups | np.where(more, 0x20, 0)
    chars = (chars + 48).astype(np.uint8)
    return chars[take].tobytes().decode("ascii")


def counts_from_string(s: str | bytes) -> np.ndarray:
    """Decompress a COCO RLE string to int64 run lengths (``rleFrString``)."""
    if isinstance(s, str):
        try:
            b = s.encode("ascii")
        except UnicodeEncodeError as e:
            raise RLEError("RLE counts string has non-ASCII characters") from e
    else:
        b = bytes(s)
    if not b:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(b, dtype=np.uint8).astype(np.int64) - 48
    if c.min() < 0 or c.max() > 63:
        raise RLEError("RLE counts string has characters outside '0'..'o'")
    ends = (c & 0x20) == 0
    if not ends[-1]:
        raise RLEError("RLE counts string ends inside a number (continuation bit set)")
    end_idx = np.flatnonzero(ends)
    starts = np.empty_like(end_idx)
    starts[0] = 0
    starts[1:] = end_idx[:-1] + 1
    group_of = np.repeat(np.arange(end_idx.size), end_idx - starts + 1)
    k = np.arange(c.size) - starts[group_of]
    if k.max() >= _MAX_GROUPS:
        raise RLEError("RLE counts string holds a number too large for int64")
    vals = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    # sign extension from the last group of each number
    last = c[end_idx]
    neg = (last & 0x10) != 0
    nk = end_idx - starts + 1
    vals = np.where(neg, vals - (np.int64(1) << (5 * nk)), vals)
    # undo the delta coding: cnts[m] = x[m] + cnts[m-2] for m > 2
    out = vals.copy()
    if out.size > 3:
        out[3::2] = np.cumsum(vals[3::2]) + vals[1]
        if out.size > 4:
            out[4::2] = np.cumsum(vals[4::2]) + vals[2]
    return out


# ---------------------------------------------------------------------------- helpers


def rle_counts(rle: dict[str, Any]) -> np.ndarray:
    """Integer run lengths of an RLE whose ``counts`` is a string, bytes or a list."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        return counts_from_string(counts)
    return np.asarray(counts, dtype=np.int64).ravel()


def _size(rle: dict[str, Any]) -> tuple[int, int]:
    try:
        h, w = rle["size"]
        return int(h), int(w)
    except (KeyError, TypeError, ValueError) as e:
        raise RLEError(f"RLE size must be [height, width], got {rle.get('size')!r}") from e


# ---------------------------------------------------------------------------- encode/decode


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode an HxW binary mask (bool or any integer type, non-zero = on) like
    ``pycocotools.mask.encode``; returns ``{"size": [h, w], "counts": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode expects an HxW mask, got shape {m.shape}")
    h, w = m.shape
    flat = m.astype(bool, copy=False).ravel(order="F")
    n = flat.size
    if n == 0:
        return {"size": [int(h), int(w)], "counts": counts_to_string([0])}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return {"size": [int(h), int(w)], "counts": counts_to_string(runs)}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode an RLE to an HxW bool array (C-contiguous)."""
    h, w = _size(rle)
    counts = rle_counts(rle)
    _check_counts(counts, h, w)
    values = (np.arange(counts.size) & 1).astype(bool)
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def _check_counts(counts: np.ndarray, h: int, w: int) -> None:
    if counts.size and counts.min() < 0:
        raise RLEError("RLE has a negative run length")
    total = int(counts.sum())
    if total != h * w:
        raise RLEError(f"RLE runs sum to {total}, expected h*w = {h}*{w} = {h * w}")


def validate(rle: dict[str, Any]) -> None:
    """Raise :class:`RLEError` unless the RLE is well formed and its runs sum to h*w."""
    if not isinstance(rle, dict) or "counts" not in rle:
        raise RLEError("RLE must be a dict with 'size' and 'counts'")
    h, w = _size(rle)
    if h < 0 or w < 0:
        raise RLEError(f"RLE size must be non-negative, got {[h, w]}")
    _check_counts(rle_counts(rle), h, w)


# ---------------------------------------------------------------------------- measures


def area(rle: dict[str, Any]) -> int:
    """Number of on pixels, from the runs (no decoding)."""
    return int(rle_counts(rle)[1::2].sum())


def _extent(rle: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """Inclusive (x0, y0, x1, y1) of the on pixels, or None for an empty mask."""
    h, _w = _size(rle)
    counts = rle_counts(rle)
    ends = np.cumsum(counts)
    starts = ends - counts
    s, ln = starts[1::2], counts[1::2]
    keep = ln > 0
    if not keep.any() or h == 0:
        return None
    s, e = s[keep], s[keep] + ln[keep] - 1  # first and last flat index of each run
    cs, ce = s // h, e // h
    rs, re = s % h, e % h
    x0, x1 = int(cs.min()), int(ce.max())
    if (ce > cs).any():  # a run crossing a column boundary covers rows h-1 and 0
        y0, y1 = 0, h - 1
    else:
        y0, y1 = int(rs.min()), int(re.max())
    return x0, y0, x1, y1


def bbox(rle: dict[str, Any]) -> list[int]:
    """SA-1B box ``[x0, y0, x1 - x0, y1 - y0]`` (inclusive last pixel) from the runs.

    An empty mask gives ``[0, 0, 0, 0]`` like segment-anything.
    """
    ext = _extent(rle)
    if ext is None:
        return [0, 0, 0, 0]
    x0, y0, x1, y1 = ext
    return [x0, y0, x1 - x0, y1 - y0]


def coco_bbox(rle: dict[str, Any]) -> list[int]:
    """pycocotools ``toBbox`` box ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]``."""
    ext = _extent(rle)
    if ext is None:
        return [0, 0, 0, 0]
    x0, y0, x1, y1 = ext
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def mask_bbox(mask: np.ndarray) -> list[int]:
    """SA-1B box of a decoded HxW mask (same convention as :func:`bbox`)."""
    m = np.asarray(mask).astype(bool, copy=False)
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size == 0:
        return [0, 0, 0, 0]
    rows = np.flatnonzero(m.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0]), int(rows[-1] - rows[0])]
