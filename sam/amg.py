"""`SamAutomaticMaskGenerator`: segment everything in an image with a grid of point prompts.

Same arguments, defaults and record fields as the reference generator; the work is
organised for throughput instead:

- the masks of a point batch are filtered by predicted IoU *before* upsampling, and the
  upsampling only touches the unpadded part of the model input;
- thresholding, stability, boxes, crop-edge filtering and NMS stay on the device;
- run lengths are found on the device and leave it in one transfer per batch, already
  in the full image's frame (no padded full-size copy of crop masks);
- crops of one layer, and several images, are encoded in one batched forward pass;
- the decoder projects the image side of its first block once for all prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from . import amg_ops as ops
from . import runtime
from .model import Sam
from .predictor import PRECISIONS, RESIZES, SamPredictor, as_rgb_uint8

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The settings that generated SA-1B's automatic masks (see the dataset's paper):
    # crop_box and point_coords of the released files reproduce exactly with them.
    "sa1b": {
        "points_per_side": 32,
        "crop_n_layers": 2,
        "crop_n_points_downscale_factor": 2,
        "crop_overlap_ratio": 512 / 1500,
        "pred_iou_thresh": 0.88,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 0.7,
        "crop_nms_thresh": 0.7,
        "min_mask_region_area": 100,
    },
    # For the bundled tiny model: its predicted IoUs and stability scores are less
    # confident than SAM's, so SAM's thresholds (0.88 / 0.95) keep a few masks per image;
    # at these it finds 99% of held-out objects at IoU 0.5 (bench.quality --amg).
    "tiny": {
        "pred_iou_thresh": 0.5,
        "stability_score_thresh": 0.8,
    },
}

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MAX_POINTS_PER_SIDE = 1024  # a million prompts per crop; SA-1B used 32


@dataclass
class _Masks:
    """Masks of one image kept so far. Pixels are not materialised: each mask is its
    low-res logits plus the crop it came from; full-resolution masks are built once,
    for the masks that survive every filter and NMS."""

    low_res: list[torch.Tensor] = field(default_factory=list)
    crop_ids: list[torch.Tensor] = field(default_factory=list)  # index into `crops`
    boxes: list[torch.Tensor] = field(default_factory=list)  # XYXY inclusive, image frame
    iou: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    crops: list[tuple[list[int], tuple[int, int]]] = field(default_factory=list)  # box, input size


def generator_defaults() -> dict[str, Any]:
    """Every keyword argument of the generator with its default."""
    sig = inspect.signature(SamAutomaticMaskGenerator.__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}


def check_generator_args(settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first unusable generator argument in ``settings``
    (missing ones take the generator's defaults). No model is needed: a job checks its
    settings before it records them or starts any worker."""
    a = {**generator_defaults(), **settings}
    per_side, layers = a["points_per_side"], a["crop_n_layers"]
    factor = a["crop_n_points_downscale_factor"]
    if (per_side is None) == (a["point_grids"] is None):
        raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
    if a["output_mode"] not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {a['output_mode']!r}")
    if a["points_per_batch"] < 1:
        raise ValueError("points_per_batch must be at least 1")
    if a["precision"] not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {a['precision']!r}"
        )
    if a["resize"] not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {a['resize']!r}")
    for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
                 "box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio"):  # fmt: skip
        if not math.isfinite(a[name]):  # NaN would silently switch a filter off
            raise ValueError(f"{name} must be a finite number, got {a[name]}")
    if layers < 0 or factor < 1:
        raise ValueError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
    if not 0.0 <= a["crop_overlap_ratio"] < 1.0:
        raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {a['crop_overlap_ratio']}")
    if a["stability_score_thresh"] > 1.0:
        raise ValueError(
            "stability_score_thresh must be at most 1 (a ratio of areas), got "
            f"{a['stability_score_thresh']}"
        )
    if a["pred_iou_thresh"] > 1.0:
        log.warning("pred_iou_thresh %s > 1 keeps almost no masks", a["pred_iou_thresh"])
    if per_side is not None:
        if not 1 <= per_side <= MAX_POINTS_PER_SIDE:
            raise ValueError(f"points_per_side must be in [1, {MAX_POINTS_PER_SIDE}], got {per_side}")
        for layer in range(layers + 1):
            if per_side // factor**layer < 1:
                raise ValueError(
                    f"crop layer {layer} would have no points: points_per_side {per_side} / "
                    f"crop_n_points_downscale_factor {factor}**{layer} < 1"
                )
    elif len(a["point_grids"]) < layers + 1:
        raise ValueError("point_grids needs one grid per crop layer (crop_n_layers + 1)")


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        batch_size: int | None = None,
        precision: str = "fp32",
        resize: str = "pil",
        max_upsample_pixels: int | None = None,
    ) -> None:
        """Arguments as in the reference generator. Extra keyword-only options:

        batch_size: point prompts per decoder pass (default: sized to the device).
            `points_per_batch` is kept for compatibility; results do not depend on it.
        precision: "fp32", "bf16" or "fp16" for encoder and decoder (autocast).
        resize: "pil" (the reference's resize, on the CPU) or "torch" (antialiased
            bilinear on the model's device: on a GPU it takes the resize off the CPU;
            masks agree with "pil" to IoU ~0.99, see `SamPredictor`).
        max_upsample_pixels: bound on full-resolution logits held at once (memory).
        """
        check_generator_args(locals())  # every argument, before any work
        if points_per_side is not None:
            self.point_grids = ops.layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.predictor = SamPredictor(model, precision=precision, resize=resize)
        self.model = model
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        dev = model.device
        if dev.type == "cpu":
            runtime.tune_cpu_allocator()  # see sam.runtime; SAM_NO_MALLOPT=1 opts out
        self.batch_size = batch_size or (1024 if dev.type == "cuda" else 256)
        self.max_upsample_pixels = max_upsample_pixels or (
            1 << 30 if dev.type == "cuda" else 1 << 26
        )
        self.timings: dict[str, float] = defaultdict(float)

    @classmethod
    def from_preset(cls, model: Sam, preset: str = "default", **overrides) -> SamAutomaticMaskGenerator:
        """A generator with the settings of a named preset (`default`, `sa1b`, `tiny`)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        return cls(model, **{**PRESETS[preset], **overrides})

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of one HxWx3 uint8 RGB image, as a list of records."""
        return self.generate_batch([image])[0]

    @torch.no_grad()
    def generate_batch(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Masks of several images; their crops are encoded together layer by layer."""
        images = [as_rgb_uint8(im, f"images[{i}]") for i, im in enumerate(images)]
        results = []
        for image, data in zip(images, self._generate_masks(images)):
            results.append(self._records(data, image.shape[:2]))
        return results

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _timed(self, stage: str):
        dev = self.model.device
        sync = dev.type == "cuda"
        if sync:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(dev)
        self.timings[stage] += time.perf_counter() - t

    def _generate_masks(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        jobs = []  # (image index, crop box, layer)
        n_crops = []
        for i, image in enumerate(images):
            boxes, layers = ops.crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            n_crops.append(len(boxes))
            # a window of zero width or height (images of a few pixels) holds no mask
            jobs += [(i, b, layer) for b, layer in zip(boxes, layers) if b[2] > b[0] and b[3] > b[1]]
        per_image = [_Masks() for _ in images]
        float_boxes = [False] * len(images)
        float_crops = [False] * len(images)
        # Crops (of one or several images) are encoded a few at a time in one batch.
        group = self._encoder_group()
        for start in range(0, len(jobs), group):
            chunk = jobs[start : start + group]
            crops = [images[i][b[1] : b[3], b[0] : b[2]] for i, b, _ in chunk]
            with self._timed("encoder"):
                self.predictor.set_images(crops)
            for k, (i, box, layer) in enumerate(chunk):
                self.predictor.select(k)
                kept, empty_batch = self._process_crop(
                    per_image[i], crops[k].shape[:2], box, layer, images[i].shape[:2]
                )
                float_boxes[i] |= empty_batch
                float_crops[i] |= kept == 0  # the reference's empty crop makes crop boxes float
            self.predictor.reset_image()
        out = []
        for i, image in enumerate(images):
            data = self._finish_image(per_image[i], image.shape[:2], n_crops[i])
            data["float_boxes"] = float_boxes[i]
            data["float_crops"] = float_crops[i]
            out.append(data)
        return out

    def _encoder_group(self) -> int:
        """Crops per encoder pass: the global-attention bias of one image is
        heads x tokens^2 floats (1 GiB for vit_h), so the group is sized to ~4 GiB on a
        GPU and kept at 4 on the CPU."""
        if self.model.device.type == "cpu":
            return 4
        enc = self.model.image_encoder
        heads = enc.blocks[0].attn.num_heads
        tokens = enc.pos_embed.shape[1] * enc.pos_embed.shape[2]
        per_image = heads * tokens * tokens * 4 * 2
        return int(max(1, min(16, (4 << 30) // per_image)))

    def _process_crop(
        self,
        dst: _Masks,
        crop_size: tuple[int, int],
        crop_box: list[int],
        layer: int,
        image_size: tuple[int, int],
    ) -> tuple[int, bool]:
        """Run the point grid of one crop; append the crop's NMS survivors to `dst`.
        Returns how many were kept and whether a reference-sized point batch came out
        empty (which makes the reference's boxes floats)."""
        dev = self.model.device
        grid = self.point_grids[layer]
        points = grid * np.array(crop_size)[None, ::-1]  # crop pixels, float64
        transformed = self.predictor.transform.apply_coords(points, crop_size)
        in_points = torch.as_tensor(transformed, dtype=torch.float, device=dev)
        geometry = ops.TiledUpsampler(
            self.model.image_encoder.img_size,
            self._low_res_size(),
            self.predictor.input_size,
            crop_size,
            dev,
        )
        parts = []
        alive = torch.zeros(len(points), dtype=torch.bool, device=dev)
        for s in range(0, len(points), self.batch_size):
            part = self._process_batch(in_points[s : s + self.batch_size], geometry, crop_box, image_size)
            if part is None:
                continue
            part["point_idx"] += s
            alive[part.pop("alive_idx") + s] = True
            parts.append(part)
        alive_np = alive.cpu().numpy()
        n_ref = self.points_per_batch
        empty_batch = any(
            not alive_np[s : s + n_ref].any() for s in range(0, len(points), n_ref)
        )
        parts = [p for p in parts if len(p["iou"])]
        if not parts:
            return 0, empty_batch
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        with self._timed("nms"):
            keep = batched_nms(
                cat["boxes"].float(), cat["iou"], torch.zeros_like(cat["boxes"][:, 0]),
                self.box_nms_thresh,
            )
        x0, y0 = crop_box[0], crop_box[1]
        offset = torch.tensor([x0, y0, x0, y0], device=dev)
        crop_id = len(dst.crops)
        dst.crops.append((list(crop_box), tuple(self.predictor.input_size)))
        dst.low_res.append(cat["low_res"][keep])
        dst.crop_ids.append(torch.full((len(keep),), crop_id, dtype=torch.int64, device=dev))
        dst.boxes.append(cat["boxes"][keep] + offset)
        dst.iou.append(cat["iou"][keep])
        dst.stability.append(cat["stability"][keep])
        idx = cat["point_idx"][keep].cpu().numpy()
        dst.points.append(points[idx] + np.array([x0, y0], dtype=np.float64))
        return len(keep), empty_batch

    def _low_res_size(self) -> tuple[int, int]:
        h, w = self.model.prompt_encoder.mask_input_size
        return (h, w)

    def _process_batch(
        self,
        in_points: torch.Tensor,
        geometry: ops.TiledUpsampler,
        crop_box: list[int],
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor] | None:
        p = self.predictor
        n = in_points.shape[0]
        labels = torch.ones(n, 1, dtype=torch.int, device=in_points.device)
        with self._timed("decoder"):
            if self.pred_iou_thresh > 0.0:
                low_res, iou, flat = p.decode_above(in_points[:, None, :], labels, self.pred_iou_thresh)
                point_idx = flat // (self.model.mask_decoder.num_mask_tokens - 1)
            else:
                low_res, iou = p.decode_low_res(in_points[:, None, :], labels, multimask_output=True)
                k = low_res.shape[1]
                low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
                point_idx = torch.arange(n, device=in_points.device).repeat_interleave(k)
        with self._timed("filter"):
            if low_res.shape[0] == 0:
                return None
            stab, _, boxes = self._stats(low_res, geometry)
            if self.stability_score_thresh > 0.0:
                keep = stab >= self.stability_score_thresh
                low_res, iou, point_idx, stab, boxes = (
                    low_res[keep], iou[keep], point_idx[keep], stab[keep], boxes[keep]
                )
            alive_idx = point_idx.clone()
            h, w = image_size
            keep = ~ops.near_crop_edge(boxes, crop_box, [0, 0, w, h])
        return {
            "low_res": low_res[keep],
            "iou": iou[keep],
            "stability": stab[keep],
            "boxes": boxes[keep],
            "point_idx": point_idx[keep],
            "alive_idx": alive_idx,
        }

    # per mask, tiles are cheaper than dense upsampling unless nearly all of the output
    # must be evaluated (the share given by `mixed_fraction`; on the CPU with the tiny
    # model on photos, 0.85 to 1.0 measured alike and 0.5 about 5% slower overall)
    DENSE_FRACTION = 0.9

    def _stats(self, low_res: torch.Tensor, geometry: ops.TiledUpsampler):
        """Stability, area and boxes of the upsampled masks: from tiles along each mask's
        edges, or by dense upsampling (in bounded chunks) for the masks whose edge tiles
        cover nearly all of the output (`DENSE_FRACTION`)."""
        thr, off = self.model.mask_threshold, self.stability_score_offset
        # (the tiles' shortcut assumes thr - off <= thr <= thr + off)
        dense = None if off < 0 else geometry.mixed_fraction(low_res, thr, off) >= self.DENSE_FRACTION
        if dense is None or dense.all():
            return self._dense_stats(low_res, geometry)
        tiled = ~dense
        # a tile pixel holds ~5x the bytes of a dense logit: the same memory bound
        part = geometry.stats(low_res[tiled], thr, off, self.max_upsample_pixels // 5)
        out = [torch.empty((len(low_res), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in part]
        for o, t in zip(out, part):
            o[tiled] = t
        # Tiled sums differ from the reference's by float rounding only (a few pixels in a
        # million); where that could flip the stability filter, use the exact numbers.
        redo = dense.clone()
        redo[tiled] = (part[0] - self.stability_score_thresh).abs() < 1e-4
        if redo.any():
            for o, t in zip(out, self._dense_stats(low_res[redo], geometry)):
                o[redo] = t
        return tuple(out)

    def _chunk(self, geometry: ops.TiledUpsampler) -> int:
        """Masks per dense upsampling call, bounded by `max_upsample_pixels` for both the
        intermediate square (model input) and the output."""
        h, w = geometry.out_size
        first = geometry.rows * geometry.cols * geometry.factor**2
        return max(1, self.max_upsample_pixels // max(h * w, first))

    def _dense_stats(self, low_res: torch.Tensor, geometry: ops.TiledUpsampler):
        thr, off = self.model.mask_threshold, self.stability_score_offset
        chunk = self._chunk(geometry)
        outs = []
        for c in range(0, low_res.shape[0], chunk):
            logits = ops.upsample_logits(
                low_res[c : c + chunk], geometry.model_size, geometry.input_size, geometry.out_size
            )
            masks = logits > thr
            outs.append(
                (ops.stability_score(logits, thr, off), ops.count_true(masks), ops.masks_to_boxes(masks))
            )
        return tuple(torch.cat(t) for t in zip(*outs))

    def _finish_image(self, data: _Masks, image_size: tuple[int, int], n_crops: int) -> dict[str, Any]:
        """NMS across crops, then full-resolution masks and run lengths for the survivors."""
        dev = self.model.device
        empty = {"runs": [], "boxes": np.zeros((0, 4), np.int64), "iou": np.zeros(0, np.float32),
                 "stability": np.zeros(0, np.float32), "points": np.zeros((0, 2)),
                 "crops": np.zeros((0, 4), np.int64)}
        if not data.low_res:
            return empty
        boxes = torch.cat(data.boxes)
        iou = torch.cat(data.iou)
        stab = torch.cat(data.stability)
        crop_ids = torch.cat(data.crop_ids)
        low_res = torch.cat(data.low_res)
        points = np.concatenate(data.points)
        crop_xyxy = torch.tensor([c[0] for c in data.crops], dtype=torch.int64, device=dev)
        if n_crops > 1:  # as the reference: whenever the image had several crop windows
            cb = crop_xyxy[crop_ids]
            area = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
            with self._timed("nms"):
                keep = batched_nms(
                    boxes.float(), 1.0 / area.float(), torch.zeros_like(boxes[:, 0]),
                    self.crop_nms_thresh,
                )
            boxes, iou, stab, crop_ids, low_res = boxes[keep], iou[keep], stab[keep], crop_ids[keep], low_res[keep]
            points = points[keep.cpu().numpy()]
        # Full-resolution masks only now, crop by crop, in bounded chunks.
        n = len(iou)
        runs: list[np.ndarray | None] = [None] * n
        final_boxes = torch.zeros(n, 4, dtype=torch.int64, device=dev)
        size = self.model.image_encoder.img_size
        thr = self.model.mask_threshold
        with self._timed("encode"):
            for cid in crop_ids.unique().tolist():
                (x0, y0, x1, y1), input_size = data.crops[cid]
                sel = (crop_ids == cid).nonzero()[:, 0]
                f = size // low_res.shape[-2]
                first = (-(-input_size[0] // f) + 1) * (-(-input_size[1] // f) + 1) * f * f
                chunk = max(1, self.max_upsample_pixels // max((y1 - y0) * (x1 - x0), first))
                for c in range(0, len(sel), chunk):
                    s = sel[c : c + chunk]
                    logits = ops.upsample_logits(low_res[s], size, input_size, (y1 - y0, x1 - x0))
                    # the recorded score is computed on the exact logits, as the reference does
                    stab[s] = ops.stability_score(logits, thr, self.stability_score_offset)
                    masks = logits > thr
                    del logits
                    final_boxes[s] = ops.masks_to_boxes(masks) + torch.tensor([x0, y0, x0, y0], device=dev)
                    for j, r in zip(s.tolist(), ops.masks_to_runs_fast(masks, (x0, y0), image_size)):
                        runs[j] = r
        crops = crop_xyxy[crop_ids].cpu().numpy()
        out = {
            "runs": runs,
            "boxes": final_boxes.cpu().numpy(),
            "iou": iou.cpu().numpy(),
            "stability": stab.cpu().numpy(),
            "points": points,
            "crops": crops,
        }
        if self.min_mask_region_area > 0:
            with self._timed("cleanup"):
                out = self._clean_small_regions(out, image_size)
        return out

    def _clean_small_regions(self, data: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
        """Fill small holes, drop small islands, then NMS preferring untouched masks."""
        if not data["runs"]:
            return data
        # one full-resolution mask at a time: a changed one is encoded at once
        scores, box_list, changed = [], [], {}
        for j, counts in enumerate(data["runs"]):
            m = ops.runs_to_mask(counts, size)
            m, changed_h = ops.remove_small_regions(m, self.min_mask_region_area, "holes")
            m, changed_i = ops.remove_small_regions(m, self.min_mask_region_area, "islands")
            scores.append(0.0 if (changed_h or changed_i) else 1.0)
            box_list.append(ops.masks_to_boxes(torch.as_tensor(m)[None])[0])
            if changed_h or changed_i:
                changed[j] = ops.mask_to_runs_np(m)
        boxes = torch.stack(box_list)
        keep = batched_nms(
            boxes.float(), torch.as_tensor(scores), torch.zeros(len(scores)),
            max(self.box_nms_thresh, self.crop_nms_thresh),
        ).numpy()
        for j in keep:
            if j in changed:
                data["runs"][j] = changed[j]
                data["boxes"][j] = boxes[j].numpy()
        return {
            "runs": [data["runs"][j] for j in keep],
            "boxes": data["boxes"][keep],
            "iou": data["iou"][keep],
            "stability": data["stability"][keep],
            "points": data["points"][keep],
            "crops": data["crops"][keep],
            "float_boxes": data.get("float_boxes", False),
            "float_crops": data.get("float_crops", False),
        }

    def _records(self, data: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
        from .rle import counts_to_string

        h, w = size
        boxes = data["boxes"].astype(np.float32 if data.get("float_boxes") else np.int64)
        crops = data["crops"].astype(np.float32 if data.get("float_crops") else np.int64)
        records = []
        for j, counts in enumerate(data["runs"]):
            if self.output_mode == "coco_rle":
                seg: Any = {"size": [h, w], "counts": counts_to_string(counts)}
            elif self.output_mode == "uncompressed_rle":
                seg = {"size": [h, w], "counts": counts.tolist()}
            else:
                seg = ops.runs_to_mask(counts, size)
            b, c = boxes[j], crops[j]
            records.append(
                {
                    "segmentation": seg,
                    "area": ops.runs_area(counts),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "predicted_iou": data["iou"][j].item(),
                    "point_coords": [data["points"][j].tolist()],
                    "stability_score": data["stability"][j].item(),
                    "crop_box": [c[0], c[1], c[2] - c[0], c[3] - c[1]],
                }
            )
            records[-1]["bbox"] = [x.item() for x in records[-1]["bbox"]]
            records[-1]["crop_box"] = [x.item() for x in records[-1]["crop_box"]]
        return records
