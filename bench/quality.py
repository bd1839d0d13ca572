"""Segmentation quality of a SAM model on held-out synthetic scenes.

    python -m bench.quality                      # the bundled tiny model, 24 scenes
    python -m bench.quality --checkpoint x.pth --model tiny --scenes 50 --amg
    python -m bench.quality --picture worst.png  # the worst point prompts, drawn

Scenes come from ``sam.scenes.make_scene`` with seeds below ``sam.train.TRAIN_SEED_BASE``
(never used in training), up to 12 objects, sides drawn in [512, 1024] px.  Printed:

* point mIoU: for every object and part, one positive point at its most interior pixel
  (maximum of the distance transform); IoU of the best of the three multimask outputs
  against the ground truth at full resolution;
* box mIoU: the same with the tight box of the instance as the prompt (best of three,
  and the single-output mask);
* the predicted-IoU error and the stability score of the chosen masks, and background
  regions separately;
* the same mIoUs by shape (ellipse, polygon, star, ring, bar, rect, blob; ``part``: the
  inner parts of objects) and by size (share of the image's area), which show where the
  model fails;
* grid: distinct confident masks over a 16x16 point grid on the first scene;
* AMG recall (``--amg``): recall of ground-truth objects at IoU 0.5 and 0.75 by
  ``sam.SamAutomaticMaskGenerator`` (see :func:`amg_recall`) and the precision of its
  masks, at SAM's default thresholds, at the relaxed ones, and at any pairs given with
  ``--amg-thresholds 0.5/0.8 ...`` (an operating-point sweep).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from sam.scenes import make_scene
from sam.train import TRAIN_SEED_BASE

# loose thresholds (pred IoU, stability): the generator's parity tests use them with the
# tiny model for many masks (its preset, sam.amg.PRESETS["tiny"], is 0.5 / 0.8)
LOOSE = (0.3, 0.6)
EVAL_SEED_BASE = 1_000  # held-out scene seeds: EVAL_SEED_BASE + i (< TRAIN_SEED_BASE)


def eval_scene(seed: int, min_side: int = 512, max_side: int = 1024, max_objects: int = 12):
    """The held-out scene for ``seed``: sides drawn from the seed in [min_side, max_side]."""
    if seed >= TRAIN_SEED_BASE:
        raise ValueError(f"seed {seed} is in the training range (>= {TRAIN_SEED_BASE})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    return make_scene(seed, h, w, max_objects=max_objects)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the most interior pixel: of the pixels within 1 px of the largest
    distance from the boundary (a round shape's centre, a thin bar's whole centre line),
    the one nearest their middle, not the first in row order (at one end of a bar)."""
    from sam.train import most_interior_pixels

    ys, xs = np.divmod(most_interior_pixels(mask), mask.shape[1])
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return float(xs[k]), float(ys[k])


