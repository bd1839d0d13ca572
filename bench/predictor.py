"""Predictor benchmark: our SAM against the reference package, same image and weights.

    python -m bench.predictor [--models vit_b tiny] [--gpu-models tiny vit_b vit_h] [--repeat 3]

CPU: encoder (set_image) and prompt (predict) time, ours vs reference, and the ratio.
CUDA (when available): images/s of the encoder for ``--gpu-models`` (default tiny, vit_b,
vit_h) in fp32 and bf16, and the bf16 masks' IoU with fp32 (5 points per image).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import load_images, model_pair, timeit


def cpu_rows(models: list[str], repeat: int) -> None:
    import segment_anything

    from sam import SamPredictor

    name, image = load_images(limit=1)[0]
    print(f"image {name} {image.shape[1]}x{image.shape[0]}, CPU threads {torch.get_num_threads()}")
    print(f"{'model':6} {'stage':8} {'ours ms':>9} {'ref ms':>9} {'speed-up':>8}")
    pts = np.array([[image.shape[1] // 2, image.shape[0] // 2]])
    for m in models:
        ours, ref = model_pair(m, "cpu")
        po, pr = SamPredictor(ours), segment_anything.SamPredictor(ref)
        t_o = timeit(lambda po=po: po.set_image(image), repeat)
        t_r = timeit(lambda pr=pr: pr.set_image(image), repeat)
        print(f"{m:6} {'encoder':8} {t_o * 1e3:9.1f} {t_r * 1e3:9.1f} {t_r / t_o:7.2f}x")
        q_o = timeit(lambda po=po: po.predict(pts, np.array([1])), repeat * 3)
        q_r = timeit(lambda pr=pr: pr.predict(pts, np.array([1])), repeat * 3)
        print(f"{m:6} {'predict':8} {q_o * 1e3:9.1f} {q_r * 1e3:9.1f} {q_r / q_o:7.2f}x")
        a = po.predict(pts, np.array([1]))[0]
        b = pr.predict(pts, np.array([1]))[0]
        for i, (x, y) in enumerate(zip(a, b)):
            iou = (x & y).sum() / max(1, (x | y).sum())
            print(f"{m:6} mask {i} IoU with the reference: {iou:.6f}")


def gpu_rows(models: list[str], repeat: int) -> None:
    """Images/s of ``set_images`` (4 photos, resized on the device so the figure is the
    GPU's) in fp32 and bf16, and bf16's per-mask IoU with fp32 over 5 points per image."""
    from sam import SamPredictor

    images = [im for _, im in load_images(limit=4)]
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'model':6} {'precision':9} {'img/s':>8} {'mask IoU vs fp32 (mean/min)':>28}")
    for m in models:
        ours, _ = model_pair(m, "cuda")
        fp32_masks = None
        for prec in ["fp32", "bf16"]:
            p = SamPredictor(ours, precision=prec, resize="torch")
            t = timeit(lambda p=p: p.set_images(images), repeat)
            masks = []
            for i, im in enumerate(images):
                p.select(i)
                h, w = im.shape[:2]
                for fx, fy in [(0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]:
                    pts = np.array([[fx * w, fy * h]])
                    masks.append(p.predict(pts, np.array([1]), multimask_output=False)[0][0])
            agree = ""
            if fp32_masks is not None:
                ious = [(a & b).sum() / max(1, (a | b).sum()) for a, b in zip(masks, fp32_masks)]
                agree = f"{np.mean(ious):.4f} / {np.min(ious):.4f}"
            fp32_masks = fp32_masks or masks
            print(f"{m:6} {prec:9} {len(images) / t:8.2f} {agree:>28}")
        del ours
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["tiny", "vit_b"],
                    help="CPU rows, ours vs the reference (none: GPU rows only)")
    ap.add_argument("--gpu-models", nargs="+", default=["tiny", "vit_b", "vit_h"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.models:
        cpu_rows(args.models, args.repeat)
    if torch.cuda.is_available():
        gpu_rows(args.gpu_models, args.repeat)
    else:
        print("no CUDA device: GPU rows skipped")


if __name__ == "__main__":
    main()
