"""Automatic mask generator benchmark: ours against the reference, same images and weights.

    python -m bench.amg [--models tiny vit_b] [--images 2] [--preset default]

For each model: wall time per image of both generators, the speed-up, record counts, and
a per-stage breakdown (ours: encoder, decoder, upsampling+filtering, NMS, RLE encoding;
the reference: encoder, decoder+upsampling, the rest). On CUDA also images/s in fp32,
bf16, and bf16 with the resize on the GPU (``resize="torch"``, also with the images in one
``generate_batch`` call), their per-stage times, peak GPU memory, and agreement with fp32
(the records matched both ways, and the decoder's masks and predicted IoUs over a point
grid); ``--profile ROWS`` adds the top operators of one bf16 generate; ``vit_h`` joins the
default models on CUDA. "fp32" means PyTorch's defaults, the same for both sides: matmuls
in full fp32, convolutions allowed TF32 by cuDNN.

Note: without ``--checkpoint`` the ViTs run with seeded random weights (no official
weights here); their masks are few, so their figures mostly measure the encoder and
decoder. The tiny model is trained and yields realistic mask counts. ``--models vit_h
--checkpoint sam_vit_h_4b8939.pth`` measures an official checkpoint (both sides load it).
"""

from __future__ import annotations

import argparse
import gc
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


def run_model(
    name: str,
    images,
    preset: str,
    device: str,
    overrides: dict | None = None,
    profile: int = 0,
    checkpoint: str | None = None,
) -> None:
    import segment_anything

    from sam.amg import PRESETS, SamAutomaticMaskGenerator

    ours, ref = model_pair(name, device, checkpoint)
    settings = {**PRESETS[preset], **(overrides or {})}
    gen = SamAutomaticMaskGenerator(ours, output_mode="coco_rle", **settings)
    rgen = segment_anything.SamAutomaticMaskGenerator(ref, output_mode="coco_rle", **settings)
    rtimes: dict[str, float] = defaultdict(float)
    _instrument_reference(rgen, rtimes)
    # warm both up on a full-size image: kernels, allocator pools and caches are ready
    # before either is timed
    gen.generate(images[0][1])
    try:
        rgen.generate(images[0][1])
    except IndexError:
        pass
    gen.timings.clear()
    rtimes.clear()
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
        # the reference stays out of the memory figures (its instrumentation holds a cycle)
        del rgen, ref
        gc.collect()
        torch.cuda.empty_cache()
        precision_rows(ours, images, settings, profile)


def _best_ious(a: list[dict], b: list[dict]) -> np.ndarray:
    """For each record of ``a`` the best mask IoU with a record of ``b`` (binary masks),
    comparing only pairs whose boxes overlap, on the union of the two boxes."""
    best = np.zeros(len(a))
    for i, r in enumerate(a):
        x, y, w, h = r["bbox"]
        for s in b:
            u, v, sw, sh = s["bbox"]
            if u > x + w or x > u + sw or v > y + h or y > v + sh:
                continue
            x0, y0 = int(min(x, u)), int(min(y, v))
            x1, y1 = int(max(x + w, u + sw)) + 1, int(max(y + h, v + sh)) + 1
            m, n = r["segmentation"][y0:y1, x0:x1], s["segmentation"][y0:y1, x0:x1]
            best[i] = max(best[i], (m & n).sum() / max(1, (m | n).sum()))
    return best


def decoder_agreement(model, image: np.ndarray, n: int = 16, batch: int = 64) -> str:
    """bf16 against fp32 at the decoder's output for an n x n point grid (every model has
    masks there, also with random weights): mean per-mask IoU and predicted-IoU error."""
    from sam import SamPredictor

    h, w = image.shape[:2]
    g = (np.arange(n) + 0.5) / n
    pts = np.stack(np.meshgrid(g * w, g * h), -1).reshape(-1, 2)
    preds = {prec: SamPredictor(model, precision=prec) for prec in ["fp32", "bf16"]}
    for p in preds.values():
        p.set_image(image)
    ious, dq = [], []
    for s in range(0, len(pts), batch):
        got = {}
        for prec, p in preds.items():
            c = torch.as_tensor(pts[s : s + batch], dtype=torch.float32, device=p.device)
            c = p.transform.apply_coords_torch(c[:, None], (h, w))
            got[prec] = p.predict_torch(c, torch.ones(len(c), 1, device=p.device))
        (a, qa, _), (b, qb, _) = got["fp32"], got["bf16"]
        inter = (a & b).flatten(2).sum(-1).float()
        union = (a | b).flatten(2).sum(-1).float()
        ious.append((inter / union.clamp(min=1)).flatten())
        dq.append((qa - qb).abs().flatten())
    iou, dq = torch.cat(ious), torch.cat(dq)
    return (f"bf16 vs fp32 at the decoder ({n}x{n} grid, {iou.numel()} masks): mean mask IoU "
            f"{iou.mean():.4f}, {(iou >= 0.9).float().mean() * 100:.1f}% at IoU >= 0.9, "
            f"predicted IoU |diff| mean {dq.mean():.4f} max {dq.max():.4f}")


