"""`sam-amg`: run the automatic mask generator on an image or a folder of images.

Equivalent of the reference's ``scripts/amg.py`` (same output layouts), plus presets,
the SA-1B per-image JSON layout, precision and progress.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("sam.cli")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
GENERATOR_OPTIONS = {
    # flag: (type, help)
    "points_per_side": (int, "points sampled along one side of the image (grid N x N)"),
    "points_per_batch": (int, "points per batch, as in the reference (results do not depend on it)"),
    "pred_iou_thresh": (float, "drop masks whose predicted IoU is below this"),
    "stability_score_thresh": (float, "drop masks whose stability score is below this"),
    "stability_score_offset": (float, "logit offset used by the stability score"),
    "box_nms_thresh": (float, "IoU threshold of the box NMS within a crop"),
    "crop_n_layers": (int, "number of crop layers (0: the whole image only)"),
    "crop_nms_thresh": (float, "IoU threshold of the box NMS across crops"),
    "crop_overlap_ratio": (float, "overlap of neighbouring crops, as a fraction of the short side"),
    "crop_n_points_downscale_factor": (int, "points per side shrink by this factor per layer"),
    "min_mask_region_area": (int, "remove holes and islands smaller than this (pixels)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sam-amg",
        description="Generate masks for every object in an image or a folder of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--model", "--model-type", dest="model", default="tiny",
                   help="vit_h, vit_l, vit_b, default (= vit_h) or tiny (bundled weights)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path or fsspec URL (required for vit_*; tiny is bundled)")
    p.add_argument("--preset", default="default",
                   help="generator preset: default, sa1b (SA-1B's settings) or tiny (thresholds "
                   "for the bundled tiny model)")
    p.add_argument("--format", choices=["png", "coco_rle", "sa1b"], default="png",
                   help="png: a folder of mask PNGs + metadata.csv per image (the reference's "
                   "default); coco_rle: one JSON list of records per image; sa1b: one SA-1B "
                   "per-image JSON file")
    p.add_argument("--convert-to-rle", action="store_true",
                   help="same as --format coco_rle (the reference's flag)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--resize", default="pil", choices=["pil", "torch"],
                   help="pil: the reference's resize on the CPU; torch: on --device (faster "
                   "on a GPU, masks agree to IoU ~0.99)")
    for name, (typ, help_) in GENERATOR_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=help_ + " (default: from the preset)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"input {path}: no such file or folder")


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    from .predictor import pil_to_rgb

    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path}: too large ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error ... for bad files
        raise ValueError(
            f"image {path}: cannot be read as an image ({type(e).__name__}: {e})"
        ) from None


def image_ids(paths: list[Path]) -> list[int]:
    """SA-1B image ids: an ``sa_<id>`` name keeps its id; other images get 1, 2, ... in
    order, skipping the ids those names hold, so no two images share one."""
    found = [re.fullmatch(r"sa_(\d+)", p.stem) for p in paths]
    taken = {int(m.group(1)) for m in found if m}
    ids, nxt = [], 1
    for m in found:
        if m:
            ids.append(int(m.group(1)))
            continue
        while nxt in taken:
            nxt += 1
        ids.append(nxt)
        nxt += 1
    return ids


def write_png_folder(records: list[dict], out_dir: Path) -> None:
    """One PNG per mask plus ``metadata.csv`` (the reference script's layout), written
    to a temporary folder that then replaces ``out_dir``: a rerun leaves no masks of an
    earlier run behind, and an interrupted one no half-written folder."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_pngs(records, tmp)
        if out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_pngs(records: list[dict], out_dir: Path) -> None:
    from PIL import Image

    from .amg_ops import runs_to_mask
    from .rle import counts_from_string

    header = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
              "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
    rows = [header.split(",")]
    for i, r in enumerate(records):
        seg = r["segmentation"]
        mask = runs_to_mask(counts_from_string(seg["counts"]), tuple(seg["size"]))
        Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / f"{i}.png")
        rows.append([i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"],
                     r["stability_score"], *r["crop_box"]])
    with open(out_dir / "metadata.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def sa1b_record(records: list[dict], image_id: int, path: Path, size: tuple[int, int]) -> dict:
    from pipeline.sa1b_writer import nonempty

    anns = []
    for k, r in enumerate(nonempty(records)):
        anns.append({
            "bbox": r["bbox"], "area": r["area"], "segmentation": r["segmentation"],
            "predicted_iou": r["predicted_iou"], "point_coords": r["point_coords"],
            "crop_box": r["crop_box"], "id": k, "stability_score": r["stability_score"],
        })
    return {"image": {"image_id": image_id, "width": size[1], "height": size[0],
                      "file_name": path.name}, "annotations": anns}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from . import sam_model_registry
    from .amg import PRESETS, SamAutomaticMaskGenerator
    from .checkpoint import CheckpointError

    fmt = "coco_rle" if args.convert_to_rle else args.format
    if args.preset not in PRESETS:
        print(f"sam-amg: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.model not in sam_model_registry:
        print(f"sam-amg: unknown model {args.model!r}; known: {', '.join(sam_model_registry)}",
              file=sys.stderr)
        return 2
    if args.model != "tiny" and args.checkpoint is None:
        print(f"sam-amg: --checkpoint is required for {args.model} (only tiny ships its weights)",
              file=sys.stderr)
        return 2
    try:
        images = list_images(Path(args.input))
    except FileNotFoundError as e:
        print(f"sam-amg: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder without read permission ...
        print(f"sam-amg: input {args.input}: cannot be listed ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    if not images:
        print(f"sam-amg: input {args.input}: no images found", file=sys.stderr)
        return 2
    try:
        model = sam_model_registry[args.model](checkpoint=args.checkpoint, device=args.device)
    except CheckpointError as e:
        print(f"sam-amg: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, AssertionError) as e:
        print(f"sam-amg: device {args.device}: {e}", file=sys.stderr)
        return 2
    overrides = {k: getattr(args, k) for k in GENERATOR_OPTIONS if getattr(args, k) is not None}
    try:
        gen = SamAutomaticMaskGenerator.from_preset(
            model, args.preset, output_mode="coco_rle", precision=args.precision,
            resize=args.resize, **overrides
        )
    except ValueError as e:
        print(f"sam-amg: {e}", file=sys.stderr)
        return 2
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            print(f"sam-amg: input {args.input}: {stems[path.stem].name} and {path.name} would "
                  f"write the same output {path.stem}", file=sys.stderr)
            return 2
        stems[path.stem] = path
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"sam-amg: output {out}: cannot create the folder ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    ids = image_ids(images)
    failed, n_masks, t0 = [], 0, time.perf_counter()
    bar = tqdm(images, unit="img", desc="sam-amg")
    for i, path in enumerate(bar):
        try:
            image = read_image(path)
        except ValueError as e:
            log.error("%s", e)
            failed.append((path, str(e)))
            continue
        try:
            records = gen.generate(image)
        except Exception as e:  # out of memory on a huge image, ...: the others go on
            log.error("image %s: generation failed: %s: %s", path, type(e).__name__, e)
            failed.append((path, f"generation failed: {type(e).__name__}: {e}"))
            continue
        try:
            if fmt == "png":
                write_png_folder(records, out / path.stem)
            elif fmt == "coco_rle":  # an empty mask's NaN stability as null: valid JSON
                clean = [{**r, "stability_score": _finite(r["stability_score"])} for r in records]
                _write_atomic(out / f"{path.stem}.json", json.dumps(clean, allow_nan=False).encode())
            else:
                from pipeline.sa1b_writer import write_image_json

                rec = sa1b_record(records, ids[i], path, image.shape[:2])
                _write_atomic(out / f"{path.stem}.json", write_image_json(rec))
        except OSError as e:  # disk full, permissions, a file where a folder should be
            target = out / path.stem
            log.error("output %s: cannot write (%s: %s)", target, type(e).__name__, e)
            failed.append((path, f"cannot write output {target}: {type(e).__name__}: {e}"))
            continue
        n_masks += len(records)
        bar.set_postfix(masks=len(records))
    dt = time.perf_counter() - t0
    done = len(images) - len(failed)
    print(f"sam-amg: {done} image(s), {n_masks} masks in {dt:.1f}s "
          f"({done / max(dt, 1e-9):.2f} img/s) -> {out}")
    for path, why in failed:
        print(f"sam-amg: failed: {path}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
