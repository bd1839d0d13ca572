"""Predictor benchmark: our SAM against the reference package, same image and weights.

    python -m bench.predictor [--models vit_b tiny] [--repeat 3]

CPU: encoder (set_image) and prompt (predict) time, ours vs reference, and the ratio.
CUDA (when available): images/s for vit_b and vit_h in fp32 and bf16 and the bf16 masks'
agreement with fp32.
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
        print(f"{m:6} mask agreement with the reference: {(a == b).mean() * 100:.4f}%")


def gpu_rows(repeat: int) -> None:
    from sam import SamPredictor

    images = [im for _, im in load_images(limit=4)]
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'model':6} {'precision':9} {'img/s':>8} {'mask agree vs fp32':>20}")
    for m in ["vit_b", "vit_h"]:
        ours, _ = model_pair(m, "cuda")
        ref_masks = None
        for prec in ["fp32", "bf16"]:
            p = SamPredictor(ours, precision=prec)
            t = timeit(lambda p=p: p.set_images(images), repeat)
            pts = np.array([[100, 100]])
            masks = []
            for i in range(len(images)):
                p.select(i)
                masks.append(p.predict(pts, np.array([1]))[0])
            agree = "" if ref_masks is None else f"{np.mean([(a == b).mean() for a, b in zip(masks, ref_masks)]) * 100:.3f}%"
            ref_masks = ref_masks or masks
            print(f"{m:6} {prec:9} {len(images) / t:8.2f} {agree:>20}")
        del ours
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cpu_rows(args.models, args.repeat)
    if torch.cuda.is_available():
        gpu_rows(args.repeat)
    else:
        print("no CUDA device: GPU rows skipped")


if __name__ == "__main__":
    main()
