"""Vectorised building blocks of the automatic mask generator.

Everything here works on whole batches of masks on the model's device; the only host
transfer per batch is the run boundaries of the kept masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- grids, crops
def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points in [0, 1]: cell centres, row-major with x fastest."""
    step = 1.0 / n_per_side
    side = np.linspace(step / 2, 1 - step / 2, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has n_per_side / downscale**i points per side."""
    return [point_grid(int(n_per_side / (downscale**i))) for i in range(n_layers + 1)]


def crop_boxes(
    size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """XYXY crop windows of every layer (layer 0 = the whole image) and their layers.

    Layer i has 2**i crops per side, overlapping by `overlap_ratio` of the short side
    scaled to the layer; crops are listed x outer, y inner."""
    h, w = size
    boxes, layers = [[0, 0, w, h]], [0]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short * (2 / n))
        cw = math.ceil((overlap * (n - 1) + w) / n)
        ch = math.ceil((overlap * (n - 1) + h) / n)
        x0s = [int((cw - overlap) * i) for i in range(n)]
        y0s = [int((ch - overlap) * i) for i in range(n)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
                layers.append(layer)
    return boxes, layers


# ----------------------------------------------------------------------------- upsampling
def upsample_logits(
    low_res: torch.Tensor, model_size: int, input_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Low-res logits (N, h4, w4) -> logits at `out_size`, exactly as the reference:
    bilinear to the square model input, drop the padding, bilinear to the image.

    Only the source rows/columns that reach the unpadded region are upsampled in the
    first step (plus one, so edge clamping is unchanged): same numbers, less work."""
    n, h4, w4 = low_res.shape
    factor = model_size // h4
    rows = min(h4, -(-input_size[0] // factor) + 1)
    cols = min(w4, -(-input_size[1] // factor) + 1)
    x = low_res[:, None, :rows, :cols]
    x = F.interpolate(x, (rows * factor, cols * factor), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(out_size), mode="bilinear", align_corners=False)
    return x[:, 0]


# ----------------------------------------------------------------------------- scores, boxes
def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at threshold+offset and threshold-offset."""
    inter = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int64)
    union = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int64)
    return inter.float() / union.float()


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY boxes (int64) of (N, H, W) bool masks; empty masks give zeros."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = torch.where(rows, ar_h, -1).amax(dim=1)
    top = torch.where(rows, ar_h, h).amin(dim=1)
    right = torch.where(cols, ar_w, -1).amax(dim=1)
    left = torch.where(cols, ar_w, w).amin(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def near_crop_edge(
    boxes: torch.Tensor, crop: list[int], image: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Boxes (crop frame) within `atol` of a crop edge that is not an image edge."""
    crop_t = torch.tensor(crop, dtype=torch.float, device=boxes.device)
    img_t = torch.tensor(image, dtype=torch.float, device=boxes.device)
    offset = torch.tensor([crop[0], crop[1], crop[0], crop[1]], device=boxes.device)
    b = (boxes + offset).float()
    at_crop = torch.isclose(b, crop_t[None], atol=atol, rtol=0)
    at_image = torch.isclose(b, img_t[None], atol=atol, rtol=0)
    return (at_crop & ~at_image).any(dim=1)


# ----------------------------------------------------------------------------- RLE
def masks_to_runs(
    masks: torch.Tensor, offset: tuple[int, int], image_size: tuple[int, int]
) -> list[np.ndarray]:
    """Uncompressed COCO run lengths of (N, h, w) bool masks placed at `offset` = (x0, y0)
    in an image of `image_size` = (H, W), without building the padded masks.

    Runs of ones are found per column on the device (rising and falling edges), moved to
    the host in one transfer, shifted into the image's column-major frame, merged where
    a run continues into the next column, and turned into counts (zeros first)."""
    n, h, w = masks.shape
    big_h, big_w = image_size
    x0, y0 = offset
    if n == 0:
        return []
    m = masks.transpose(1, 2)  # (N, w, h): column-major order
    prev = F.pad(m[:, :, :-1], (1, 0))
    nxt = F.pad(m[:, :, 1:], (0, 1))
    rise = (m & ~prev).nonzero()
    fall = (m & ~nxt).nonzero()
    both = torch.cat([rise, fall], dim=0).cpu().numpy()
    r, f = both[: len(rise)], both[len(rise) :]
    # absolute column-major positions in the image
    starts = (r[:, 1] + x0) * big_h + y0 + r[:, 2]
    ends = (f[:, 1] + x0) * big_h + y0 + f[:, 2] + 1
    ids = r[:, 0]
    total = big_h * big_w
    # a run that ends exactly where the next one (same mask) starts is one run
    join = np.zeros(len(starts), dtype=bool)
    if len(starts) > 1:
        join[1:] = (starts[1:] == ends[:-1]) & (ids[1:] == ids[:-1])
    keep_start = ~join
    keep_end = np.ones(len(ends), dtype=bool)
    keep_end[:-1] = ~join[1:]
    starts, s_ids = starts[keep_start], ids[keep_start]
    ends = ends[keep_end]
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, ends
    split = np.searchsorted(s_ids, np.arange(n + 1))
    out = []
    for i in range(n):
        b = bounds[2 * split[i] : 2 * split[i + 1]]
        if len(b) and b[-1] == total:  # ends inside a run of ones: no trailing zeros
            counts = np.diff(np.concatenate(([0], b)))
        else:
            counts = np.diff(np.concatenate(([0], b, [total])))
        out.append(counts)
    return out


def runs_area(counts: np.ndarray) -> int:
    return int(counts[1::2].sum())


def runs_to_mask(counts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(w, h).T


def mask_to_runs_np(mask: np.ndarray) -> np.ndarray:
    """Column-major run lengths (zeros first) of one HxW bool mask, on the host."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds)
    if flat.size and flat[0]:
        counts = np.concatenate(([0], counts))
    return counts


# ----------------------------------------------------------------------------- clean-up
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `area_thresh`
    (8-connectivity). Returns the mask and whether it changed."""
    import cv2

    holes = mode == "holes"
    work = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(work, 8)
    sizes = stats[1:, -1]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
