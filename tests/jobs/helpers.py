"""Shared test inputs for the generation pipeline: the bundled tiny model saved as a
config + checkpoint, small images, a list file with a corrupt and a missing entry, and an
order-insensitive snapshot of an output folder."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

# The bundled tiny model (trained: about 25-30 distinct masks on each test image with a
# 4x4 grid at thresholds 0, so ids, order, RLE, boxes and snapshots compare real masks).
GENERATOR = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# Marker fields that depend on timing, worker or attempt, not on content.
VOLATILE_MARKER_KEYS = ("attempt", "worker", "seconds", "committed_at")


def write_model(folder: Path) -> tuple[str, str]:
    """``(config.json, checkpoint.pth)`` of the bundled tiny model, as a user passes a
    custom model (``--model cfg.json --checkpoint ckpt.pth``)."""
    import shutil

    from sam.config import model_config
    from sam.registry import bundled_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path = folder / "tiny.json", folder / "tiny.pth"
    if not ckpt_path.exists():
        shutil.copyfile(bundled_checkpoint("tiny"), ckpt_path)
        cfg = {k: v for k, v in model_config("tiny").items() if k != "name"}
        cfg_path.write_text(json.dumps(cfg))
    return str(cfg_path), str(ckpt_path)


def image_bytes(seed: int, h: int = 48, w: int = 64, fmt: str = "JPEG", exif=None) -> bytes:
    """A small image of a few flat rectangles on a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    kw = {"quality": 90} if fmt == "JPEG" else {}
    if exif is not None:
        kw["exif"] = exif
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def write_inputs(folder: Path, n_good: int) -> tuple[str, list[str]]:
    """``n_good`` images plus a corrupt and a missing one, listed in ``images.txt``
    (relative entries); returns the list file and its entries in order."""
    img_dir = folder / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n_good):
        name = f"img_{k:03d}.jpg" if k % 3 else f"img_{k:03d}.png"
        (img_dir / name).write_bytes(image_bytes(k, fmt="PNG" if name.endswith(".png") else "JPEG"))
        names.append(f"imgs/{name}")
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    names.insert(2, "imgs/corrupt.jpg")
    names.insert(5, "imgs/missing.jpg")
    lst = folder / "images.txt"
    lst.write_text("\n".join(names) + "\n")
    return str(lst), names


def snapshot(out: str | Path) -> dict[str, object]:
    """Content of every file of an output folder, by relative path: tar members, Parquet
    rows, marker JSON without its volatile fields. Timing-only files are left out."""
    out = Path(out)
    snap: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if rel == "_run/last_run.json":
            continue
        if rel.endswith(".tar"):
            with tarfile.open(p, "r:gz") as tf:
                members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
            snap[rel] = [(n, hashlib.sha256(b).hexdigest()) for n, b in members]
            snap[rel + "#sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif rel.endswith(".parquet"):
            snap[rel] = pq.read_table(p).to_pylist()
        elif rel.startswith("_commits/"):
            m = json.loads(p.read_text())
            snap[rel] = {k: v for k, v in m.items() if k not in VOLATILE_MARKER_KEYS}
        elif rel == "_run/manifest.json":
            m = json.loads(p.read_text())
            m.pop("created_at")
            m.pop("code_version")  # which code wrote it, not what it holds
            snap[rel] = m
        else:
            snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def tar_records(path: str | Path) -> dict[int, dict]:
    """Per-image JSON of a (gzip) tar shard by image id."""
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                rec = json.loads(tf.extractfile(m).read())
                out[rec["image"]["image_id"]] = rec
    return out


def hidden_files(out: str | Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, f), out)
        for d, _, files in os.walk(out)
        for f in files
        if f.startswith(".")
    ]