def tight_box(mask: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` in pixel edges (x1, y1 exclusive), the training convention."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float64)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks ``a`` (..., H, W) with ``b`` (H, W)."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


def stability_score(logits: torch.Tensor, threshold: float = 0.0, offset: float = 1.0):
    hi = (logits > threshold + offset).flatten(-2).sum(-1).float()
    lo = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return hi / lo.clamp(min=1)


def prompt_ious(predictor, scene, indices, mode: str, batch: int = 16) -> dict:
    """Per instance: best-of-3 IoU, single-output IoU, and the predicted-IoU error and
    stability score (SAM's, offset 1) of the best of three."""
    gt = torch.from_numpy(scene.masks)
    best, single, pred_err, stab = [], [], [], []
    thr = predictor.model.mask_threshold
    tf = predictor.transform
    size = (scene.height, scene.width)
    for s in range(0, len(indices), batch):
        idx = indices[s : s + batch]
        if mode == "point":
            pts = np.array([interior_point(scene.masks[i]) for i in idx])
            coords = torch.as_tensor(tf.apply_coords(pts, size), dtype=torch.float)[:, None]
            labels = torch.ones(len(idx), 1, dtype=torch.int)
            kw = {"point_coords": coords, "point_labels": labels}
        else:
            boxes = np.stack([tight_box(scene.masks[i]) for i in idx])
            kw = {
                "point_coords": None,
                "point_labels": None,
                "boxes": torch.as_tensor(tf.apply_boxes(boxes, size), dtype=torch.float),
            }
        l3, i3, _ = predictor.predict_torch(**kw, multimask_output=True, return_logits=True)
        m3 = l3 > thr
        ious3 = torch.stack([iou(m3[j], gt[i]) for j, i in enumerate(idx)])  # B x 3
        b = ious3.argmax(1)
        best += ious3.max(1).values.tolist()
        pred_err += (i3.gather(1, b[:, None])[:, 0] - ious3.max(1).values).abs().tolist()
        stab += stability_score(l3[torch.arange(len(idx)), b], thr).tolist()
        m1, _, _ = predictor.predict_torch(**kw, multimask_output=False)
        single += [float(iou(m1[j, 0], gt[i])) for j, i in enumerate(idx)]
    return {"best": best, "single": single, "pred_err": pred_err, "stability": stab}


def grid_distinct_masks(predictor, n: int = 16, iou_thresh=0.88, stab_thresh=0.95, dedup=0.7):
    """Distinct confident masks from an ``n x n`` point grid on the image set in
    ``predictor``: every one of the 3 masks per point with predicted IoU >= ``iou_thresh``
    and stability >= ``stab_thresh`` (SAM's defaults), then greedy de-duplication at mask
    IoU > ``dedup`` in descending predicted IoU.  Returns the kept masks (K, H, W)."""
    h, w = predictor.original_size
    g = (np.arange(n) + 0.5) / n
    pts = np.stack(np.meshgrid(g * w, g * h), -1).reshape(-1, 2)
    coords = torch.as_tensor(predictor.transform.apply_coords(pts, (h, w)), dtype=torch.float)
    masks, scores = [], []
    for s in range(0, len(coords), 64):
        c = coords[s : s + 64, None]
        lbl = torch.ones(len(c), 1, dtype=torch.int)
        logits, ious, _ = predictor.predict_torch(c, lbl, multimask_output=True, return_logits=True)
        logits, ious = logits.flatten(0, 1), ious.flatten()
        keep = (ious >= iou_thresh) & (stability_score(logits) >= stab_thresh)
        masks.append(logits[keep] > 0)
        scores.append(ious[keep])
    masks, scores = torch.cat(masks), torch.cat(scores)
    kept: list[torch.Tensor] = []
    for i in torch.argsort(scores, descending=True).tolist():
        m = masks[i]
        if m.sum() == 0:
            continue
        if all(float(iou(m, k)) <= dedup for k in kept):
            kept.append(m)
    return torch.stack(kept) if kept else masks[:0]


# --------------------------------------------------------------------------- breakdown

SIZE_BUCKETS = ((0.0, 0.01, "< 1%"), (0.01, 0.05, "1-5%"), (0.05, 1.01, ">= 5%"))


def breakdown(instances: list[dict]) -> dict:
    """Point and box mIoU of ``instances`` (dicts with ``shape``, ``area`` as a share of
    the image, ``point`` and ``box`` IoUs) by shape and by size bucket."""

    def summary(rows):
        return {
            "n": len(rows),
            "point": float(np.mean([r["point"] for r in rows])),
            "box": float(np.mean([r["box"] for r in rows])),
        }

    by_shape = {}
    for shape in sorted({r["shape"] for r in instances}):
        by_shape[shape] = summary([r for r in instances if r["shape"] == shape])
    by_size = {}
    for lo, hi, label in SIZE_BUCKETS:
        rows = [r for r in instances if lo <= r["area"] < hi]
        if rows:
            by_size[label] = summary(rows)
    return {"by_shape": by_shape, "by_size": by_size}


def draw_worst(
    model, instances: list[dict], path: str, n: int = 12, scene_args=()
) -> list[dict]:
    """A picture of the ``n`` worst point prompts: for each, the crop around the object
    and, beside it, the chosen mask (red), the ground truth's outline (green) and the
    point (yellow). Returns the instances drawn, in tile order."""
    from sam import SamPredictor

    if not instances:
        raise ValueError("no instances to draw")
    predictor = SamPredictor(model)
    worst = sorted(instances, key=lambda r: r["point"])[:n]
    tiles, current, drawn = [], None, []
    for r in sorted(worst, key=lambda r: r["seed"]):
        drawn.append(r)
        if current is None or current.seed != r["seed"]:
            current = eval_scene(r["seed"], *scene_args)
            predictor.set_image(current.image)
        gt = current.masks[r["index"]]
        x, y = interior_point(gt)
        masks, _, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        mask = masks[int(iou(torch.from_numpy(masks), torch.from_numpy(gt)).argmax())]
        ys, xs = np.nonzero(gt | mask)
        cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
        half = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + 24
        y0, x0 = max(0, cy - half), max(0, cx - half)
        y1, x1 = cy + half + 1, cx + half + 1
        crop = current.image[y0:y1, x0:x1]
        over = crop.astype(np.float32)
        m = mask[y0:y1, x0:x1]
        over[m] = 0.45 * over[m] + 0.55 * np.array([255, 0, 0])
        over = np.ascontiguousarray(over.astype(np.uint8))
        contours, _ = cv2.findContours(
            gt[y0:y1, x0:x1].astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(over, contours, -1, (0, 255, 0), 1)
        cv2.circle(over, (int(x) - x0, int(y) - y0), 3, (255, 255, 0), -1)
        tile = cv2.resize(
            np.concatenate([crop, over], 1), (384, 192), interpolation=cv2.INTER_NEAREST
        )
        label = f"seed {r['seed']} #{r['index']} {r['shape']} IoU {r['point']:.2f}"
        cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        tiles.append(tile)
    cols = 2
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + cols], 1) for i in range(0, len(tiles), cols)]
    if not cv2.imwrite(path, np.concatenate(rows, 0)[..., ::-1]):
        raise OSError(f"could not write {path}")
    return drawn


# --------------------------------------------------------------------------- AMG hook


def amg_recall(model, scenes, thresholds=(0.5, 0.75), **amg_kwargs) -> dict | None:
    """AMG HOOK: recall of ground-truth objects and parts by the automatic generator.

    Uses ``sam.SamAutomaticMaskGenerator`` (reference-compatible ``generate(image)`` that
    returns records with a boolean ``segmentation``).  A ground-truth instance counts as
    recalled at threshold t if some generated mask has IoU >= t with it; ``precision@0.5``
    is the share of generated masks at IoU >= 0.5 with some instance (objects, parts or
    background regions: each is a segment a person would draw).  Returns None if the
    generator is not importable.
    """
    try:
        from sam import SamAutomaticMaskGenerator
    except ImportError:
        return None
    gen = SamAutomaticMaskGenerator(model, **amg_kwargs)
    best_all, n_masks, seconds, correct = [], [], 0.0, 0
    for scene in scenes:
        t = time.perf_counter()
        records = gen.generate(scene.image)
        seconds += time.perf_counter() - t
        n_masks.append(len(records))
        if not records:
            best_all += [0.0] * len(scene.indices("object", "part"))
            continue
        pred = torch.from_numpy(np.stack([np.asarray(r["segmentation"], bool) for r in records]))
        objects = set(scene.indices("object", "part"))
        hit = torch.zeros(len(records), dtype=torch.bool)
        for i in range(len(scene.masks)):
            ious = iou(pred, torch.from_numpy(scene.masks[i]))
            hit |= ious >= 0.5
            if i in objects:
                best_all.append(float(ious.max()))
        correct += int(hit.sum())
    best = np.array(best_all)
    out = {f"recall@{t}": float((best >= t).mean()) for t in thresholds}
    # duplicates of one segment all count: the share of masks that are right, not COCO AP
    out["precision@0.5"] = correct / sum(n_masks) if sum(n_masks) else None
    out["masks_per_image"] = float(np.mean(n_masks))
    out["seconds_per_image"] = seconds / max(1, len(scenes))
    return out


# --------------------------------------------------------------------------- main


def load_model(name: str, checkpoint: str | None):
    from sam import build_sam, sam_model_registry

    if checkpoint is None:
        return sam_model_registry[name]()
    return build_sam(name, checkpoint)


def evaluate(
    model,
    n_scenes=24,
    seed_base=EVAL_SEED_BASE,
    min_side=512,
    max_side=1024,
    max_objects=12,
    amg=False,
    grid=16,
    amg_scenes=8,
    detail: list | None = None,
    amg_thresholds: Sequence[tuple[float, float]] = (),
) -> dict:
    """The figures above on ``n_scenes`` held-out scenes; ``detail``, if given, receives
    one dict per object and part (scene seed, index, shape, area share, point and box
    IoU)."""
    from sam import SamPredictor

    predictor = SamPredictor(model)
    acc = {
        k: {"best": [], "single": [], "pred_err": [], "stability": []}
        for k in ("point", "box", "bg_point")
    }
    scenes, instances = [], []
    t0 = time.perf_counter()
    grid_count = grid_relaxed = grid_loose = None
    for k in range(n_scenes):
        scene = eval_scene(seed_base + k, min_side, max_side, max_objects)
        scenes.append(scene)
        predictor.set_image(scene.image)
        fg = scene.indices("object", "part")
        bg = scene.indices("background")
        best: dict[str, list[float]] = {}
        for key, idx, mode in (
            ("point", fg, "point"),
            ("box", fg, "box"),
            ("bg_point", bg, "point"),
        ):
            r = prompt_ious(predictor, scene, idx, mode)
            for f in r:
                acc[key][f] += r[f]
            best[key] = r["best"]
        area = scene.areas() / (scene.height * scene.width)
        instances += [
            {
                "seed": seed_base + k,
                "index": int(i),
                "shape": scene.shapes[i],
                "area": float(area[i]),
                "point": p,
                "box": b,
            }
            for i, p, b in zip(fg, best["point"], best["box"])
        ]
        if k == 0 and grid:
            grid_count = len(grid_distinct_masks(predictor, grid))
            grid_relaxed = len(grid_distinct_masks(predictor, grid, 0.5, 0.8))
            grid_loose = len(grid_distinct_masks(predictor, grid, *LOOSE))
    res = {
        "scenes": n_scenes,
        "seeds": [seed_base, seed_base + n_scenes - 1],
        "sides": [min_side, max_side],
        "max_objects": max_objects,
        "instances": len(acc["point"]["best"]),
        "point_miou": float(np.mean(acc["point"]["best"])),
        "point_miou_single": float(np.mean(acc["point"]["single"])),
        "box_miou": float(np.mean(acc["box"]["best"])),
        "box_miou_single": float(np.mean(acc["box"]["single"])),
        "point_pred_iou_mae": float(np.mean(acc["point"]["pred_err"])),
        "point_stability_median": float(np.median(acc["point"]["stability"])),
        "point_stable_frac": float(np.mean(np.array(acc["point"]["stability"]) >= 0.95)),
        "background_point_miou": float(np.mean(acc["bg_point"]["best"])),
        "grid16_distinct_masks_scene0": grid_count,
        "grid16_distinct_masks_scene0_relaxed": grid_relaxed,
        "grid16_distinct_masks_scene0_loose": grid_loose,
        **breakdown(instances),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if detail is not None:
        detail += instances
    if amg:
        res["amg"] = amg_recall(model, scenes[:amg_scenes])
        res["amg_loose"] = amg_recall(
            model, scenes[:amg_scenes], pred_iou_thresh=LOOSE[0], stability_score_thresh=LOOSE[1]
        )
        if res["amg"] is not None:
            res["amg"]["scenes"] = len(scenes[:amg_scenes])
        for pi, st in dict.fromkeys(amg_thresholds):  # (each pair once)
            r = amg_recall(model, scenes[:amg_scenes], pred_iou_thresh=pi, stability_score_thresh=st)
            res.setdefault("amg_sweep", {})[f"{pi}/{st}"] = r
    return res


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def threshold_pair(text: str) -> tuple[float, float]:
    """``"0.5/0.8"`` -> (pred_iou_thresh, stability_score_thresh), each in [0, 1]."""
    try:
        pi, st = (float(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRED_IOU/STABILITY, got {text!r}") from None
    if not (0 <= pi <= 1 and 0 <= st <= 1):
        raise argparse.ArgumentTypeError(f"thresholds must be in [0, 1], got {text!r}")
    return pi, st


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="tiny", help="registry name (default: tiny)")
    p.add_argument("--checkpoint", default=None, help="default: the bundled weights")
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE)
    p.add_argument("--min-side", type=int, default=512)
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--max-objects", type=int, default=12)
    p.add_argument("--grid", type=int, default=16, help="grid count on scene 0 (0: skip)")
    p.add_argument("--amg", action="store_true", help="also AMG recall@0.5/0.75")
    p.add_argument("--amg-scenes", type=int, default=8, help="scenes for the AMG recall")
    p.add_argument(
        "--amg-thresholds",
        nargs="*",
        type=threshold_pair,
        default=[],
        metavar="P/S",
        help="with --amg, also these pred_iou/stability threshold pairs (e.g. 0.5/0.8)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--picture", default=None, help="draw the worst point prompts into this PNG")
    p.add_argument("--worst", type=int, default=12, help="how many the picture shows")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--record",
        default=None,
        help="a checkpoint's metadata JSON to store the results in (key 'eval')",
    )
    a = p.parse_args(argv)
    if a.amg_thresholds and not a.amg:
        p.error("--amg-thresholds needs --amg")
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model, a.checkpoint)
    detail: list[dict] = []
    res = evaluate(
        model,
        a.scenes,
        a.seed_base,
        a.min_side,
        a.max_side,
        a.max_objects,
        a.amg,
        a.grid,
        a.amg_scenes,
        detail=detail,
        amg_thresholds=a.amg_thresholds,
    )
    print(
        f"held-out scenes: {res['scenes']} (seeds {res['seeds'][0]}..{res['seeds'][1]}), "
        f"{res['instances']} objects+parts, sides {a.min_side}-{a.max_side}"
    )
    print(
        f"point mIoU (best of 3): {res['point_miou']:.4f}   single output: {res['point_miou_single']:.4f}"
    )
    print(
        f"box   mIoU (best of 3): {res['box_miou']:.4f}   single output: {res['box_miou_single']:.4f}"
    )
    print(f"predicted-IoU abs error (point, chosen mask): {res['point_pred_iou_mae']:.4f}")
    print(
        f"stability score (point, chosen mask): median {res['point_stability_median']:.4f}, "
        f"{res['point_stable_frac']:.1%} at >= 0.95 (SAM's default filter)"
    )
    print(f"background-region point mIoU: {res['background_point_miou']:.4f}")
    for key, title in (("by_shape", "shape"), ("by_size", "share of the image")):
        print(f"  by {title}:")
        for name, r in res[key].items():
            print(f"    {name:<8} n={r['n']:<4d} point {r['point']:.3f}   box {r['box']:.3f}")
    if res["grid16_distinct_masks_scene0"] is not None:
        print(
            f"distinct confident masks, {a.grid}x{a.grid} grid, scene 0: "
            f"{res['grid16_distinct_masks_scene0']} (pred IoU >= 0.88, stability >= 0.95), "
            f"{res['grid16_distinct_masks_scene0_relaxed']} (>= 0.5, >= 0.8), "
            f"{res['grid16_distinct_masks_scene0_loose']} (>= {LOOSE[0]}, >= {LOOSE[1]})"
        )
    if a.amg:
        rows = [(res.get("amg"), "default thresholds"), (res.get("amg_loose"), f"thresholds {LOOSE}")]
        rows += [(r, f"thresholds {k}") for k, r in res.get("amg_sweep", {}).items()]
        for r, label in rows:
            if r is None:
                print("AMG: sam.SamAutomaticMaskGenerator not importable")
                break
            print(
                f"AMG ({label}) recall@0.5: {r['recall@0.5']:.4f}  "
                f"recall@0.75: {r['recall@0.75']:.4f}  precision@0.5: {_fmt(r['precision@0.5'])}  "
                f"masks/image: {r['masks_per_image']:.1f}  s/image: {r['seconds_per_image']:.2f}"
            )
    if a.picture:
        draw_worst(model, detail, a.picture, a.worst, (a.min_side, a.max_side, a.max_objects))
        print(f"the {min(a.worst, len(detail))} worst point prompts: {a.picture}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.record:
        with open(a.record) as f:
            meta = json.load(f)
        cmd = (
            f"python -m bench.quality --model {a.model} --scenes {a.scenes} "
            f"--seed-base {a.seed_base} --min-side {a.min_side} --max-side {a.max_side} "
            f"--max-objects {a.max_objects} --grid {a.grid}"
            + (f" --amg --amg-scenes {a.amg_scenes}" if a.amg else "")
            + (
                " --amg-thresholds " + " ".join(f"{pi}/{st}" for pi, st in a.amg_thresholds)
                if a.amg and a.amg_thresholds
                else ""
            )
        )
        meta["eval"] = {"command": cmd, **res}
        with open(a.record, "w") as f:
            json.dump(meta, f, indent=1)
    return res


if __name__ == "__main__":
    main()
