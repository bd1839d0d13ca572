"""Throughput of the full generation pipeline against the plain generator loop.

    python -m bench.pipeline [--images 24] [--actors 1,2] [--size 256x320]

Baseline: one process, one torch thread, ``load_image`` + ``generator.generate`` over
the images. Pipeline: ``run_generation`` on a local Ray with K CPU actors (one torch
thread each) over the same images, timed from workers ready to the last commit (reading,
generating, writing tar + Parquet + markers). Efficiency = pipeline images/s divided by
K times the baseline's. Uses the bundled tiny model, or the tiny architecture with random
weights (thresholds at 0 so masks exist) while the bundled weights are absent.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time


def _model(tmp: str) -> tuple[str, str | None, dict]:
    """``(model, checkpoint, generator overrides)``."""
    from sam.registry import bundled_checkpoint

    b = bundled_checkpoint("tiny")
    if b is not None and b.exists():
        # the generator's preset for the tiny model (its scores rarely reach SAM's defaults)
        from sam.amg import PRESETS

        return "tiny", None, dict(PRESETS["tiny"])
    import torch

    from sam import build_sam_from_config, model_config

    net = build_sam_from_config(model_config("tiny"))
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
        for k, v in net.state_dict().items()
    }
    path = os.path.join(tmp, "tiny_random.pth")
    torch.save(sd, path)
    return "tiny", path, {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=24, help="images (default 24)")
    p.add_argument("--size", default="256x320", help="HEIGHTxWIDTH of the images")
    p.add_argument("--actors", default="1,2", help="actor counts to measure (default 1,2)")
    p.add_argument("--shard-size", type=int, default=4, help="images per shard (default 4)")
    p.add_argument("--points-per-side", type=int, default=8, help="AMG grid (default 8)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from jobs.demo import write_demo_images
    from pipeline.actors import load_image
    from pipeline.driver import GenerateConfig, resolve_generator_settings, run_generation
    from sam import build_sam
    from sam.amg import SamAutomaticMaskGenerator

    h, w = (int(v) for v in args.size.split("x"))
    ks = [int(k) for k in args.actors.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, ckpt, overrides = _model(tmp)
        overrides["points_per_side"] = args.points_per_side
        img_dir = os.path.join(tmp, "images")
        urls = write_demo_images(img_dir, args.images, (h, w))

        torch.set_num_threads(1)
        net = build_sam(model, ckpt)
        gen = SamAutomaticMaskGenerator(
            net, **resolve_generator_settings("default", overrides), output_mode="coco_rle"
        )
        gen.generate(load_image(0, urls[0]).image)  # warm-up
        t = time.perf_counter()
        masks = 0
        for i, u in enumerate(urls):
            masks += len(gen.generate(load_image(i, u).image))
        base = args.images / (time.perf_counter() - t)
        print(f"model: {model}{' (random weights)' if ckpt else ''}; {args.images} images {h}x{w}, "
              f"points_per_side {args.points_per_side}, {masks / args.images:.1f} masks/image")  # fmt: skip
        print(f"baseline   1 process x 1 thread: {base:7.3f} images/s")

        ray.init(num_cpus=max(ks), include_dashboard=False, logging_level=logging.WARNING)
        try:
            for k in ks:
                out = os.path.join(tmp, f"out{k}")
                cfg = GenerateConfig(
                    input=img_dir, output=out, model=model, checkpoint=ckpt,
                    generator=overrides, shard_size=args.shard_size, num_actors=k,
                    gpus_per_actor=0, cpus_per_actor=1, read_threads=2, progress=False,
                )  # fmt: skip
                s = run_generation(cfg)
                assert s.ok, s.format()
                eff = s.images_per_second / (k * base)
                print(
                    f"pipeline {k} actor(s):            {s.images_per_second:7.3f} images/s, "
                    f"{s.masks_per_second:8.1f} masks/s, efficiency {eff:.2f} "
                    f"(vs {k} x baseline; wall incl. startup {s.seconds:.1f}s)"
                )
        finally:
            ray.shutdown()
    print(
        f"cores on this machine: {os.cpu_count()} (shared; efficiency for K above free cores is not meaningful)"
    )


if __name__ == "__main__":
    main()
