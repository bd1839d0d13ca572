"""Train a SAM-family model on synthetic scenes (``sam.scenes``).

    python -m sam.train --out sam/weights/sam_tiny.pth --steps 20000 --seed 0 \
        --batch 2 --prompts 16 --lr 8e-4 --warmup 100 --max-minutes 58

Recipe (after the SAM paper, scaled down):

* every step draws ``--batch`` scenes; their seeds are a pure function of ``--seed``
  and the step (``scene_seed(seed, step, i)``), always >= ``TRAIN_SEED_BASE``, so seeds
  below it are never seen in training and serve as held-out data;
* per scene, ``--prompts`` instances (objects, parts, background regions) each get one
  prompt: a uniform interior point, or a jittered box (objects and parts only);
* the mask loss (``--loss``: ``bce`` = BCE + dice, the default, which converges much
  faster in a short CPU run; ``focal`` = SAM's 20 * focal + dice) is taken on the
  logits upsampled bilinearly against binary ground truth on a finer grid, as SAM does
  at full resolution (``--target-scale 2``, the default: twice the logit grid; ``4``: the
  model-input resolution; ``1`` compares the low-resolution logits with soft targets
  averaged down to their grid, which is cheaper but leaves the logits flat near edges, so
  stability scores stay low): the best of the three multimask outputs for a point, the
  single output plus the best of three for a box;
* the IoU head regresses (MSE) the actual IoU of every predicted mask at that resolution;
* a fraction of point prompts get a second round: a correction point sampled from the
  error region plus the previous logits as ``mask_input``, trained on the single output.

The checkpoint is a plain fp32 state dict with the official key names; a JSON with
the configuration, seed, steps, timing and data-generator parameters sits next to it.
Training state is saved to ``<out>.state`` every ``--save-every`` steps and picked up
again with ``--resume``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pickle
import platform
import shlex
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import config
from .config import model_config, validate_config
from .scenes import make_scene

log = logging.getLogger("sam.train")

TRAIN_SEED_BASE = 10_000_000
PIXEL_MEAN = np.array(config.PIXEL_MEAN, np.float32)
PIXEL_STD = np.array(config.PIXEL_STD, np.float32)

DEFAULT_DATA = {
    "min_objects": 2,
    "max_objects": 14,
    "parts_prob": 0.4,
    "max_background_regions": 4,
    "min_size": 0.035,
    "max_size": 0.3,
    # scene sizes: the long side is the model size with probability p_native, otherwise
    # uniform in [long_min, long_max] (then resized like the predictor does)
    "p_native": 0.4,
    "long_min": 320,
    "long_max": 1024,
    "min_aspect": 0.5,
    "p_jpeg": 0.5,
    # prompts pick instances with these relative weights: background regions weigh
    # ``bg_weight``; thin bars and objects under ``small_area`` of the image (the classes
    # the tiny model finds hardest) weigh ``hard_weight``; everything else 1
    "bg_weight": 0.4,
    "hard_weight": 1.0,
    "small_area": 0.01,
    # 0: every instance gets one prompt before any gets two (up to --prompts) and the
    # weights pick only the rest, so on crowded scenes they matter little (stages up to
    # 9); 1: every prompt picks its instance by weight (with replacement)
    "weighted_prompts": 0,
    # share of point prompts at the instance's most interior pixels (a random one within
    # 1 px of the largest distance from its boundary: the centre, a bar's centre line), as
    # bench.quality and people click; the rest are uniform over the instance
    "p_centre_point": 0.0,
    # a point prompt at pixel (px, py) is passed as (px + point_offset) * scale: the
    # predictor passes px * scale (its prompt encoder adds the half pixel itself), so 0.0
    # matches inference; stages up to 9 used 0.5
    "point_offset": 0.5,
    # share of object and part prompts that are boxes (the rest are points)
    "p_box": 0.4,
    # share of box prompts given as the tight box, as bench.quality and SA-1B's boxes
    # are; the rest are jittered like SAM's training boxes (normal, 10% of the side,
    # at most 20 px). Stages up to 10 used 0.0
    "p_tight_box": 0.0,
}


def scene_seed(seed: int, step: int, index: int, batch: int) -> int:
    """Seed of the ``index``-th scene of ``step`` (never below ``TRAIN_SEED_BASE``)."""
    return TRAIN_SEED_BASE + seed * 1_000_000_000 + step * batch + index


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so the long side is ``long_side`` (bilinear, as the predictor does)."""
    nh, nw = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (nh, nw) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


