"""Write demo images (synthetic scenes) so the generation job runs offline on a fresh clone.

    python -m jobs.demo demo_images [--num-images 32] [--size 384x512] [--seed 0]
    python -m jobs.generate demo_images demo_out --shard-size 8

Images are deterministic for a seed (``sam.scenes``), named by the seed in six digits
(``scene_000000.jpg``); OUTPUT may be a local folder or any fsspec URL
(``s3://bucket/demo/``).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("sa1b-demo")


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {s!r}") from None
    if not (8 <= h <= 8192 and 8 <= w <= 8192):
        raise argparse.ArgumentTypeError("sides must be within 8..8192")
    return h, w


def write_demo_images(
    output: str,
    num_images: int = 32,
    size: tuple[int, int] | None = (384, 512),
    seed: int = 0,
    quality: int = 92,
) -> list[str]:
    """Write ``num_images`` scene JPEGs under ``output``; returns their URLs."""
    from PIL import Image

    from pipeline.io import join, write_bytes
    from sam.scenes import make_scene

    urls = []
    for k in range(num_images):
        s = seed + k
        h, w = size if size else (None, None)
        scene = make_scene(s, height=h, width=w)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, "JPEG", quality=quality)
        url = join(output, f"scene_{s:06d}.jpg")
        write_bytes(url, buf.getvalue())
        urls.append(url)
    return urls


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description="Write deterministic synthetic demo images for the generation job.",
    )
    p.add_argument("output", metavar="OUTPUT", help="folder or prefix to write into")
    p.add_argument("--num-images", type=int, default=32, help="how many images (default 32)")
    p.add_argument(
        "--size",
        type=_size,
        default=(384, 512),
        help="HEIGHTxWIDTH of every image (default 384x512)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("--num-images must be at least 1")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.io import describe, redact

    try:
        urls = write_demo_images(args.output, args.num_images, args.size, args.seed)
    except (OSError, ValueError, ImportError) as e:  # no access, a bad URL, no backend
        print(f"jobs.demo: cannot write {redact(args.output)}: {describe(e)}", file=sys.stderr)
        return 2
    log.info("wrote %d demo images to %s", len(urls), redact(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
