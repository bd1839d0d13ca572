"""Generate an SA-1B-format dataset with SAM's automatic mask generator on Ray.

    python -m jobs.generate INPUT OUTPUT [options]       # or: sa1b-generate ...
    python -m jobs.generate status OUTPUT [--json]       # progress of a run
    python -m jobs.generate INPUT OUTPUT --dry-run       # the plan and checks, nothing run

Joins a cluster when given one (``--address`` or ``RAY_ADDRESS``, as under
``ray job submit``), otherwise starts an embedded local Ray. Rerunning the same command
resumes: committed shards are skipped, the rest redone.

Exit status: 0 every shard committed; 1 some shards failed, SA-1B input shards were
damaged, or the generator failed on images in every attempt (see the summary); 2 a usage
or input error, or no worker could start (one message naming the cause); 130 interrupted
(Ctrl-C: committed shards stay, a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("sa1b-generate")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Generator flags: (flag, AMG keyword, type, help)
_GENERATOR_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--points-per-side", "points_per_side", int, "point grid side (points_per_side**2 prompts)"),
    ("--points-per-batch", "points_per_batch", int, "prompts per batch of the reference"),
    ("--pred-iou-thresh", "pred_iou_thresh", float, "keep masks with predicted IoU above this"),
    (
        "--stability-score-thresh",
        "stability_score_thresh",
        float,
        "keep masks with stability above this",
    ),
    (
        "--stability-score-offset",
        "stability_score_offset",
        float,
        "logit offset of the stability score",
    ),
    ("--box-nms-thresh", "box_nms_thresh", float, "IoU threshold of the NMS within a crop"),
    ("--crop-n-layers", "crop_n_layers", int, "layers of image crops (0: whole image only)"),
    ("--crop-nms-thresh", "crop_nms_thresh", float, "IoU threshold of the NMS across crops"),
    ("--crop-overlap-ratio", "crop_overlap_ratio", float, "overlap of neighbouring crops"),
    (
        "--crop-n-points-downscale-factor",
        "crop_n_points_downscale_factor",
        int,
        "point grid shrink factor per crop layer",
    ),
    ("--min-mask-region-area", "min_mask_region_area", int, "remove holes/islands below this area"),
    ("--precision", "precision", str, "fp32, bf16 or fp16 (autocast) for encoder and decoder"),
    ("--resize", "resize", str, "pil (the reference's, on the CPU) or torch (on the GPU)"),
]


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from pipeline.plan import INPUT_KINDS

    p = argparse.ArgumentParser(
        prog="sa1b-generate",
        description=(
            "Run SAM's automatic mask generator over many images on Ray and write an "
            "SA-1B-format dataset: gzip tar shards of per-image JSON (+ images), Parquet "
            "indexes under OUTPUT/index, a run manifest and per-shard commit markers. "
            "Rerun the same command to resume; 'sa1b-generate status OUTPUT' shows progress."
        ),
        epilog=(
            "examples:\n"
            "  python -m jobs.demo demo_images\n"
            "  sa1b-generate demo_images demo_out --shard-size 8 --preset tiny\n"
            "  sa1b-generate s3://bucket/images/ s3://bucket/sa1b-out/ --model vit_h \\\n"
            "      --checkpoint s3://bucket/sam_vit_h_4b8939.pth --preset sa1b\n"
            "  sa1b-generate status demo_out"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help=(
            "a folder/prefix of images (local or s3://...), a list file (.txt/.csv/.parquet of "
            "URIs), SA-1B shards (sa_NNNNNN.tar: re-annotation keeps shard and image ids) or "
            "an SA-1B_links.txt (its shards re-annotated straight from their links)"
        ),
    )
    p.add_argument("output", metavar="OUTPUT", help="output folder or prefix (local or s3://...)")

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="tiny",
        help=(
            "registry name (tiny, vit_b, vit_l, vit_h) or a JSON file with a model config "
            "(default: tiny, with its bundled weights)"
        ),
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        help=(
            "weights: a local path or any fsspec URL (s3://, https://); default: the bundled "
            "weights of the model"
        ),
    )

    g = p.add_argument_group("generator")
    from sam.amg import PRESETS

    g.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help=(
            "named settings: 'default' (the reference's defaults), 'sa1b' (how SA-1B's "
            "automatic masks were made) or 'tiny' (thresholds for the bundled tiny model); "
            "the flags below override single values"
        ),
    )
    for flag, _, typ, hlp in _GENERATOR_FLAGS:
        g.add_argument(flag, type=typ, default=None, help=hlp)
    g.add_argument(
        "--batch-images",
        type=_positive_int,
        default=1,
        help="images per generator call (batched encoder; default 1)",
    )

    g = p.add_argument_group("input and shard plan")
    g.add_argument(
        "--input-kind",
        choices=INPUT_KINDS,
        default="auto",
        help="how to read INPUT (default: auto-detect)",
    )
    g.add_argument(
        "--shard-size",
        type=_positive_int,
        default=1000,
        help="images per output shard (default 1000; ignored for SA-1B input)",
    )
    g.add_argument(
        "--first-image-id",
        type=int,
        default=1,
        help="id of the first image in plan order (default 1, like SA-1B)",
    )
    g.add_argument(
        "--first-shard-id", type=int, default=0, help="id of the first shard (default 0)"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--layout",
        choices=("tar", "files"),
        default="tar",
        help=(
            "tar: one gzip tar per shard like SA-1B (default); files: loose "
            "OUTPUT/sa_NNNNNN/sa_<id>.json files"
        ),
    )
    g.add_argument(
        "--copy-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store each image (as JPEG) beside its JSON (default: on)",
    )
    g.add_argument(
        "--index-counts",
        action="store_true",
        help="also store the RLE counts in the annotations index",
    )
    g.add_argument(
        "--jpeg-quality",
        type=int,
        default=95,
        help="quality when an image must be re-encoded to JPEG (default 95)",
    )
    g.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=100_000_000,
        help="larger images are recorded as too_large (default 1e8)",
    )
    g.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=256 << 20,
        help="larger files are recorded as too_large (default 256 MiB)",
    )

    g = p.add_argument_group("cluster")
    g.add_argument(
        "--address",
        default=None,
        help=("Ray cluster to join (default: RAY_ADDRESS if set, else an embedded local Ray)"),
    )
    g.add_argument(
        "--num-actors",
        type=_positive_int,
        default=None,
        help="workers (default: one per GPU, or one per --cpus-per-actor CPUs)",
    )
    g.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per worker (default: 1 if the cluster has GPUs, else 0)",
    )
    g.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs per worker; also its torch threads on CPU (default 1)",
    )
    g.add_argument(
        "--read-threads",
        type=_positive_int,
        default=4,
        help="image read/decode threads per worker (default 4)",
    )
    g.add_argument(
        "--max-inflight-per-actor",
        type=_positive_int,
        default=2,
        help="shards queued on each worker (default 2)",
    )
    g.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        help="attempts per shard before it is reported failed (default 3)",
    )
    g.add_argument(
        "--actor-start-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for workers to start (default 600)",
    )

    g = p.add_argument_group("reporting")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="plan the input and make every check (settings, checkpoint, the output's "
        "recorded run), print what would run, and stop: no Ray, nothing written",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--json", action="store_true", help="print the final summary as JSON")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def build_status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sa1b-generate status",
        description="Progress of a generation run, from its manifest and commit markers "
        "(works while the run is going and after it ended).",
    )
    p.add_argument("output", metavar="OUTPUT", help="the run's output folder or prefix")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from pipeline.driver import GenerateConfig

    generator = {
        key: getattr(args, flag[2:].replace("-", "_"))
        for flag, key, _, _ in _GENERATOR_FLAGS
        if getattr(args, flag[2:].replace("-", "_")) is not None
    }
    return GenerateConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        checkpoint=args.checkpoint,
        preset=args.preset,
        generator=generator,
        batch_images=args.batch_images,
        input_kind=args.input_kind,
        shard_size=args.shard_size,
        first_image_id=args.first_image_id,
        first_shard_id=args.first_shard_id,
        layout=args.layout,
        copy_images=args.copy_images,
        index_counts=args.index_counts,
        jpeg_quality=args.jpeg_quality,
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes,
        address=args.address,
        num_actors=args.num_actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        read_threads=args.read_threads,
        max_inflight_per_actor=args.max_inflight_per_actor,
        max_attempts=args.max_attempts,
        actor_start_timeout=args.actor_start_timeout,
        progress=args.progress,
    )


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def status_main(argv: Sequence[str]) -> int:
    from pipeline.io import scrub
    from pipeline.manifest import RunConflictError, format_status, run_status

    args = build_status_parser().parse_args(argv)
    _setup_logging(0)
    try:
        st = run_status(args.output)
    except (RunConflictError, OSError) as e:
        print(f"sa1b-generate status: {scrub(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    if not st.started:
        print(format_status(st), file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(st.as_dict(), indent=1) if args.json else format_status(st))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)

    from pipeline.driver import (
        ConfigError,
        WorkerStartError,
        dry_run,
        format_dry_run,
        run_generation,
    )
    from pipeline.io import scrub
    from pipeline.manifest import RunConflictError
    from pipeline.plan import InputError
    from sam.checkpoint import CheckpointError

    try:
        if args.dry_run:
            d = dry_run(config_from_args(args))
            print(json.dumps(d, indent=1) if args.json else format_dry_run(d))
            return EXIT_OK
        summary = run_generation(config_from_args(args))
    except (ConfigError, InputError, RunConflictError, CheckpointError, WorkerStartError) as e:
        print(f"sa1b-generate: {scrub(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sa1b-generate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary.as_dict(), indent=1) if args.json else summary.format())
    return EXIT_OK if summary.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