# --------------------------------------------------------------------------- data


def instance_weights(scene, data: dict) -> np.ndarray:
    """Relative chance of each instance of ``scene`` to get a prompt (see DEFAULT_DATA)."""
    kinds = np.array(scene.kinds)
    small = scene.areas() < data["small_area"] * scene.height * scene.width
    hard = (kinds != "background") & ((np.array(scene.shapes) == "bar") | small)
    return np.where(kinds == "background", float(data["bg_weight"]), 1.0) * np.where(
        hard, float(data["hard_weight"]), 1.0
    )


def most_interior_pixels(mask: np.ndarray, tol: float = 1.0) -> np.ndarray:
    """Flat indices of the pixels of ``mask`` within ``tol`` px of the largest distance
    from its boundary (the image border counts as boundary): the centre of a round shape,
    the centre line of a bar (its pixels differ by rounding)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    return np.flatnonzero(dist >= dist.max() - tol)


def make_sample(
    scene_seed_: int, image_size: int, n_prompts: int, data: dict, target_scale: int = 2
) -> dict:
    """One training image with prompts and targets (numpy only).

    ``target_scale`` 1: soft targets on the low-resolution logit grid (the ground truth
    averaged down, ``image_size // 4`` square, float); 2 or 4: binary targets on a grid
    that many times finer (4: the model frame itself, like SAM's full-resolution loss),
    bool."""
    if target_scale not in (1, 2, 4):
        raise ValueError(f"target_scale must be 1, 2 or 4, not {target_scale!r}")
    rng = np.random.default_rng(np.random.SeedSequence([scene_seed_, 0x7A1]))
    if rng.random() < data["p_native"]:
        long = image_size
    else:
        long = int(rng.integers(data["long_min"], data["long_max"] + 1))
    short = max(64, int(round(long * rng.uniform(data["min_aspect"], 1.0))))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    scene = make_scene(
        scene_seed_,
        h,
        w,
        max_objects=data["max_objects"],
        min_objects=data["min_objects"],
        parts_prob=data["parts_prob"],
        max_background_regions=data["max_background_regions"],
        min_size=data["min_size"],
        max_size=data["max_size"],
    )
    img = scene.image
    if rng.random() < data["p_jpeg"]:
        q = int(rng.integers(70, 96))
        ok, enc = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]
    img = resize_image(np.ascontiguousarray(img), image_size)
    nh, nw = img.shape[:2]
    scale = nh / h if h >= w else nw / w
    scale_x, scale_y = nw / w, nh / h

    x = np.zeros((image_size, image_size, 3), np.uint8)  # normalised in normalise()
    x[:nh, :nw] = img

    kinds = np.array(scene.kinds)
    weight = instance_weights(scene, data)
    p = weight / weight.sum()
    if data["weighted_prompts"]:
        chosen = rng.choice(len(kinds), size=n_prompts, replace=True, p=p)
    else:
        chosen = rng.choice(len(kinds), size=min(n_prompts, len(kinds)), replace=False, p=p)
    if not data["weighted_prompts"] and n_prompts > len(kinds):
        # more prompts than instances: repeats get other prompts
        extra = rng.choice(len(kinds), size=n_prompts - len(kinds), replace=True, p=p)
        chosen = np.concatenate([chosen, extra])
    n = len(chosen)
    # targets are made once per instance, then repeated for its prompts
    uniq, inverse = np.unique(chosen, return_inverse=True)
    u = len(uniq)

    # targets: area-resize to the model frame, pad, then average down to the target grid
    stack = np.ascontiguousarray(scene.masks[uniq].transpose(1, 2, 0)).astype(np.float32)
    if (nh, nw) == (h, w):
        small = stack
    else:  # OpenCV's area resize takes at most 4 channels at a time
        small = np.concatenate(
            [
                cv2.resize(stack[..., c : c + 4], (nw, nh), interpolation=cv2.INTER_AREA).reshape(
                    nh, nw, -1
                )
                for c in range(0, u, 4)
            ],
            axis=2,
        )
    res = image_size // 4 * target_scale
    f = image_size // res
    full = np.zeros((image_size, image_size, u), np.float32)
    full[:nh, :nw] = small
    grid = full.reshape(res, f, res, f, u).mean((1, 3)) if f > 1 else full
    # soft on the logit grid; binary (the majority of each cell) on finer grids
    target = (grid if target_scale == 1 else grid > 0.5).transpose(2, 0, 1)[inverse]

    is_box = np.zeros(n, bool)
    coords = np.zeros((n, 2), np.float32)
    boxes = np.zeros((n, 4), np.float32)
    for j, inst in enumerate(chosen):
        m = scene.masks[inst]
        if kinds[inst] != "background" and rng.random() < data["p_box"]:
            is_box[j] = True
            ys = np.flatnonzero(m.any(1))
            xs = np.flatnonzero(m.any(0))
            b = np.array(
                [xs[0] * scale_x, ys[0] * scale_y, (xs[-1] + 1) * scale_x, (ys[-1] + 1) * scale_y]
            )
            # the extra draw only when asked, so older recipes see the same random stream
            tight = data["p_tight_box"] > 0 and rng.random() < data["p_tight_box"]
            if not tight:
                side = np.array([b[2] - b[0], b[3] - b[1]] * 2)
                b = b + np.clip(rng.normal(0, 0.1, 4) * side, -20, 20)
            boxes[j] = np.clip(b, 0, [nw, nh, nw, nh])
        else:
            if data["p_centre_point"] > 0 and rng.random() < data["p_centre_point"]:
                flat = most_interior_pixels(m)
            else:
                flat = np.flatnonzero(m)
            pix = flat[int(rng.integers(len(flat)))]
            py, px = divmod(int(pix), m.shape[1])
            off = float(data["point_offset"])
            coords[j] = [(px + off) * scale_x, (py + off) * scale_y]
    del scale
    return {
        "image": torch.from_numpy(x.transpose(2, 0, 1).copy()),  # uint8, zero-padded
        "target": torch.from_numpy(target.copy()),
        "is_box": torch.from_numpy(is_box),
        "coords": torch.from_numpy(coords),
        "boxes": torch.from_numpy(boxes),
        "valid": (nh, nw),
        "seed": int(scene_seed_),
    }


def _worker_init(_):
    """Loader processes are spawned (a forked child can inherit OpenCV's or OpenMP's
    thread pool mid-operation and hang); each generates scenes on one thread."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class SceneStream(torch.utils.data.IterableDataset):
    """Batches for steps ``start..steps-1``; deterministic in (seed, step)."""

    def __init__(self, seed, start, steps, batch, image_size, n_prompts, data, target_scale=2):
        super().__init__()
        self.args = (seed, start, steps, batch, image_size, n_prompts, data, target_scale)

    def __iter__(self):
        seed, start, steps, batch, image_size, n_prompts, data, target_scale = self.args
        # with several loader workers, worker k makes steps k, k + n, ...; the loader
        # hands out their batches round-robin, so the order stays by step
        info = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(start + first, steps, stride):
            yield [
                make_sample(
                    scene_seed(seed, step, i, batch), image_size, n_prompts, data, target_scale
                )
                for i in range(batch)
            ]


# --------------------------------------------------------------------------- losses


def focal_loss(logits, target, alpha=0.25, gamma=2.0):
    """Per-mask sigmoid focal loss (mean over pixels), soft targets allowed."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * ce * (1 - p_t) ** gamma).flatten(-2).mean(-1)


def dice_loss(logits, target):
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(logits, target):
    """IoU of ``logits > 0`` with ``target > 0.5`` per mask."""
    pred = (logits > 0).flatten(-2)
    gt = (target > 0.5).flatten(-2)
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def bce_loss(logits, target):
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)


def seg_loss(logits, target, kind="bce"):
    """Per-mask segmentation loss: ``"focal"`` is SAM's 20 * focal + dice, ``"bce"`` is
    BCE + dice (stronger gradients early on, converges faster in short runs)."""
    if kind == "focal":
        return 20.0 * focal_loss(logits, target) + dice_loss(logits, target)
    if kind == "bce":
        return bce_loss(logits, target) + dice_loss(logits, target)
    raise ValueError(f"unknown loss {kind!r}")


# --------------------------------------------------------------------------- model


def build_model(cfg: dict):
    """Our randomly initialised ``Sam`` for ``cfg``."""
    from .model import build_sam_from_config

    return build_sam_from_config(validate_config(dict(cfg)))


def _fp32(device_type: str = "cpu"):
    """Positional encodings need fp32: in bf16 the Fourier phases are off by ~0.1 rad."""
    return torch.autocast(device_type, enabled=False)


def decode_all(model, emb, sparse, dense):
    """All four mask outputs and IoU predictions: ``(K, 4, h, w)``, ``(K, 4)``."""
    dec = model.mask_decoder
    with _fp32(emb.device.type):
        pe = model.prompt_encoder.get_dense_pe()
    if hasattr(dec, "predict_masks"):
        return dec.predict_masks(emb, pe, sparse, dense)
    m3, i3 = dec(emb, pe, sparse, dense, multimask_output=True)
    m1, i1 = dec(emb, pe, sparse, dense, multimask_output=False)
    return torch.cat([m1, m3], 1), torch.cat([i1, i3], 1)


def to_target_grid(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Low-resolution logits bilinearly upsampled to the target's grid, as the predictor
    upsamples them (unchanged when the grids agree)."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=False)


def correction_points(prev, gt, fallback, generator):
    """One corrective click per mask, vectorised: a uniform pixel of the larger error
    region (false negatives -> positive click, false positives -> negative click), of the
    target when the mask is already exact, or ``fallback`` when the target is too thin
    for the low-resolution grid. ``prev``: logits ``(K, h, w)``; ``gt``: bool ``(K, h, w)``.
    Returns points ``(K, 2)`` in the model frame (4 px per low-res cell) and labels."""
    pr = prev > 0
    fn, fp = gt & ~pr, pr & ~gt
    use_fn = fn.sum((1, 2)) >= fp.sum((1, 2))
    err = torch.where(use_fn[:, None, None], fn, fp)
    lab = use_fn.long()
    exact = err.sum((1, 2)) == 0
    err = torch.where(exact[:, None, None], gt, err)
    lab = torch.where(exact, torch.ones_like(lab), lab)
    score = torch.rand(err.shape, generator=generator, device=err.device) + 1e-6
    flat = (score * err).flatten(1).argmax(1)
    w = err.shape[-1]
    pts = torch.stack([flat % w, flat // w], 1).float() * 4 + 2
    empty = err.sum((1, 2)) == 0
    pts = torch.where(empty[:, None], fallback, pts)
    lab = torch.where(empty, torch.ones_like(lab), lab)
    return pts, lab


def normalise(batch: list[dict], device) -> torch.Tensor:
    """The batch's uint8 images as the model's input: normalised, padding at zero."""
    images = torch.stack([s["image"] for s in batch]).to(device, non_blocking=True).float()
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    x = (images - mean) / std
    size = x.shape[-1]
    valid = torch.zeros(len(batch), 1, size, size, device=device)
    for i, s in enumerate(batch):
        valid[i, :, : s["valid"][0], : s["valid"][1]] = 1
    return x * valid


def compute_loss(
    model, batch: list[dict], refine_frac: float, rng: np.random.Generator, loss: str = "bce"
):
    """Mean loss over every prompt of the batch and some statistics.

    All prompts of all scenes go through the decoder in one call (each with its scene's
    embedding); the refinement round is a second call."""
    device = next(model.parameters()).device
    dt = device.type

    def cat(key):
        return torch.cat([s[key] for s in batch]).to(device, non_blocking=True)

    images = normalise(batch, device)
    emb_all = model.image_encoder(images)
    counts = torch.tensor([len(s["target"]) for s in batch])
    scene = torch.repeat_interleave(torch.arange(len(batch)), counts)
    is_box_cpu = torch.cat([s["is_box"] for s in batch])
    pt = torch.nonzero(~is_box_cpu).flatten()
    bx = torch.nonzero(is_box_cpu).flatten()
    order = torch.cat([pt, bx])
    target, coords, boxes = cat("target"), cat("coords"), cat("boxes")
    tgt = target[order.to(device)][:, None].float()
    emb = emb_all[scene[order].to(device)]

    sparse_parts, dense = [], None
    with _fp32(dt):
        if len(pt):
            p_coords = coords[pt.to(device)][:, None]
            lbl = torch.ones(len(pt), 1, dtype=torch.int64, device=device)
            sp, dense = model.prompt_encoder(points=(p_coords, lbl), boxes=None, masks=None)
            sparse_parts.append(sp)
        if len(bx):
            sp, dense = model.prompt_encoder(points=None, boxes=boxes[bx.to(device)], masks=None)
            sparse_parts.append(sp)
    sparse = torch.cat(sparse_parts)
    masks, iou_pred = decode_all(model, emb, sparse, dense[:1])
    masks = masks.float()
    scale = tgt.shape[-1] // masks.shape[-1]  # > 1: binary targets on a finer grid
    box_flag = torch.zeros(len(order), device=device)
    box_flag[len(pt) :] = 1.0
    soft = F.avg_pool2d(tgt, scale) if scale > 1 else tgt  # the targets on the logit grid
    if scale == 1:
        per = seg_loss(masks, tgt.expand_as(masks), loss)  # K x 4
        best = per[:, 1:].argmin(1) + 1
        chosen, single = per.gather(1, best[:, None])[:, 0], per[:, 0]
    else:
        # the best of three is picked by the loss against the targets averaged down to
        # the logit grid (cheap); only the chosen output (and a box's single output) is
        # upsampled for the loss, which dominates the step's cost at full resolution
        with torch.no_grad():
            best = seg_loss(masks[:, 1:], soft.expand_as(masks[:, 1:]), loss).argmin(1) + 1
        rows = torch.arange(len(order), device=device)
        chosen = seg_loss(to_target_grid(masks[rows, best][:, None], tgt), tgt, loss)[:, 0]
        single = torch.zeros_like(chosen)
        if len(bx):
            b0 = len(pt)
            single[b0:] = seg_loss(to_target_grid(masks[b0:, :1], tgt[b0:]), tgt[b0:], loss)[:, 0]
    seg_terms = [chosen + box_flag * single]
    with torch.no_grad():
        up = to_target_grid(masks, tgt)
        actual = mask_iou(up, tgt.expand_as(up))
        del up
    iou_terms = [((iou_pred.float() - actual) ** 2).mean(1)]
    best_iou = actual.gather(1, best[:, None])[:, 0]

    k = int(round(refine_frac * len(pt)))
    if k > 0:
        ridx = torch.as_tensor(np.sort(rng.permutation(len(pt))[:k]), device=device)
        prev = masks[ridx, best[ridx]].detach()
        gen = torch.Generator(device=device)
        gen.manual_seed(int(rng.integers(2**62)))
        new_pts, new_lbl = correction_points(prev, soft[ridx, 0] > 0.5, p_coords[ridx, 0], gen)
        pts2 = torch.stack([p_coords[ridx, 0], new_pts], 1)
        lbl2 = torch.stack([torch.ones_like(new_lbl), new_lbl], 1)
        with _fp32(dt):
            sparse2, dense2 = model.prompt_encoder(
                points=(pts2, lbl2), boxes=None, masks=prev[:, None].float()
            )
            pe = model.prompt_encoder.get_dense_pe()
        m2, i2 = model.mask_decoder(emb[ridx], pe, sparse2, dense2, multimask_output=False)
        t2 = tgt[ridx]
        m2 = to_target_grid(m2.float(), t2)
        seg_terms.append(seg_loss(m2, t2, loss)[:, 0])
        act2 = mask_iou(m2.detach(), t2)
        iou_terms.append(((i2.float() - act2) ** 2)[:, 0])
    seg = torch.cat(seg_terms).mean()
    iou = torch.cat(iou_terms).mean()
    stats = torch.stack([seg.detach(), iou.detach(), best_iou.mean()]).tolist()
    return seg + iou, dict(zip(("seg", "iou_mse", "best_iou"), stats))


# --------------------------------------------------------------------------- main


def _lr(step, progress, lr, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2% over ``progress``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mean_state_dict(paths: list[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the state dicts in `paths` (one path: its weights as
    they are). All must hold the same keys and shapes."""
    first = torch.load(paths[0], map_location="cpu", weights_only=True)
    if len(paths) == 1:
        return first
    total = {k: v.double() for k, v in first.items()}
    for q in paths[1:]:
        sd = torch.load(q, map_location="cpu", weights_only=True)
        if set(sd) != set(total) or any(sd[k].shape != total[k].shape for k in total):
            raise ValueError(f"{q}: its keys or shapes differ from those of {paths[0]}")
        for k in total:
            total[k] += sd[k].double()
    return {k: (v / len(paths)).to(first[k].dtype) for k, v in total.items()}


def train(
    out: str,
    steps: int,
    seed: int = 0,
    config: str | dict = "tiny",
    batch: int = 2,
    prompts: int = 16,
    lr: float = 8e-4,
    weight_decay: float = 0.05,
    warmup: int = 100,
    refine_frac: float = 0.25,
    bf16: bool = True,
    threads: int | None = None,
    workers: int = 1,
    save_every: int = 250,
    resume: bool = False,
    data: dict | None = None,
    log_every: int = 25,
    progress: bool = True,
    max_minutes: float | None = None,
    command: str | None = None,
    loss: str = "bce",
    device: str | None = None,
    target_scale: int = 2,
    init: str | list[str] | None = None,
) -> dict:
    """Train and write ``out`` (state dict) plus ``out`` with ``.json`` (metadata)."""
    cfg = model_config(config) if isinstance(config, str) else validate_config(dict(config))
    data = check_data(data)
    check_run_args(
        out=out, steps=steps, seed=seed, batch=batch, prompts=prompts, lr=lr, warmup=warmup,
        refine_frac=refine_frac, workers=workers, save_every=save_every,
        log_every=log_every, max_minutes=max_minutes,
    )  # fmt: skip
    torch.manual_seed(seed)
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    model = build_model(cfg)
    init_info = None
    if init:
        paths = [init] if isinstance(init, str) else list(init)
        model.load_state_dict(mean_state_dict(paths))
        inputs = [{"path": os.path.basename(q), "sha256": sha256_file(q)} for q in paths]
        # several: weight averaging, the element-wise mean of several runs' weights
        init_info = inputs[0] if len(paths) == 1 else {"mean_of": inputs}
        log.info("initialised from %s", paths[0] if len(paths) == 1 else "the mean of " + ", ".join(paths))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(dev)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.999),
    )
    state_path = out + ".state"
    start, elapsed, history = 0, 0.0, []
    # (the trailing 0 keeps the stream of earlier versions, which keyed it by the start step)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FFEE, 0]))
    if resume and os.path.exists(state_path):
        st = torch.load(state_path, map_location=dev, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed, history = st["step"], st["elapsed"], st["history"]
        if "rng" in st:
            rng.bit_generator.state = json.loads(st["rng"])
        else:  # written by an earlier version: the refinement draws start afresh
            log.warning("%s holds no RNG state: refinement draws differ from an unbroken run", state_path)
        log.info("resumed at step %d (%.1f min trained)", start, elapsed / 60)
    elif resume:
        log.warning("no %s to resume from: starting at step 0", state_path)
    stream = SceneStream(
        seed, start, steps, batch, cfg["image_size"], prompts, data, target_scale
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        multiprocessing_context="spawn" if workers else None,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    it = iter(loader)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", mininterval=5)
    t0 = time.time()
    ema = None
    step = start

    def save_weights():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        torch.save(sd, out + ".tmp")
        os.replace(out + ".tmp", out)

    def save_state():
        save_weights()  # a usable checkpoint even if the run is killed
        tmp = state_path + ".tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step_done,
                "elapsed": elapsed + time.time() - t0,
                "history": history,
                "rng": json.dumps(rng.bit_generator.state),
            },
            tmp,
        )
        os.replace(tmp, state_path)

    stopped_early = False
    step_done = start
    for step in range(start, steps):
        samples = next(it)
        # schedule progress: by steps, or by wall time when a time budget is given
        progress = (step - warmup) / max(1, steps - warmup)
        if max_minutes is not None:
            run_time = elapsed + time.time() - t0
            progress = max(progress, run_time / (max_minutes * 60))
            if progress >= 1.0:
                stopped_early = True
                break
        for g in opt.param_groups:
            g["lr"] = _lr(step, progress, lr, warmup)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            total, stats = compute_loss(model, samples, refine_frac, rng, loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_done = step + 1
        stats["loss"] = stats["seg"] + stats["iou_mse"]
        ema = stats if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in stats.items()}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema['loss']:.3f}", iou=f"{ema['best_iou']:.3f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            now = elapsed + time.time() - t0
            history.append(
                {
                    "step": step + 1,
                    "minutes": round(now / 60, 2),
                    **{k: round(v, 4) for k, v in ema.items()},
                }
            )
            log.info(
                "step %d/%d %.1f min loss %.4f seg %.4f iou_mse %.4f best_iou %.3f lr %.2e",
                step + 1,
                steps,
                now / 60,
                ema["loss"],
                ema["seg"],
                ema["iou_mse"],
                ema["best_iou"],
                opt.param_groups[0]["lr"],
            )
        if save_every and (step + 1) % save_every == 0:
            save_state()
    if bar is not None:
        bar.close()
    steps_done = step_done
    if save_every and steps_done > start:
        save_state()  # a later --resume (more steps or minutes) goes on from here
    total = elapsed + time.time() - t0

    save_weights()
    meta = {
        "model": cfg.get("name", "custom"),
        "config": cfg,
        "format": "fp32 state dict, official SAM key names",
        "sha256": sha256_file(out),
        "bytes": os.path.getsize(out),
        "seed": seed,
        "steps": steps_done,
        "steps_planned": steps,
        "stopped_early": stopped_early,
        "batch": batch,
        "prompts_per_image": prompts,
        "optimizer": {
            "name": "AdamW",
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "schedule": "cosine to 2%",
            "grad_clip": 1.0,
        },
        "refine_frac": refine_frac,
        "loss": {
            "kind": loss,
            "target_scale": target_scale,
            "targets": "soft, on the low-resolution logit grid"
            if target_scale == 1
            else f"binary, {target_scale}x finer than the logits (upsampled bilinearly)",
            "terms": "focal: 20*focal + dice; bce: BCE + dice. On the best of 3 multimask "
            "logits (points), plus the single output (boxes, refinement round); with "
            "target_scale > 1 the best is picked against the targets averaged down to the "
            "logit grid; MSE of predicted vs actual IoU for every output",
        },
        "bf16_autocast": bf16,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "workers": workers,
        "init": init_info,
        "training_minutes": round(total / 60, 2),
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "data": {
            "generator": "sam.scenes.make_scene",
            "scene_seeds": f"{TRAIN_SEED_BASE} + seed * 1e9 + step * batch + index (held-out: seeds < {TRAIN_SEED_BASE})",
            **data,
        },
        "history": history[-40:],
        "command": command or f"python -m sam.train --out {out} --steps {steps} --seed {seed}",
    }
    meta_path = os.path.splitext(out)[0] + ".json"
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                old = json.load(f)
            if "eval" in old and old.get("sha256") == meta["sha256"]:
                meta["eval"] = old["eval"]
        except (OSError, ValueError):
            pass
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    log.info(
        "wrote %s (%d bytes, sha256 %s) after %d steps, %.1f min",
        out,
        meta["bytes"],
        meta["sha256"],
        steps_done,
        total / 60,
    )
    return meta


def check_data(data: dict | None) -> dict:
    """``DEFAULT_DATA`` updated with ``data``; unknown keys and impossible values raise
    ``ValueError`` naming the parameter."""
    unknown = sorted(set(data or {}) - set(DEFAULT_DATA))
    if unknown:
        raise ValueError(
            f"unknown data parameter(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_DATA)}"
        )
    d = {**DEFAULT_DATA, **(data or {})}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"data parameter {k} must be a number, not {v!r}")
    rules = [
        ("min_objects", 0 <= d["min_objects"] <= d["max_objects"], "0 <= min <= max_objects"),
        ("max_background_regions", d["max_background_regions"] >= 1, ">= 1"),
        ("min_size", 0 < d["min_size"] <= d["max_size"] < 1, "0 < min <= max_size < 1"),
        ("long_min", 64 <= d["long_min"] <= d["long_max"] <= 8192, "64 <= min <= long_max"),
        ("min_aspect", 0 < d["min_aspect"] <= 1, "in (0, 1]"),
        ("bg_weight", d["bg_weight"] > 0, "> 0"),
        ("hard_weight", d["hard_weight"] > 0, "> 0"),
        ("small_area", 0 <= d["small_area"] <= 1, "in [0, 1]"),
    ]
    rules.append(("weighted_prompts", d["weighted_prompts"] in (0, 1), "0 or 1"))
    keys = ("parts_prob", "p_native", "p_jpeg", "p_centre_point", "point_offset", "p_box")
    keys += ("p_tight_box",)
    rules += [(k, 0 <= d[k] <= 1, "in [0, 1]") for k in keys]
    for k, ok, rule in rules:
        if not ok:
            raise ValueError(f"data parameter {k} must be {rule}")
    return d


