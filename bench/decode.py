"""Benchmark: indexing and random access of an SA-1B-like shard, against the naive loop.

    python bench/decode.py                      # 40 images of 1500x2250, ~100 masks each
    python bench/decode.py --images 300         # closer to a real shard's density

Builds a synthetic shard (gzip tar, members in random order, like SA-1B), then measures
in one run, each phase in a fresh process so its peak RSS is its own:

* naive: tarfile + json + pycocotools decode of every annotation (what people do today);
* ours: the Parquet index pass (no mask decoded) with every inflate backend available;
* the seek index build (inflate checkpoints);
* the time to fetch one image by id with the seek index and by scanning without it;
* the streaming reader pairing jpg+json with a small memory bound (spills to disk).

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(q, fn, args):
    # imports are not what we time
    import indexed_gzip  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import pycocotools.mask  # noqa: F401

    import pipeline.parquet_index  # noqa: F401
    import pipeline.seek_index  # noqa: F401

    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put((out, dt, rss_mb))


def run_isolated(fn, *args):
    """``(result, seconds, peak RSS MB)`` of ``fn(*args)`` in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    res = q.get()
    p.join()
    return res


# ------------------------------------------------------------------ phases (child side)


def make_shard(path, n, h, w, masks, seed):
    from pipeline.sa1b_writer import ShardWriter, write_image_json
    from pipeline.synthetic import iter_synthetic

    members = []
    for image_id, jpeg, rec in iter_synthetic(
        n, h=h, w=w, masks=masks, seed=seed, first_id=1_000_001, jpeg_variants=6
    ):
        members.append((f"./sa_{image_id}.jpg", jpeg))
        members.append((f"./sa_{image_id}.json", write_image_json(rec)))
    random.Random(seed).shuffle(members)
    with ShardWriter(path, member_prefix="") as wr:
        for name, data in members:
            wr.add_member(name, data)
    last_json = max((i for i, (n_, _) in enumerate(members) if n_.endswith(".json")), default=0)
    return int(members[last_json][0][5:-5])  # an image whose json comes late


def naive(path):
    import json
    import tarfile

    from pycocotools import mask as mask_api

    images = anns = 0
    raw = 0
    with tarfile.open(path, "r:gz") as tf:
        for m in tf:
            data = tf.extractfile(m).read()
            raw += len(data)
            if m.name.endswith(".json"):
                rec = json.loads(data)
                images += 1
                for a in rec["annotations"]:
                    seg = a["segmentation"]
                    mask_api.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                    anns += 1
    return images, anns, raw


def ours_index(path, out, backend):
    from pipeline.parquet_index import index_shard

    r = index_shard(path, out, seek_index=False, backend=backend, overwrite=True)
    assert r.report.complete
    return r.images, r.annotations, r.report.uncompressed_bytes


def ours_seek(path, out):
    from pipeline.seek_index import build_seek_index

    idx = build_seek_index(path)
    idx.save(os.path.join(out, "x.sidx"))
    return len(idx.checkpoints)


def fetch_with_index(path, out, image_id):
    from pipeline.seek_index import SeekIndex

    idx = SeekIndex.load(os.path.join(out, "x.sidx"))
    t0 = time.perf_counter()
    with idx.open(path) as ra:
        rec = ra.get(image_id)
        n = len(rec.annotations)
    return n, time.perf_counter() - t0


def fetch_by_scan(path, image_id):
    from pipeline.seek_index import find_record_by_scan

    t0 = time.perf_counter()
    rec = find_record_by_scan(path, image_id)
    return len(rec.annotations), time.perf_counter() - t0


def inflate_only(path):
    """Raw gzip inflate MB/s of each backend on the shard (best of 2)."""
    from pipeline.sa1b_reader import _backend, inflate_backends

    data = open(path, "rb").read()
    out = {}
    for name in inflate_backends():
        mod, best = _backend(name), 0.0
        for _ in range(2):
            t0, n = time.perf_counter(), 0
            d = mod.decompressobj(wbits=31)
            for i in range(0, len(data), 1 << 20):
                n += len(d.decompress(data[i : i + (1 << 20)]))
            best = max(best, n / 1e6 / (time.perf_counter() - t0))
        out[name] = best
    return out


