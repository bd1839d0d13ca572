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
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from . import amg_ops as ops
from .model import Sam
from .predictor import SamPredictor, as_rgb_uint8

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
}

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass
class _Masks:
    """Kept masks of one image, in the image frame (run lengths instead of pixels)."""

    runs: list[np.ndarray] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)  # XYXY inclusive, int64
    iou: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)


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
        max_upsample_pixels: int | None = None,
    ) -> None:
        """Arguments as in the reference generator. Extra keyword-only options:

        batch_size: point prompts per decoder pass (default: sized to the device).
            `points_per_batch` is kept for compatibility; results do not depend on it.
        precision: "fp32", "bf16" or "fp16" for encoder and decoder (autocast).
        max_upsample_pixels: bound on full-resolution logits held at once (memory).
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError("points_per_batch must be at least 1")
        if crop_n_layers < 0 or crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        if points_per_side is not None:
            self.point_grids = ops.layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError("point_grids needs one grid per crop layer (crop_n_layers + 1)")
        self.predictor = SamPredictor(model, precision=precision)
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
        self.batch_size = batch_size or (1024 if dev.type == "cuda" else 256)
        self.max_upsample_pixels = max_upsample_pixels or (
            1 << 30 if dev.type == "cuda" else 1 << 26
        )
        self.timings: dict[str, float] = defaultdict(float)

    @classmethod
    def from_preset(cls, model: Sam, preset: str = "default", **overrides) -> SamAutomaticMaskGenerator:
        """A generator with the settings of a named preset (`default`, `sa1b`)."""
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
        sync = self.model.device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize()
        self.timings[stage] += time.perf_counter() - t

    def _generate_masks(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        jobs = []  # (image index, crop box, layer)
        for i, image in enumerate(images):
            boxes, layers = ops.crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            jobs += [(i, b, layer) for b, layer in zip(boxes, layers)]
        per_image = [_Masks() for _ in images]
        float_boxes = [False] * len(images)
        float_crops = [False] * len(images)
        # Encode crops in groups of equal layer (similar sizes), a few at a time.
        group = 4 if self.model.device.type == "cpu" else 16
        for start in range(0, len(jobs), group):
            chunk = jobs[start : start + group]
            crops = []
            for i, box, _ in chunk:
                x0, y0, x1, y1 = box
                crops.append(images[i][y0:y1, x0:x1])
            with self._timed("encoder"):
                self.predictor.set_images(crops)
            for k, (i, box, layer) in enumerate(chunk):
                self.predictor.select(k)
                crop_size = crops[k].shape[:2]
                res, empty_batch = self._process_crop(crop_size, box, layer, images[i].shape[:2])
                float_boxes[i] |= empty_batch
                if not res.runs:
                    float_crops[i] = True  # the reference's empty crop makes crop boxes float
                self._append(per_image[i], res)
            self.predictor.reset_image()
        out = []
        for i, image in enumerate(images):
            data = self._merge_crops(per_image[i], image.shape[:2])
            data["float_boxes"] = float_boxes[i]
            data["float_crops"] = float_crops[i]
            out.append(data)
        return out

    @staticmethod
    def _append(dst: _Masks, src: _Masks) -> None:
        dst.runs += src.runs
        dst.boxes += src.boxes
        dst.iou += src.iou
        dst.stability += src.stability
        dst.points += src.points
        dst.crops += src.crops

    def _process_crop(
        self, crop_size: tuple[int, int], crop_box: list[int], layer: int, image_size: tuple[int, int]
    ) -> tuple[_Masks, bool]:
        dev = self.model.device
        grid = self.point_grids[layer]
        points = grid * np.array(crop_size)[None, ::-1]  # crop pixels, float64
        transformed = self.predictor.transform.apply_coords(points, crop_size)
        in_points = torch.as_tensor(transformed, dtype=torch.float, device=dev)
        boxes, iou, stab, runs, src_idx = [], [], [], [], []
        empty_batch = False
        # The reference decides box dtypes per batch of `points_per_batch` points.
        survivors_per_point = torch.zeros(len(points), dtype=torch.bool, device=dev)
        for s in range(0, len(points), self.batch_size):
            sl = slice(s, s + self.batch_size)
            b = self._process_batch(in_points[sl], crop_size, crop_box, image_size, survivors_per_point[sl])
            if b is None:
                continue
            boxes.append(b[0])
            iou.append(b[1])
            stab.append(b[2])
            runs += b[3]
            src_idx.append(b[4] + s)
        n_ref = self.points_per_batch
        alive = survivors_per_point.cpu().numpy()
        for s in range(0, len(points), n_ref):
            if not alive[s : s + n_ref].any():
                empty_batch = True
        res = _Masks()
        if not runs:
            return res, empty_batch
        boxes_t = torch.cat(boxes)
        iou_t = torch.cat(iou)
        stab_t = torch.cat(stab)
        idx = torch.cat(src_idx).cpu().numpy()
        with self._timed("nms"):
            keep = batched_nms(
                boxes_t.float(), iou_t, torch.zeros_like(boxes_t[:, 0]), self.box_nms_thresh
            )
        keep_np = keep.cpu().numpy()
        x0, y0 = crop_box[0], crop_box[1]
        offset = torch.tensor([x0, y0, x0, y0], device=dev)
        res.boxes = [boxes_t[keep] + offset]
        res.iou = [iou_t[keep]]
        res.stability = [stab_t[keep]]
        res.runs = [runs[j] for j in keep_np]
        res.points = [points[idx[keep_np]] + np.array([x0, y0], dtype=np.float64)]
        res.crops = [np.tile(np.array(crop_box, dtype=np.int64), (len(keep_np), 1))]
        return res, empty_batch

    def _process_batch(
        self,
        in_points: torch.Tensor,
        crop_size: tuple[int, int],
        crop_box: list[int],
        image_size: tuple[int, int],
        survivors: torch.Tensor,
    ):
        p = self.predictor
        n = in_points.shape[0]
        labels = torch.ones(n, 1, dtype=torch.int, device=in_points.device)
        with self._timed("decoder"):
            low_res, iou = p.decode_low_res(in_points[:, None, :], labels, multimask_output=True)
        k = low_res.shape[1]
        low_res = low_res.flatten(0, 1)
        iou = iou.flatten(0, 1)
        point_idx = torch.arange(n, device=in_points.device).repeat_interleave(k)
        with self._timed("filter"):
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                low_res, iou, point_idx = low_res[keep], iou[keep], point_idx[keep]
            if low_res.shape[0] == 0:
                return None
            h, w = crop_size
            chunk = max(1, self.max_upsample_pixels // (h * w))
            kept_boxes, kept_iou, kept_stab, kept_idx, kept_runs = [], [], [], [], []
            thr = self.model.mask_threshold
            for c in range(0, low_res.shape[0], chunk):
                logits = ops.upsample_logits(
                    low_res[c : c + chunk], self.model.image_encoder.img_size, p.input_size, crop_size
                )
                stab = ops.stability_score(logits, thr, self.stability_score_offset)
                ci, cidx = iou[c : c + chunk], point_idx[c : c + chunk]
                if self.stability_score_thresh > 0.0:
                    keep = stab >= self.stability_score_thresh
                    logits, stab, ci, cidx = logits[keep], stab[keep], ci[keep], cidx[keep]
                survivors[cidx] = True
                masks = logits > thr
                del logits
                boxes = ops.masks_to_boxes(masks)
                keep = ~ops.near_crop_edge(boxes, crop_box, [0, 0, image_size[1], image_size[0]])
                masks, boxes, stab, ci, cidx = masks[keep], boxes[keep], stab[keep], ci[keep], cidx[keep]
                if masks.shape[0] == 0:
                    continue
                with self._timed("encode"):
                    kept_runs += ops.masks_to_runs(masks, (crop_box[0], crop_box[1]), image_size)
                kept_boxes.append(boxes)
                kept_iou.append(ci)
                kept_stab.append(stab)
                kept_idx.append(cidx)
        if not kept_runs:
            return None
        return (
            torch.cat(kept_boxes),
            torch.cat(kept_iou),
            torch.cat(kept_stab),
            kept_runs,
            torch.cat(kept_idx),
        )

    def _merge_crops(self, data: _Masks, image_size: tuple[int, int]) -> dict[str, Any]:
        dev = self.model.device
        if not data.runs:
            return {"runs": [], "boxes": np.zeros((0, 4), np.int64), "iou": np.zeros(0, np.float32),
                    "stability": np.zeros(0, np.float32), "points": np.zeros((0, 2)),
                    "crops": np.zeros((0, 4), np.int64)}
        boxes = torch.cat(data.boxes)
        iou = torch.cat(data.iou)
        stab = torch.cat(data.stability)
        points = np.concatenate(data.points)
        crops = np.concatenate(data.crops)
        runs = data.runs
        if len({tuple(c) for c in crops.tolist()}) > 1 or self.crop_n_layers > 0:
            crop_t = torch.as_tensor(crops, device=dev)
            area = (crop_t[:, 2] - crop_t[:, 0]) * (crop_t[:, 3] - crop_t[:, 1])
            with self._timed("nms"):
                keep = batched_nms(
                    boxes.float(), 1.0 / area.float(), torch.zeros_like(boxes[:, 0]),
                    self.crop_nms_thresh,
                )
            k = keep.cpu().numpy()
            boxes, iou, stab = boxes[keep], iou[keep], stab[keep]
            points, crops, runs = points[k], crops[k], [runs[j] for j in k]
        out = {
            "runs": runs,
            "boxes": boxes.cpu().numpy(),
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
        masks, scores = [], []
        for counts in data["runs"]:
            m = ops.runs_to_mask(counts, size)
            m, changed_h = ops.remove_small_regions(m, self.min_mask_region_area, "holes")
            m, changed_i = ops.remove_small_regions(m, self.min_mask_region_area, "islands")
            masks.append(m)
            scores.append(0.0 if (changed_h or changed_i) else 1.0)
        masks_t = torch.as_tensor(np.stack(masks))
        boxes = ops.masks_to_boxes(masks_t)
        keep = batched_nms(
            boxes.float(), torch.as_tensor(scores), torch.zeros(len(masks)),
            max(self.box_nms_thresh, self.crop_nms_thresh),
        ).numpy()
        for j in keep:
            if scores[j] == 0.0:
                data["runs"][j] = ops.mask_to_runs_np(masks[j])
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
