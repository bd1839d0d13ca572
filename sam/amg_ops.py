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
    inter = count_true(logits > threshold + offset)
    union = count_true(logits > threshold - offset)
    return inter.float() / union.float()


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """Number of true pixels of each (..., H, W) bool mask (int64). Summing the bytes
    with an int32 accumulator is several times faster than a boolean sum on the CPU."""
    flat = masks.reshape(*masks.shape[:-2], -1)
    if flat.shape[-1] < 2**31:
        return flat.view(torch.uint8).sum(dim=-1, dtype=torch.int32).long()
    return flat.sum(dim=-1, dtype=torch.int64)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY boxes (int64) of (N, H, W) bool masks; empty masks give zeros."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    m8 = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows = m8.amax(dim=2).bool()  # byte max is much faster than a boolean any on the CPU
    cols = m8.amax(dim=1).bool()
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
    return _runs_from_bounds(starts, ends, ids, n, big_h * big_w)


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


# ----------------------------------------------------------------------------- tiled statistics
class TiledUpsampler:
    """Statistics of upsampled mask logits without materialising them.

    The reference upsamples every low-res logit map to the image (bilinear to the square
    model input, crop the padding, bilinear to the crop size) and then thresholds it.
    Per axis that composite is a linear map whose rows have at most three consecutive
    non-zero weights, so every output pixel is a convex combination of a 3x3
    neighbourhood of low-res logits. Output pixels are grouped into tiles that share a
    neighbourhood: a tile whose neighbourhood lies entirely above `thr + offset` (or at
    or below `thr - offset`) is known without computing it; only the tiles near a mask
    boundary ("mixed") are evaluated, as small matrix products grouped by tile shape so
    that none is padded. This gives the stability score, area and box of every mask at
    a small fraction of the cost.
    """

    def __init__(
        self,
        model_size: int,
        low_res_size: tuple[int, int],
        input_size: tuple[int, int],
        out_size: tuple[int, int],
        device: torch.device,
    ) -> None:
        self.model_size = model_size
        self.input_size = tuple(input_size)
        self.out_size = tuple(out_size)
        factor = model_size // low_res_size[0]
        self.factor = factor
        self.rows = min(low_res_size[0], -(-input_size[0] // factor) + 1)
        self.cols = min(low_res_size[1], -(-input_size[1] // factor) + 1)
        self.wr, self.r_start, self.r_len = self._axis(self.rows, factor, input_size[0], out_size[0], device)
        self.wc, self.c_start, self.c_len = self._axis(self.cols, factor, input_size[1], out_size[1], device)
        self.cnt = self.r_len[:, None] * self.c_len[None, :]

    @staticmethod
    def _axis(n: int, factor: int, keep: int, out: int, device):
        eye = torch.eye(n, dtype=torch.float64)[:, None, :]
        a = F.interpolate(eye, n * factor, mode="linear", align_corners=False)[..., :keep]
        a = F.interpolate(a, out, mode="linear", align_corners=False)[:, 0, :].T  # (out, n)
        nz = a > 0
        lo = nz.float().argmax(dim=1)
        hi = n - 1 - nz.flip(1).float().argmax(dim=1)
        centre = (lo + hi) // 2
        if ((hi - lo) > 2).any():
            raise AssertionError("composite interpolation support wider than 3 cells")
        start = torch.searchsorted(centre, torch.arange(n))
        end = torch.searchsorted(centre, torch.arange(n), right=True)
        length = end - start
        g = max(1, int(length.max()))
        w = torch.zeros(n, g, 3, dtype=torch.float64)
        padded = F.pad(a, (1, 1))  # column j of `a` is column j + 1 here
        for c in range(n):
            if length[c]:
                w[c, : length[c]] = padded[start[c] : end[c], c : c + 3]
        return w.float().to(device), start.to(device), length.to(device)

    # a tile is taken as wholly above (below) a threshold only with this margin, so that
    # float rounding in the interpolation cannot move one of its pixels across it
    MARGIN = 1e-4

    def _classify(self, x: torch.Tensor, thresholds: tuple[float, ...]):
        """For low-res logits x (N, rows, cols): the tiles that must be evaluated (some
        threshold falls within the range of their 3x3 neighbourhood), and for each
        threshold the tiles known to lie wholly above it. A tile between two thresholds
        (flat logits near a boundary) is known for all of them without evaluation."""
        mx, mn = _neighbourhood_max_min(x)
        present = (self.cnt > 0)[None]
        above = [(mn > t + self.MARGIN) & present for t in thresholds]
        mixed = torch.zeros(mn.shape, dtype=torch.bool, device=mn.device)
        for t, a in zip(thresholds, above):
            mixed |= ~a & ~(mx <= t - self.MARGIN)
        mixed &= present
        return mixed, [a & ~mixed for a in above]

    def mixed_fraction(self, low_res: torch.Tensor, thr: float, offset: float) -> torch.Tensor:
        """Per mask (N,): the share of output pixels in tiles that must be evaluated (a
        cost estimate of the tiled statistics against dense upsampling)."""
        x = low_res[:, : self.rows, : self.cols].float()
        mixed, _ = self._classify(x, (thr + offset, thr - offset, thr))
        total = self.out_size[0] * self.out_size[1]
        return (mixed * self.cnt[None]).flatten(1).sum(dim=1).float() / max(1, total)

    def stats(
        self, low_res: torch.Tensor, thr: float, offset: float, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stability scores (N,), areas (N,) and inclusive XYXY boxes (N, 4) in the crop
        frame of the thresholded upsampled masks, for low-res logits (N, h4, w4). Mixed
        tiles are evaluated at most ``max_pixels`` output pixels at a time (memory: about
        20 bytes each), all at once when None."""
        n = low_res.shape[0]
        dev = low_res.device
        x = low_res[:, : self.rows, : self.cols].float()
        hi_t, lo_t = thr + offset, thr - offset
        mixed, (above_hi, above_lo, above) = self._classify(x, (hi_t, lo_t, thr))
        cnt = self.cnt[None]
        sums = [(a * cnt).flatten(1).sum(dim=1) for a in (above_hi, above_lo, above)]

        big = torch.iinfo(torch.int64).max
        top = torch.full((n,), big, dtype=torch.int64, device=dev)
        left = torch.full((n,), big, dtype=torch.int64, device=dev)
        bottom = torch.full((n,), -1, dtype=torch.int64, device=dev)
        right = torch.full((n,), -1, dtype=torch.int64, device=dev)
        # extents of the tiles known to be wholly in the mask
        rows_any = above.any(dim=2)
        cols_any = above.any(dim=1)
        has = rows_any.any(dim=1)
        if has.any():
            ar_r = torch.arange(self.rows, device=dev)
            ar_c = torch.arange(self.cols, device=dev)
            r0 = torch.where(rows_any, ar_r, self.rows).amin(dim=1).clamp(max=self.rows - 1)
            r1 = torch.where(rows_any, ar_r, -1).amax(dim=1).clamp(min=0)
            c0 = torch.where(cols_any, ar_c, self.cols).amin(dim=1).clamp(max=self.cols - 1)
            c1 = torch.where(cols_any, ar_c, -1).amax(dim=1).clamp(min=0)
            top = torch.where(has, self.r_start[r0], top)
            bottom = torch.where(has, self.r_start[r1] + self.r_len[r1] - 1, bottom)
            left = torch.where(has, self.c_start[c0], left)
            right = torch.where(has, self.c_start[c1] + self.c_len[c1] - 1, right)
        box = (top, left, bottom, right)

        # The mixed tiles, grouped by shape (rows x columns of output pixels) so that each
        # group is evaluated at its exact size: no padding to the largest (edge) tile.
        mi, ri, ci = mixed.nonzero().unbind(1)
        gc = self.wc.shape[1]
        shape = self.r_len[ri] * (gc + 1) + self.c_len[ci]
        order = torch.argsort(shape, stable=True)
        keys, counts = torch.unique_consecutive(shape[order], return_counts=True)
        windows = F.pad(x, (1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1)  # a view
        s = 0
        for key, count in zip(keys.tolist(), counts.tolist()):
            h, w = divmod(key, gc + 1)
            step = count if max_pixels is None else max(1, max_pixels // (h * w))
            for a in range(s, s + count, step):
                sel = order[a : min(a + step, s + count)]
                self._evaluate(windows, mi[sel], ri[sel], ci[sel], (h, w), (hi_t, lo_t, thr), sums, box)
            s += count
        inter, union, area = sums
        stability = inter.float() / union.float()
        boxes = torch.stack([left, top, right, bottom], dim=1)
        empty = area == 0
        boxes = torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
        return stability, area, boxes

    def _evaluate(self, windows, mi, ri, ci, size, thresholds, sums, box) -> None:
        """Upsample the tiles (mask mi, tile row ri, tile column ci), all of `size`
        output pixels, and add their pixel counts above each threshold to `sums` and
        their mask pixels' extents to `box` (top, left, bottom, right), in place."""
        h, w = size
        win = windows[mi, ri, ci]  # (M, 3, 3)
        v = torch.bmm(torch.bmm(self.wr[:, :h][ri], win), self.wc[:, :w][ci].transpose(1, 2))
        flat = v.flatten(1)
        for total, t in zip(sums, thresholds):
            # float sums vectorise far better than boolean ones on the CPU
            total.index_add_(0, mi, (flat > t).float().sum(dim=1).round().long())
        pos = v > thresholds[2]
        in_rows = pos.any(dim=2)
        some = in_rows.any(dim=1)
        rows = in_rows.view(torch.uint8)
        cols = pos.any(dim=1).view(torch.uint8)
        # first and last rows (columns) holding a mask pixel: argmax gives the first maximum
        r0, c0 = self.r_start[ri], self.c_start[ci]
        ends = (
            r0 + rows.argmax(dim=1),
            c0 + cols.argmax(dim=1),
            r0 + (h - 1) - rows.flip(1).argmax(dim=1),
            c0 + (w - 1) - cols.flip(1).argmax(dim=1),
        )
        ms = mi[some]
        for b, e, how in zip(box, ends, ("amin", "amin", "amax", "amax")):
            b.scatter_reduce_(0, ms, e[some], how)


def _neighbourhood_max_min(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min over the 3x3 neighbourhood of each cell of x (N, H, W), of the cells
    present (an edge replicated adds no new value); separable, so four elementwise
    passes each rather than a pooling kernel."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    out = []
    for op in (torch.maximum, torch.minimum):
        m = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
        out.append(op(op(m[:, :, :-2], m[:, :, 1:-1]), m[:, :, 2:]))
    return out[0], out[1]


def masks_to_runs_fast(
    masks: torch.Tensor, offset: tuple[int, int], image_size: tuple[int, int]
) -> list[np.ndarray]:
    """Same result as `masks_to_runs`, using contiguous vertical differences (faster on
    the CPU): edges are found along columns of the row-major masks, then sorted into
    column-major order by a single integer key."""
    n, h, w = masks.shape
    if n == 0:
        return []
    big_h, big_w = image_size
    x0, y0 = offset
    mu = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)
    z = torch.zeros(n, 1, w, dtype=torch.uint8, device=masks.device)
    d = torch.diff(mu, dim=1, prepend=z, append=z)  # (n, h + 1, w): 1 rise, 255 fall
    idx = d.nonzero()
    kind = d[idx[:, 0], idx[:, 1], idx[:, 2]]
    key = (idx[:, 0] * w + idx[:, 2]) * (h + 1) + idx[:, 1]
    order = torch.argsort(key)
    idx, kind = idx[order].cpu().numpy(), kind[order].cpu().numpy()
    pos = (idx[:, 2] + x0) * big_h + y0 + idx[:, 1]  # rise: run start; fall: run end
    ids = idx[:, 0]
    rise = kind == 1
    starts, s_ids, ends = pos[rise], ids[rise], pos[~rise]
    return _runs_from_bounds(starts, ends, s_ids, n, big_h * big_w)


def _runs_from_bounds(starts, ends, ids, n, total) -> list[np.ndarray]:
    join = np.zeros(len(starts), dtype=bool)
    if len(starts) > 1:
        join[1:] = (starts[1:] == ends[:-1]) & (ids[1:] == ids[:-1])
    keep_end = np.ones(len(ends), dtype=bool)
    keep_end[:-1] = ~join[1:]
    starts, s_ids, ends = starts[~join], ids[~join], ends[keep_end]
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