def check_run_args(**a) -> None:
    """Refuse impossible training arguments (``train``'s keywords; others are ignored)
    before any work, naming the argument."""
    rules = [
        ("steps", a["steps"] >= 0, ">= 0"),
        ("seed", a["seed"] >= 0, ">= 0"),
        ("batch", a["batch"] >= 1, ">= 1"),
        ("prompts", a["prompts"] >= 1, ">= 1"),
        ("lr", a["lr"] > 0, "> 0"),
        ("warmup", a["warmup"] >= 0, ">= 0"),
        ("refine_frac", 0 <= a["refine_frac"] <= 1, "in [0, 1]"),
        ("workers", a["workers"] >= 0, ">= 0"),
        ("save_every", a["save_every"] >= 0, ">= 0 (0: no intermediate saves)"),
        ("log_every", a["log_every"] >= 1, ">= 1"),
        ("max_minutes", a["max_minutes"] is None or a["max_minutes"] > 0, "> 0"),
    ]
    for k, ok, rule in rules:
        if not ok:
            raise ValueError(f"{k} must be {rule}, not {a[k]!r}")
    out = a["out"]
    if os.path.splitext(out)[0] + ".json" == out:
        raise ValueError(f"--out {out}: the metadata goes next to it as .json; use a .pth name")