def stream_records(path, max_pending):
    from pipeline.sa1b_reader import ShardReader

    r = ShardReader(path, max_pending_bytes=max_pending)
    n = 0
    for rec in r:
        n += len(rec.jpeg_bytes) > 0
    return n, r.spilled_bytes


# ------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--width", type=int, default=2250)
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to build the shard (default: a temp dir)")
    args = ap.parse_args()

    from pipeline.sa1b_reader import inflate_backends

    work = args.workdir or tempfile.mkdtemp(prefix="sa1b-bench-")
    os.makedirs(work, exist_ok=True)
    shard = os.path.join(work, "sa_000000.tar")
    out = os.path.join(work, "index")
    try:
        t0 = time.perf_counter()
        target, _, _ = run_isolated(
            make_shard, shard, args.images, args.height, args.width, args.masks, args.seed
        )
        size = os.path.getsize(shard)
        print(
            f"shard: {args.images} images {args.width}x{args.height}, {args.masks} masks each, "
            f"{size / 1e6:.1f} MB gzip (built in {time.perf_counter() - t0:.1f}s)"
        )

        (imgs, anns, raw), t_naive, rss_naive = run_isolated(naive, shard)
        raw_mb = raw / 1e6
        print(
            f"\nnaive loop (tarfile+json+pycocotools decode): {t_naive:6.2f}s  "
            f"{raw_mb / t_naive:7.1f} MB/s  {imgs / t_naive:8.1f} img/s  peak RSS {rss_naive:5.0f} MB"
        )
        speeds, _, _ = run_isolated(inflate_only, shard)
        print(
            "inflate only: "
            + ", ".join(f"{k} {v:.0f} MB/s (x{v / speeds['zlib']:.2f})" for k, v in speeds.items())
        )
        best = None
        for be in inflate_backends():
            (imgs2, anns2, raw2), t, rss = run_isolated(ours_index, shard, out, be)
            assert (imgs2, anns2) == (imgs, anns), (imgs2, anns2, imgs, anns)
            print(
                f"ours: Parquet index, inflate={be:<8}       {t:6.2f}s  "
                f"{raw2 / 1e6 / t:7.1f} MB/s  {imgs2 / t:8.1f} img/s  peak RSS {rss:5.0f} MB"
                f"   x{t_naive / t:5.1f} vs naive"
            )
            if best is None or t < best[1]:
                best = (be, t)
        npoints_bytes, t_seek, rss_seek = run_isolated(ours_seek, shard, out)
        print(
            f"ours: seek index build (member table + checkpoints): {t_seek:6.2f}s  "
            f"peak RSS {rss_seek:5.0f} MB  ({npoints_bytes / 1e6:.1f} MB of checkpoints)"
        )
        (_, t_idx), _, rss_f = run_isolated(fetch_with_index, shard, out, target)
        (_, t_scan), _, rss_s = run_isolated(fetch_by_scan, shard, target)
        print(
            f"\nfetch image {target} by id: with seek index {t_idx * 1e3:7.1f} ms "
            f"(RSS {rss_f:.0f} MB), by scanning {t_scan * 1e3:7.1f} ms (RSS {rss_s:.0f} MB)"
            f"  -> x{t_scan / t_idx:.0f}"
        )
        (n, spilled), t_stream, rss_stream = run_isolated(stream_records, shard, 4 << 20)
        print(
            f"streaming reader (jpg+json paired, 4 MiB pending bound): {n} records in "
            f"{t_stream:.2f}s, spilled {spilled / 1e6:.1f} MB, peak RSS {rss_stream:.0f} MB"
        )
        print(
            f"\nfastest index pass here: {best[0]}; "
            f"fastest raw inflate: {max(speeds, key=speeds.get)}"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