# (precision, resize, all images in one generate_batch call)
CUDA_CONFIGS = [("fp32", "pil", False), ("bf16", "pil", False), ("bf16", "torch", False),
                ("bf16", "torch", True)]


def precision_rows(ours, images, settings: dict, profile: int = 0) -> None:
    """CUDA: our generator in fp32 and bf16 (and bf16 with the resize on the GPU):
    images/s, per-stage times, peak memory, and each one's agreement with fp32."""
    from sam.amg import SamAutomaticMaskGenerator

    k = len(images)
    arrays = [im for _, im in images]
    res = {}
    for prec, resize, together in CUDA_CONFIGS:
        g = SamAutomaticMaskGenerator(
            ours, output_mode="binary_mask", precision=prec, resize=resize, **settings
        )
        # warm-up in the same call form: a batch of crops meets new kernel shapes (cuDNN
        # builds an attention plan per shape), which a single image does not warm
        if together:
            g.generate_batch(arrays)
        else:
            g.generate(arrays[0])
        g.timings.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = g.generate_batch(arrays) if together else [g.generate(im) for im in arrays]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        name = prec if resize == "pil" else f"{prec}+{resize}-resize"
        name += "+generate_batch" if together else ""
        res[name] = out
        print(f"   {name}: {k / dt:.2f} img/s, {dt / k * 1e3:.0f} ms/image, "
              f"{sum(map(len, out)) / k:.1f} masks/image, peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"   {name} per stage (ms/image): " + ", ".join(
            f"{s} {v / k * 1e3:.1f}" for s, v in g.timings.items()))
    for name in list(res)[1:]:
        a, b = res["fp32"], res[name]
        fwd = np.concatenate([_best_ious(x, y) for x, y in zip(a, b)])
        bwd = np.concatenate([_best_ious(y, x) for x, y in zip(a, b)])
        if len(fwd) and len(bwd):
            print(f"   {name} vs fp32 records: {len(fwd)} fp32, {len(bwd)} {name}; matched at "
                  f"IoU 0.9: {np.mean(fwd >= 0.9) * 100:.1f}% of fp32, "
                  f"{np.mean(bwd >= 0.9) * 100:.1f}% of {name}; mean best-match IoU "
                  f"{fwd.mean():.4f}")
        else:
            print(f"   {name} vs fp32 records: no masks to compare ({len(fwd)} fp32, "
                  f"{len(bwd)} {name})")
    print("   " + decoder_agreement(ours, images[0][1]))
    if profile:
        g = SamAutomaticMaskGenerator(
            ours, output_mode="binary_mask", precision="bf16", resize="torch", **settings
        )
        profile_rows(g, images[0][1], profile)


def profile_rows(gen, image: np.ndarray, rows: int) -> None:
    """The operators of one warm ``generate`` by GPU time and by host time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    gen.generate(image)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.generate(image)
        torch.cuda.synchronize()
    table = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            text = table.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
        print(f"   profile of one bf16 generate, by {key}:\n{text}")
        break
    print("   by self CPU time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help="default: tiny vit_b, and vit_h too on CUDA")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="synthetic scenes of this size instead of the shared photos")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pred-iou-thresh", type=float, default=None)
    ap.add_argument("--stability-score-thresh", type=float, default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="CUDA: also profile one bf16 generate and print its top ROWS operators")
    ap.add_argument("--checkpoint", default=None,
                    help="weights for the one model of --models (a path or fsspec URL, e.g. "
                         "the official sam_vit_h_4b8939.pth), given to both sides")
    args = ap.parse_args()
    if args.checkpoint is not None and (args.models is None or len(args.models) != 1):
        ap.error(f"--checkpoint {args.checkpoint}: name the one model it holds with --models")
    overrides = {k: v for k, v in [("pred_iou_thresh", args.pred_iou_thresh),
                                   ("stability_score_thresh", args.stability_score_thresh)]
                 if v is not None}
    images = load_images(limit=args.images, size=tuple(args.size) if args.size else None)
    print("images: " + ", ".join(f"{n} {im.shape[1]}x{im.shape[0]}" for n, im in images))
    models = args.models or ["tiny", "vit_b", *(["vit_h"] if args.device == "cuda" else [])]
    for m in models:
        run_model(m, images, args.preset, args.device, overrides, args.profile, args.checkpoint)


if __name__ == "__main__":
    main()