def _data_arg(parser: argparse.ArgumentParser, text: str | None) -> dict | None:
    if not text:
        return None
    source = "--data"
    if text.lstrip()[:1] not in ("{", "["):
        source = text
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            parser.error(f"--data {source}: {e.strerror or e}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"{source}: not valid JSON ({e})")
    if not isinstance(data, dict):
        parser.error(f"{source}: expected a JSON object of data parameters")
    try:
        check_data(data)
    except ValueError as e:
        parser.error(f"{source}: {e}")
    return data


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sam.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint path (.pth); metadata goes to .json")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="tiny", help="model name in sam.config, or a JSON file")
    p.add_argument("--batch", type=int, default=2, help="scenes per step")
    p.add_argument("--prompts", type=int, default=16, help="prompts (instances) per scene")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--refine-frac", type=float, default=0.25, help="point prompts given a 2nd round"
    )
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (slower on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="data generation processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--init",
        nargs="+",
        default=None,
        metavar="PTH",
        help="start from these weights (a state dict); from the element-wise mean of several",
    )
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from <out>.state")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-time budget: the LR schedule follows max(step, time) progress and training "
        "stops (and writes) when the budget is spent; the steps done are recorded",
    )
    p.add_argument(
        "--data",
        default=None,
        help="JSON object (or a .json file holding one) overriding scene-generator and "
        "prompt-sampling parameters (sam.train.DEFAULT_DATA)",
    )
    p.add_argument("--loss", choices=["bce", "focal"], default="bce", help="see seg_loss")
    p.add_argument(
        "--target-scale",
        type=int,
        choices=[1, 2, 4],
        default=2,
        help="2 (default) or 4: binary targets on a grid 2x or 4x finer than the logits "
        "(4: the model-input resolution), logits upsampled as the predictor does, so they "
        "turn sharp at edges and stability scores behave as SAM's; 1: soft targets on the "
        "low-resolution logit grid (cheapest, but flat logits)",
    )
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = a.config
    try:
        if config.endswith(".json"):
            with open(config, encoding="utf-8") as f:
                config = validate_config(json.load(f))
        else:
            model_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--config {a.config}: {e.strerror if isinstance(e, OSError) else e}")
    kw = dict(
        seed=a.seed,
        config=config,
        batch=a.batch,
        prompts=a.prompts,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup=a.warmup,
        refine_frac=a.refine_frac,
        bf16=not a.no_bf16,
        threads=a.threads,
        workers=a.workers,
        save_every=a.save_every,
        resume=a.resume,
        data=_data_arg(p, a.data),
        log_every=a.log_every,
        loss=a.loss,
        progress=not a.no_progress,
        max_minutes=a.max_minutes,
        device=a.device,
        init=a.init,
        target_scale=a.target_scale,
        command="python -m sam.train " + shlex.join(sys.argv[1:] if argv is None else argv),
    )
    try:
        check_run_args(out=a.out, steps=a.steps, **kw)
    except ValueError as e:
        msg = str(e)
        p.error(msg if msg.startswith("--") else "--" + msg.replace("_", "-", 1))
    for q in a.init or []:
        if not os.path.isfile(q):
            p.error(f"--init {q}: no such file")
    if a.init:
        try:
            mean_state_dict(a.init)
        except (ValueError, RuntimeError, pickle.UnpicklingError) as e:
            p.error(f"--init: {e}")
    train(a.out, a.steps, **kw)


if __name__ == "__main__":
    main()
