"""Helpers shared by the benchmarks: images, weights, timing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "images"


def load_images(
    limit: int | None = None, size: tuple[int, int] | None = None
) -> list[tuple[str, np.ndarray]]:
    """The real photos beside the repo when present (and no `size` is asked for), else
    synthetic scenes of `size` (height, width; default 1200 x 1800)."""
    from PIL import Image

    if SHARED_IMAGES.exists() and size is None:
        files = sorted(SHARED_IMAGES.glob("*.jpg"))[:limit]
        return [(f.name, np.asarray(Image.open(f).convert("RGB"))) for f in files]
    from sam.scenes import make_scene

    n = limit or 3
    h, w = size or (1200, 1800)
    return [(f"scene{s}", make_scene(seed=10_000 + s, height=h, width=w).image) for s in range(n)]


def seeded_reference(name: str, seed: int = 0, device: str = "cpu"):
    """The reference's model `name` with seeded random weights, and that state dict.
    Built directly on `device` (initialising vit_h on the CPU alone takes many seconds)."""
    import segment_anything

    torch.manual_seed(seed)
    with torch.device(device):
        ref = segment_anything.sam_model_registry[name]()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if "rel_pos" in k or "pos_embed" in k:
                p.normal_(0, 0.02)
    return ref.eval(), ref.state_dict()


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` runs, in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def model_pair(name: str, device: str, checkpoint: str | None = None):
    """Our model and the reference's with identical weights: those of `checkpoint` (a
    path or fsspec URL, e.g. an official file), else the bundled tiny model, or seeded
    random weights for the ViT models (no official weights here)."""
    from sam import build_sam, build_sam_from_config, model_config
    from tests.reference import build_reference_sam

    if checkpoint is not None or name == "tiny":
        ours = build_sam(name, checkpoint)  # no checkpoint: the bundled tiny weights
        ref = build_reference_sam(model_config(name), ours.state_dict())
    else:
        ref, sd = seeded_reference(name, device=device)
        with torch.device(device):
            ours = build_sam_from_config(model_config(name))
        ours.load_state_dict(sd)
    return ours.to(device).eval(), ref.to(device).eval()
