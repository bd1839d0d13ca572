"""Automatic mask generator benchmark: ours against the reference, same images and weights.

    python -m bench.amg [--models tiny vit_b] [--images 2] [--preset default]

For each model: wall time per image of both generators, the speed-up, record counts, and
a per-stage breakdown (ours: encoder, decoder, upsampling+filtering, NMS, RLE encoding;
the reference: encoder, decoder+upsampling, the rest). On CUDA also images/s in fp32 and
bf16, peak GPU memory, and bf16's agreement with fp32; on CUDA ``vit_h`` always runs too.

Note: `vit_b` runs with seeded random weights (no official weights here); its masks are
few, so its figures mostly measure the encoder and decoder. The tiny model is trained
and yields realistic mask counts.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from bench.common import load_images, model_pair


def _instrument_reference(gen, timings):
    """Wrap the reference predictor's stages with timers."""
    pred = gen.predictor

    def wrap(obj, name, stage):
        fn = getattr(obj, name)

        def timed(*a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[stage] += time.perf_counter() - t
            return out

        setattr(obj, name, timed)

    wrap(pred, "set_image", "encoder")
    wrap(pred, "predict_torch", "decoder+upsample")


def run_model(name: str, images, preset: str, device: str, overrides: dict | None = None) -> None:
    import segment_anything

    from sam.amg import PRESETS, SamAutomaticMaskGenerator

    ours, ref = model_pair(name, device)
    settings = {**PRESETS[preset], **(overrides or {})}
    gen = SamAutomaticMaskGenerator(ours, output_mode="coco_rle", **settings)
    rgen = segment_anything.SamAutomaticMaskGenerator(ref, output_mode="coco_rle", **settings)
    rtimes: dict[str, float] = defaultdict(float)
    _instrument_reference(rgen, rtimes)
    gen.generate(images[0][1][:64, :64])  # warm-up
    gen.timings.clear()
    t_ours = t_ref = 0.0
    n_ours = n_ref = 0
    for _, image in images:
        t = time.perf_counter()
        n_ours += len(gen.generate(image))
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        try:
            n_ref += len(rgen.generate(image))
        except IndexError:  # the reference crashes when no crop yields a mask
            pass
        t_ref += time.perf_counter() - t
    k = len(images)
    extra = f" + {overrides}" if overrides else ""
    print(f"\n== {name}, preset {preset}{extra}, {k} image(s), device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"   ours      {t_ours / k:8.2f} s/image  {n_ours / k:6.1f} masks/image")
    print(f"   reference {t_ref / k:8.2f} s/image  {n_ref / k:6.1f} masks/image")
    print(f"   speed-up  {t_ref / t_ours:8.2f}x")
    stages = dict(gen.timings)
    other = t_ours - sum(stages.values())
    print("   ours per stage (s/image): " + ", ".join(
        f"{s} {v / k:.3f}" for s, v in [*stages.items(), ("other", other)]))
    rother = t_ref - sum(rtimes.values())
    print("   reference per stage (s/image): " + ", ".join(
        f"{s} {v / k:.3f}" for s, v in [*rtimes.items(), ("rest (filter, NMS, RLE)", rother)]))
    if device == "cuda":
        from sam.amg import SamAutomaticMaskGenerator as G

        res = {}
        for prec in ["fp32", "bf16"]:
            torch.cuda.reset_peak_memory_stats()
            g = G(ours, output_mode="binary_mask", precision=prec, **settings)
            g.generate(images[0][1])
            t = time.perf_counter()
            out = [g.generate(im) for _, im in images]
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            res[prec] = out
            print(f"   {prec}: {k / dt:.2f} img/s, {dt / k * 1e3:.0f} ms/image, peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        agree = []
        for a, b in zip(res["fp32"], res["bf16"]):
            for r in a:
                best = max((np.logical_and(r["segmentation"], s["segmentation"]).sum()
                            / max(1, np.logical_or(r["segmentation"], s["segmentation"]).sum())
                            for s in b), default=0.0)
                agree.append(best)
        if agree:
            print(f"   bf16 vs fp32: mean best-match mask IoU {np.mean(agree):.4f}, "
                  f"{np.mean(np.array(agree) >= 0.9) * 100:.1f}% of masks matched at IoU 0.9")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="synthetic scenes of this size instead of the shared photos")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pred-iou-thresh", type=float, default=None)
    ap.add_argument("--stability-score-thresh", type=float, default=None)
    args = ap.parse_args()
    overrides = {k: v for k, v in [("pred_iou_thresh", args.pred_iou_thresh),
                                   ("stability_score_thresh", args.stability_score_thresh)]
                 if v is not None}
    images = load_images(limit=args.images, size=tuple(args.size) if args.size else None)
    print("images: " + ", ".join(f"{n} {im.shape[1]}x{im.shape[0]}" for n, im in images))
    for m in args.models:
        run_model(m, images, args.preset, args.device, overrides)
    if args.device == "cuda" and "vit_h" not in args.models:
        run_model("vit_h", images, args.preset, args.device, overrides)


if __name__ == "__main__":
    main()
