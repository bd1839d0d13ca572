"""``sa1b-decode``: inspect, index, extract, convert, show, validate and download SA-1B.

Exit status: 0 all good; 1 the data has problems (damaged shard, invalid record, md5
mismatch, failed download) or storage/network failed; 2 the command could not run (bad
flag, missing or unreadable input, not a shard). Results go to stdout, diagnostics to
stderr through logging.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from pipeline.io import atomic_write, basename, describe, exists, join, redact, scrub
from pipeline.sa1b_reader import (
    CorruptShardError,
    RecordError,
    SA1BRecord,
    ShardFormatError,
    ShardReader,
)

log = logging.getLogger("sa1b-decode")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """An input the user gave cannot be used (becomes one message and exit status 2)."""


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _progress(total: int | None, desc: str, unit: str = "shard", **kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, **kw)


def _check_inputs(paths: Sequence[str]) -> None:
    for p in paths:
        if "://" not in p and not os.path.exists(p):
            raise UsageError(f"{p}: no such file")


# ----------------------------------------------------------------------------- info


def _shard_inputs(args: argparse.Namespace, shards: Sequence[str]) -> list[tuple[str, str]]:
    """``[(url, name shown), ...]``: the shards given, or with ``--links`` those names
    (default: every shard) streamed from an SA-1B links file, shown by file name (the
    CDN's paths are opaque and its query strings secret)."""
    if args.links:
        return _shards_from_links(args.links, [basename(s) for s in shards])
    if not shards:
        raise UsageError(f"{args.command}: name the shards (or --links SA-1B_links.txt)")
    _check_inputs(shards)
    return [(url, basename(url)) for url in shards]


def cmd_info(args: argparse.Namespace) -> int:
    rows, status = [], EXIT_OK
    for url, name in _shard_inputs(args, args.shards):
        reader = ShardReader(url, load_images=False, md5=args.md5)
        anns = 0
        for rec in reader:
            try:
                anns += len(rec.annotations)
            except (RecordError, KeyError, TypeError) as e:
                reader.report.bad_records.append((f"sa_{rec.image_id}.json", str(e)))
        rep = reader.report
        rows.append({**rep.as_dict(), "shard": name, "annotations": anns})
        if not rep.ok:
            status = EXIT_PROBLEMS
    if args.json:
        print(json.dumps(rows, indent=1))
        return status
    print(f"{'shard':<20} {'comp':<5} {'images':>7} {'masks':>9} {'MB':>9} {'raw MB':>9}  status")
    for r in rows:
        st = "ok" if r["complete"] else f"INCOMPLETE ({r['error']})"
        extra = [
            f"{len(r[k])} {k.replace('_', ' ')}"
            for k in ("unpaired", "skipped", "bad_records")
            if r[k]
        ]
        if extra:
            st += "; " + ", ".join(extra)
        print(
            f"{basename(r['shard']):<20} {r['compression']:<5} {r['images']:>7} "
            f"{r['annotations']:>9} {_mb(r['compressed_bytes']):>9} "
            f"{_mb(r['uncompressed_bytes']):>9}  {st}" + (f"  md5 {r['md5']}" if r["md5"] else "")
        )
    return status


# ----------------------------------------------------------------------------- index


def _index_one(
    url: str, out: str, opts: dict[str, Any], name: str | None = None
) -> dict[str, Any]:
    from pipeline.parquet_index import index_shard

    shown = name or redact(url)
    try:
        return index_shard(url, out, name=name, **opts).as_dict()
    except (ShardFormatError, OSError) as e:
        return {"shard": shown, "complete": False, "error": scrub(str(e)), "fatal": True}
    except Exception as e:  # a defect, not bad input: still one row, the other shards go on
        # (no traceback: the messages of store clients hold whole URLs, signatures too)
        error = describe(e)
        log.error("%s: indexing failed: %s", shown, error)
        return {"shard": shown, "complete": False, "error": error, "fatal": True}


def _shards_from_links(links_url: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """``[(link, file name), ...]`` for ``names`` (default: every shard) of a links file."""
    import re

    from pipeline.download import read_links

    try:
        links = read_links(links_url)
    except FileNotFoundError:
        raise UsageError(f"{links_url}: no such file") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not names:
        names = sorted(n for n in links if re.fullmatch(r"sa_\d+\.tar", n))
    missing = [n for n in names if n not in links]
    if missing:
        raise UsageError(f"{redact(links_url)}: no link for {', '.join(missing[:5])}")
    return [(links[n], n) for n in names]


def cmd_index(args: argparse.Namespace) -> int:
    jobs: list[tuple[str, str | None]] = list(_shard_inputs(args, args.shards))
    if not args.links:  # parts named after the shard's own path
        jobs = [(url, None) for url, _ in jobs]
    opts = {
        "with_counts": args.with_counts,
        # a seek index takes a second pass over the shard: not over a CDN link
        "seek_index": not args.no_seek_index and not args.links,
        "overwrite": args.overwrite,
    }
    results = []
    with _progress(len(jobs), "index") as bar:
        if args.workers <= 1 or len(jobs) == 1:
            for url, name in jobs:
                results.append(_index_one(url, args.out, opts, name))
                bar.update(1)
        else:
            with ProcessPoolExecutor(args.workers) as pool:
                futs = [pool.submit(_index_one, u, args.out, opts, n) for u, n in jobs]
                for fut in as_completed(futs):
                    results.append(fut.result())
                    bar.update(1)
    status = EXIT_OK
    tot_img = tot_ann = 0
    for r in sorted(results, key=lambda r: r["shard"]):
        name = basename(r["shard"])
        if r.get("fatal"):
            print(f"{name}: FAILED: {r['error']}")
            status = EXIT_PROBLEMS
        elif r.get("already_indexed"):
            print(f"{name}: already indexed (skipped; --overwrite to redo)")
        else:
            tot_img += r["images"]
            tot_ann += r["annotations"]
            mbps = r["uncompressed_bytes"] / 1e6 / max(r["seconds"], 1e-9)
            st = "ok" if r["complete"] else f"INCOMPLETE, salvaged ({r['error']})"
            notes = [f"{len(r[k])} {k.replace('_', ' ')}" for k in ("bad_records", "unpaired")]
            notes = [n for n in notes if not n.startswith("0 ")]
            if notes:
                st += f" ({', '.join(notes)})"
            print(
                f"{name}: {r['images']} images, {r['annotations']} masks, "
                f"{r['seconds']:.1f}s ({mbps:.0f} MB/s), {st}"
            )
            if not r["complete"] or r["bad_records"] or r["unpaired"]:
                status = EXIT_PROBLEMS
    print(f"total: {tot_img} images, {tot_ann} masks -> {args.out}")
    return status


# ----------------------------------------------------------------------------- selection


def _parse_ids(text: str | None) -> set[int] | None:
    if not text:
        return None
    try:
        return {int(x) for x in text.replace(",", " ").split()}
    except ValueError as e:
        raise UsageError(f"--ids must be integers separated by commas: {text!r}") from e


def _seek_index_for(url: str, seek_dir: str | None) -> Any:
    from pipeline.seek_index import SeekIndex, seek_index_name

    if not seek_dir:
        return None
    p = join(seek_dir, seek_index_name(url))
    return SeekIndex.load(p) if exists(p) else None


def _records(
    urls: Sequence[str],
    ids: set[int] | None,
    seek_dir: str | None,
    load_images: bool = True,
    damaged: list[tuple[str, str]] | None = None,
    images: bool = True,
) -> Iterator[SA1BRecord]:
    """Records of ``urls`` (only ``ids`` when given; via seek indexes when found).

    A damaged shard (corrupt or truncated, or with members it could not use: a JSON or
    image without its partner, names that are no ``sa_<id>`` member) gives the records it
    could read; it is logged once and appended to ``damaged`` as ``(shard, error)`` so
    that the command can fail instead of presenting a partial result as complete.
    ``images=False``: every JSON member is a record, with or without its image."""
    for url in urls:
        idx = _seek_index_for(url, seek_dir) if ids else None
        if idx is not None:
            with idx.open(url) as ra:
                present = set(idx.image_ids())
                for i in sorted(ids & present):  # type: ignore[operator]
                    try:
                        rec = ra.get(i, load_image=load_images)
                    except RecordError as e:  # the caller reports the id as not found
                        log.error("%s", e)
                        continue
                    yield rec
            continue
        reader = ShardReader(url, load_images=load_images, images=images)
        for rec in reader:
            if ids is None or rec.image_id in ids:
                yield rec
        rep = reader.report
        if not rep.complete:
            log.error(
                "%s: damaged shard, only the %d images before the damage were read: %s",
                rep.url,
                rep.images,
                rep.error,
            )
            if damaged is not None:
                damaged.append((rep.url, rep.error or "incomplete"))
        elif rep.unpaired or rep.skipped:
            unused = [f"{m} (no partner)" for m in rep.unpaired]
            unused += [f"{name} ({why})" for name, why in rep.skipped]
            error = scrub(f"{len(unused)} members not used: {', '.join(unused[:5])}")
            log.error("%s: %s", rep.url, error)
            if damaged is not None:
                damaged.append((rep.url, error))


# ----------------------------------------------------------------------------- extract


def _write_masks_npz(rec: SA1BRecord, path: str) -> None:
    """One ``<ann id>.npy`` entry per mask, written one at a time (bounded memory)."""
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, a in enumerate(rec.annotations):
            with zf.open(f"{int(a['id'])}.npy", "w", force_zip64=True) as e:
                np.lib.format.write_array(e, rec.mask(i))


def _write_masks_png(rec: SA1BRecord, folder: str) -> None:
    """One ``<ann id>.png`` per mask, written into a temporary folder renamed to
    ``folder`` when all are in: a folder of masks is never partial."""
    from PIL import Image

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for i, a in enumerate(rec.annotations):
            path = os.path.join(tmp, f"{int(a['id'])}.png")
            Image.fromarray(rec.mask(i)).convert("1").save(path, format="PNG")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def cmd_extract(args: argparse.Namespace) -> int:
    _check_inputs(args.shards)
    ids = _parse_ids(args.ids)
    os.makedirs(args.out, exist_ok=True)
    done: set[int] = set()
    damaged: list[tuple[str, str]] = []
    bad_records = 0
    with _progress(len(ids) if ids else None, "extract", unit="image") as bar:
        for rec in _records(args.shards, ids, args.seek_dir, damaged=damaged):
            base = os.path.join(args.out, f"sa_{int(rec.image_id)}")  # never a member name
            try:  # masks first, the JSON last: an image whose masks fail leaves nothing
                if args.masks == "npz":
                    _write_masks_npz(rec, base + ".masks.npz")
                elif args.masks == "png":
                    _write_masks_png(rec, base + "_masks")
                with atomic_write(base + ".jpg") as f:
                    f.write(rec.jpeg_bytes or b"")
                with atomic_write(base + ".json") as f:
                    f.write(rec.json_bytes)
            except RecordError as e:  # names the member already
                log.error("%s", e)
                bad_records += 1
                continue
            except (KeyError, TypeError, ValueError, IndexError) as e:  # incl. a bad RLE
                log.error("%s", rec.malformed(describe(e)))
                bad_records += 1
                continue
            done.add(rec.image_id)
            bar.update(1)
    partial = f" (PARTIAL: {len(damaged)} damaged shard(s))" if damaged else ""
    print(f"extracted {len(done)} images to {args.out}{partial}")
    status = EXIT_PROBLEMS if damaged or bad_records else EXIT_OK
    if ids and ids - done:
        print(f"not found: {', '.join(str(i) for i in sorted(ids - done))}")
        status = EXIT_PROBLEMS
    return status


# ----------------------------------------------------------------------------- coco


class _Discard(Exception):
    """Raised inside an ``atomic_write`` block so that the output is not committed."""


def cmd_coco(args: argparse.Namespace) -> int:
    _check_inputs(args.shards)
    ids = _parse_ids(args.ids)
    images = []
    n_ann = 0
    damaged: list[tuple[str, str]] = []
    bad_records = 0
    try:
        with atomic_write(args.out) as f:
            n_ann, bad_records = _write_coco(args, ids, f, images, damaged)
            if damaged and not args.allow_partial:
                raise _Discard
    except _Discard:
        log.error(
            "not writing %s: %d damaged shard(s) would leave it without their images after "
            "the damage (--allow-partial writes it anyway)",
            args.out,
            len(damaged),
        )
        return EXIT_PROBLEMS
    partial = f" (PARTIAL: {len(damaged)} damaged shard(s))" if damaged else ""
    print(f"wrote {len(images)} images, {n_ann} annotations to {args.out}{partial}")
    return EXIT_PROBLEMS if damaged or bad_records else EXIT_OK


def _write_coco(
    args: argparse.Namespace,
    ids: set[int] | None,
    f: Any,
    images: list[dict[str, Any]],
    damaged: list[tuple[str, str]],
) -> tuple[int, int]:
    """Stream the COCO JSON of ``args.shards`` into ``f``; ``(annotations, bad records)``."""
    n_ann = bad = 0
    f.write(b'{"annotations": [')
    first = True
    # the JSON alone makes a COCO record: outputs written without images convert too
    recs = _records(args.shards, ids, args.seek_dir, load_images=False, damaged=damaged, images=False)
    for rec in recs:
        try:  # the whole record first: a malformed one leaves nothing behind
            image, outs = _coco_entries(rec, args.sa1b_bbox)
        except RecordError as e:
            log.error("%s", e)
            bad += 1
            continue
        except (KeyError, TypeError, ValueError) as e:
            log.error("%s", rec.malformed(describe(e)))
            bad += 1
            continue
        images.append(image)
        for out in outs:
            f.write((b"" if first else b", ") + out)
            first = False
        n_ann += len(outs)
    tail = {
        "images": images,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        "info": {"description": "SA-1B converted by sa1b-decode"},
    }
    f.write(b"], " + json.dumps(tail)[1:].encode())
    return n_ann, bad


def _coco_entries(rec: SA1BRecord, sa1b_bbox: bool) -> tuple[dict[str, Any], list[bytes]]:
    """The COCO image entry of ``rec`` and its annotations as JSON."""
    img, anns = rec.image_info, rec.annotations
    image = {
        "id": img["image_id"],
        "file_name": img["file_name"],
        "width": img["width"],
        "height": img["height"],
    }
    outs = []
    for a in anns:
        x, y, w, h = a["bbox"]
        bbox = [x, y, w, h] if sa1b_bbox else [x, y, w + 1, h + 1]
        if not sa1b_bbox and a["area"] == 0:
            bbox = [0, 0, 0, 0]
        out = {
            "id": a["id"],
            "image_id": img["image_id"],
            "category_id": 1,
            "segmentation": a["segmentation"],
            "area": a["area"],
            "bbox": bbox,
            "iscrowd": 0,
            "predicted_iou": a["predicted_iou"],
            "stability_score": a["stability_score"],
            "point_coords": a["point_coords"],
            "crop_box": a["crop_box"],
        }
        outs.append(json.dumps(out, allow_nan=False).encode())  # NaN/Infinity: not JSON
    return image, outs


# ----------------------------------------------------------------------------- show


def render_overlay(rec: SA1BRecord, *, max_masks: int = 0, alpha: float = 0.5) -> Any:
    """The image with its masks painted in distinct colours and outlined (PIL image)."""
    import cv2
    from PIL import Image

    img = rec.image().astype(np.float32)
    anns = rec.annotations
    order = sorted(range(len(anns)), key=lambda i: -anns[i]["area"])  # big first, small on top
    if max_masks:
        order = order[:max_masks]
    rng = np.random.default_rng(0)
    out = img.copy()
    edges = np.zeros(img.shape[:2], bool)
    for i in order:
        m = rec.mask(i)
        color = rng.integers(40, 256, 3).astype(np.float32)
        out[m] = out[m] * (1 - alpha) + color * alpha
        mu8 = m.astype(np.uint8)
        edges |= cv2.morphologyEx(mu8, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = 255
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def cmd_show(args: argparse.Namespace) -> int:
    _check_inputs([args.shard])
    recs = list(_records([args.shard], {args.id}, args.seek_dir))
    if not recs:
        raise UsageError(f"{args.shard}: no image {args.id}")
    try:
        im = render_overlay(recs[0], max_masks=args.max_masks)
    except RecordError:  # names the member already
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise recs[0].malformed(describe(e)) from None
    out = args.out or f"sa_{args.id}_overlay.png"
    with atomic_write(out) as f:
        im.save(f, format="PNG")
    print(f"wrote {out} ({len(recs[0].annotations)} masks)")
    return EXIT_OK


# ----------------------------------------------------------------------------- stats


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.stats import StatsError, draw_stats, index_parts, index_stats, pyplot

    try:
        if args.picture:
            pyplot()  # before reading what may be a billion masks
        parts = index_parts(args.index)
    except (StatsError, ImportError) as e:
        raise UsageError(str(e)) from None
    with _progress(len(parts[2]), "stats") as bar:
        st = index_stats(args.index, progress=lambda: bar.update(1), parts=parts)
    d = st.as_dict()
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        m, size = d["masks_per_image"], d["relative_size"]
        print(f"{redact(args.index)} ({st.layout}): {st.shards} shards, {st.images:,} images, "
              f"{st.annotations:,} masks")  # fmt: skip
        print(f"  masks per image:  mean {_fmt(m['mean'], '.1f')}, median {_fmt(m['median'], 'd')}, "
              f"p95 {_fmt(m['p95'], 'd')}, max {_fmt(m['max'], 'd')}, images without masks "
              f"{m['without_masks']}")  # fmt: skip
        print(f"  relative size:    median {_fmt(size['median'])}, p05 {_fmt(size['p05'])}, "
              f"p95 {_fmt(size['p95'])}, below 0.1: {_fmt(size['share_below_0.1'], '.1%')}")  # fmt: skip
        for key in ("predicted_iou", "stability_score"):
            q = d[key]
            print(f"  {key + ':':17} mean {_fmt(q['mean'])}, p05 {_fmt(q['p05'])}, "
                  f"median {_fmt(q['median'])}, p95 {_fmt(q['p95'])}")  # fmt: skip
        if st.damaged_shards:
            print(f"  damaged shards (what was readable is counted): {', '.join(st.damaged_shards)}")
    if args.picture:
        draw_stats(st, args.picture)
        print(f"wrote {args.picture}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_PROBLEMS if st.damaged_shards else EXIT_OK


# ----------------------------------------------------------------------------- validate


def record_problems(record: Any, *, rle: bool = True) -> list[str]:
    """Schema, consistency and RLE integrity problems of one per-image record."""
    from sam import rle as rle_ops
    from schemas import iter_schema_errors, semantic_errors

    errs = list(iter_schema_errors(record))
    if errs:
        return errs
    errs = semantic_errors(record)
    if not rle:
        return errs
    for i, a in enumerate(record["annotations"]):
        seg = a["segmentation"]
        try:
            rle_ops.validate(seg)
        except rle_ops.RLEError as e:
            errs.append(f"annotations[{i}] (id {a['id']}): {e}")
            continue
        if rle_ops.area(seg) != a["area"]:
            errs.append(f"annotations[{i}] (id {a['id']}): area {a['area']} != RLE's")
        try:
            box = [int(round(v)) for v in a["bbox"]]
        except (ValueError, OverflowError):  # NaN/Infinity: reported by semantic_errors
            continue
        if rle_ops.bbox(seg) != box:
            errs.append(f"annotations[{i}] (id {a['id']}): bbox {a['bbox']} != RLE's")
    return errs


def _validate_json_file(path: str) -> list[str]:
    from pipeline.io import open_url

    with open_url(path) as f:
        try:
            data = json.loads(f.read())
        except ValueError as e:
            return [f"not valid JSON: {e}"]
    records = data if isinstance(data, list) else [data]
    out = []
    for k, r in enumerate(records):
        prefix = f"[{k}] " if isinstance(data, list) else ""
        try:
            out += [prefix + e for e in record_problems(r)]
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            out.append(prefix + describe(e))
    return out


def _checklist(path: str | None) -> dict[str, str]:
    """The ``--md5`` checklist (``{}`` without one); an unusable one is a usage error,
    never a silently skipped check."""
    from pipeline.download import read_md5_checklist

    if path is None:
        return {}
    _check_inputs([path])
    try:
        return read_md5_checklist(path)
    except ValueError as e:
        raise UsageError(f"--md5 {e}") from None


def cmd_validate(args: argparse.Namespace) -> int:
    inputs = _shard_inputs(args, args.paths)
    md5s = _checklist(args.md5)
    status = EXIT_OK
    for url, name in inputs:
        if name.endswith(".json"):
            errs = _validate_json_file(url)
            print(f"{name}: " + ("ok" if not errs else f"{len(errs)} problem(s)"))
            for e in errs[: args.max_errors]:
                print(f"  {e}")
            status = max(status, EXIT_PROBLEMS if errs else EXIT_OK)
            continue
        reader = ShardReader(url, load_images=False, md5=bool(md5s))
        problems: list[str] = []
        n = 0
        for rec in reader:
            n += 1
            try:
                errs = record_problems(rec.data, rle=not args.no_rle)
                if rec.data["image"]["image_id"] != rec.image_id:
                    errs.append("image.image_id differs from the member name")
            except (RecordError, KeyError, TypeError, ValueError, OverflowError) as e:
                errs = [describe(e)]
            problems += [f"sa_{rec.image_id}.json: {e}" for e in errs]
        rep = reader.report
        if not rep.complete:
            problems.insert(0, f"shard incomplete after {rep.images} images: {rep.error}")
        problems += [f"{m}: has no partner" for m in rep.unpaired]
        problems += [f"{m}: skipped ({why})" for m, why in rep.skipped]
        if md5s:
            want = md5s.get(name)
            if want is None:
                problems.append("not in the md5 checklist")
            elif rep.md5 != want:
                problems.append(f"md5 {rep.md5} != checklist {want}")
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{name}: {n} images, {verdict}" + (", md5 ok" if md5s and not problems else ""))
        for p in problems[: args.max_errors]:
            print(f"  {p}")
        if problems:
            status = EXIT_PROBLEMS
    return status


# ----------------------------------------------------------------------------- download


def cmd_download(args: argparse.Namespace) -> int:
    from pipeline.download import download_all, read_links

    _check_inputs([args.links])
    try:
        links = read_links(args.links)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.only:
        want = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = want - set(links)
        if unknown:
            raise UsageError(f"not in the links file: {', '.join(sorted(unknown))}")
        links = {k: v for k, v in links.items() if k in want}
    md5s = _checklist(args.md5)
    with _progress(None, "download", unit="B", unit_scale=True) as bar:
        results, errors = download_all(
            links, args.out, md5s=md5s, workers=args.workers, progress=bar.update
        )
    for r in results:
        check = "md5 ok" if r.name in md5s else "no md5 to check"
        print(f"{r.name}: {r.status}, {_mb(r.bytes)} MB, {check}")
    for name, err in errors:
        print(f"{name}: FAILED: {err}")
    return EXIT_PROBLEMS if errors else EXIT_OK


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sa1b-decode",
        description="Read SA-1B shards (gzip tars, local, s3:// or https://) without "
        "untarring them: inspect, index to Parquet, extract, convert to COCO, "
        "draw, validate and download.",
        epilog="Exit status: 0 ok, 1 problems in the data or a storage failure, 2 bad usage "
        "or input.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    links_help = ("stream the shards from an SA-1B_links.txt (all of them, or the SHARD names "
                  "given) without storing them")
    s = sub.add_parser("info", help="images, masks, sizes and integrity of shards")
    s.add_argument(
        "shards", nargs="*", metavar="SHARD", help="shard paths or URLs (with --links: names)"
    )
    s.add_argument("--links", metavar="LINKS_TXT", help=links_help)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--md5", action="store_true", help="also compute each shard's md5")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "index",
        help="build the Parquet index (+ seek indexes)",
        description="One sequential pass per shard, no mask decoded. Writes "
        "DIR/images/<shard>.parquet, DIR/annotations/<shard>.parquet, "
        "DIR/seek/<shard>.sidx and DIR/_reports/<shard>.json. Shards already indexed "
        "completely are skipped, so re-running resumes.",
    )
    s.add_argument(
        "shards", nargs="*", metavar="SHARD", help="shard paths or URLs (with --links: names)"
    )
    s.add_argument("--out", required=True, metavar="DIR", help="index directory (or URL)")
    s.add_argument(
        "--links",
        metavar="LINKS_TXT",
        help=links_help + "; no seek index then (it needs a second pass)",
    )
    s.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    s.add_argument("--with-counts", action="store_true", help="store RLE counts strings too")
    s.add_argument("--no-seek-index", action="store_true", help="skip the seek indexes")
    s.add_argument("--overwrite", action="store_true", help="redo shards already indexed")
    s.set_defaults(func=cmd_index)

    seek_help = "directory of seek indexes (e.g. INDEX/seek) for random access"
    s = sub.add_parser("extract", help="write images, JSON and masks (PNG or NPZ)")
    s.add_argument("shards", nargs="+", metavar="SHARD")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--ids", help="only these image ids (comma separated)")
    s.add_argument("--masks", choices=["png", "npz", "none"], default="none")
    s.add_argument("--seek-dir", metavar="DIR", help=seek_help)
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("coco", help="convert to a COCO instances JSON")
    s.add_argument("shards", nargs="+", metavar="SHARD")
    s.add_argument("--out", required=True, metavar="FILE")
    s.add_argument("--ids", help="only these image ids (comma separated)")
    s.add_argument("--seek-dir", metavar="DIR", help=seek_help)
    s.add_argument(
        "--sa1b-bbox",
        action="store_true",
        help="keep SA-1B's inclusive boxes (default: COCO boxes, one pixel wider/taller)",
    )
    s.add_argument(
        "--allow-partial",
        action="store_true",
        help="write the file even when a shard is damaged (exit status is still 1)",
    )
    s.set_defaults(func=cmd_coco)

    s = sub.add_parser("show", help="draw an image's masks over it (PNG)")
    s.add_argument("shard", metavar="SHARD")
    s.add_argument("--id", type=int, required=True, help="image id")
    s.add_argument("--out", metavar="PNG", help="default sa_<id>_overlay.png")
    s.add_argument("--max-masks", type=int, default=0, help="draw only the N largest")
    s.add_argument("--seek-dir", metavar="DIR", help=seek_help)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser(
        "stats",
        help="distributions of an index: masks per image, mask size, scores (and a picture)",
        description="Reads a generation output (committed shards) or an `sa1b-decode index` "
        "folder, streaming the annotations, and prints masks per image, relative mask size "
        "sqrt(mask area / image area), predicted IoU and stability score (quantiles exact to "
        "1/1000 of each range). Exit 1 if a shard of the index is damaged.",
    )
    s.add_argument("index", metavar="INDEX", help="generation OUTPUT or index folder")
    s.add_argument("--picture", metavar="PNG", help="draw the four distributions here")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser(
        "validate",
        help="check shards or per-image JSON files",
        description="Schema, consistency (size, ids), RLE integrity (runs sum to h*w, area "
        "and bbox recomputed from the runs), member pairing, stream integrity and md5.",
    )
    s.add_argument(
        "paths", nargs="*", metavar="SHARD_OR_JSON", help="paths or URLs (with --links: names)"
    )
    s.add_argument("--links", metavar="LINKS_TXT", help=links_help)
    s.add_argument(
        "--md5", metavar="CHECKLIST", help="md5sum-format list, e.g. sa1b_md5_checklist.txt"
    )
    s.add_argument("--no-rle", action="store_true", help="skip the RLE checks (faster)")
    s.add_argument("--max-errors", type=int, default=20, help="problems printed per input")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("download", help="download shards from an SA-1B_links.txt")
    s.add_argument("links", metavar="LINKS_TXT")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--md5", metavar="CHECKLIST", help="verify against this md5 list")
    s.add_argument("--only", help="comma-separated file names to fetch (default: all)")
    s.add_argument("--workers", type=int, default=4, help="parallel downloads")
    s.set_defaults(func=cmd_download)
    return p


_INPUT_ERRNOS = {errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOENT}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as e:
        log.error("%s", scrub(str(e)))
        return EXIT_USAGE
    except ShardFormatError as e:
        log.error("%s", scrub(str(e)))
        return EXIT_USAGE
    except FileNotFoundError as e:
        log.error("%s: no such file", scrub(redact(str(e.filename or e))))
        return EXIT_USAGE
    except (CorruptShardError, RecordError, ValueError) as e:
        log.error("%s", scrub(str(e)))
        return EXIT_PROBLEMS
    except OSError as e:  # (after CorruptShardError, an OSError)
        if getattr(e, "filename", None) and e.strerror:
            log.error("%s: %s", scrub(redact(str(e.filename))), e.strerror)
        else:
            log.error("%s", describe(e))
        # a wrong input (a folder, no access) is a usage error; a failing disk or network
        # is a problem worth retrying
        return EXIT_USAGE if e.errno in _INPUT_ERRNOS else EXIT_PROBLEMS
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # a store client's error (aiohttp's ...), or a defect
        import traceback

        log.error("%s", describe(e))
        log.debug("%s", scrub("".join(traceback.format_exception(e))))  # -vv: where it came from
        return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
