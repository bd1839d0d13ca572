"""The shard worker: model loaded once, images read and decoded on threads, results
encoded and written on a thread, so the accelerator never waits on I/O.

:class:`ShardProcessor` is plain Python (usable and testable without Ray);
:func:`worker_actor_class` wraps it as a Ray actor. Ray gives each actor its own GPU
(``num_gpus``; ``CUDA_VISIBLE_DEVICES`` holds only that device), and the same code runs on
CPU-only actors.

Per shard the worker writes, at names derived only from the shard and image ids:
the SA-1B JSON (a gzip tar like SA-1B, or loose files), the Parquet index parts
``index/images``, ``index/annotations`` and the per-image ``index/status``, and then, last,
the commit marker. A failing image (missing, unreadable, corrupt, too large) gets a status
row and a reason and does not fail its shard.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import posixpath
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write, describe, join, list_dir, open_url, redact, remove, scrub
from pipeline.manifest import http_status, is_transient, retry_io, write_marker
from pipeline.parquet_index import IndexPartBuilder, write_index_part
from pipeline.sa1b_writer import ShardWriter, nonempty, write_image_json

__all__ = [
    "ANNOTATION_ID_STRIDE",
    "STATUS_SCHEMA",
    "ShardProcessor",
    "ShardTask",
    "WorkerConfig",
    "load_image",
    "worker_actor_class",
]

log = logging.getLogger(__name__)

# Annotation ids: image_id * stride + index of the mask in the image (consecutive per
# image, unique across the dataset, independent of worker and attempt).
ANNOTATION_ID_STRIDE = 1_000_000

STATUS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_annotations", pa.int32()),
    ]
)


@dataclass
class WorkerConfig:
    """What every worker needs; the driver builds it once per run."""

    output: str
    run_id: str
    model: str | dict = "tiny"
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    generator: dict[str, Any] = field(default_factory=dict)
    layout: str = "tar"  # "tar" (gzip tar like SA-1B) or "files" (loose per-image files)
    copy_images: bool = True
    index_counts: bool = False
    jpeg_quality: int = 95
    max_image_pixels: int = 100_000_000
    max_image_bytes: int = 256 << 20
    read_threads: int = 4
    prefetch: int = 8
    batch_images: int = 1
    torch_threads: int | None = None
    device: str | None = None  # None: the GPU Ray assigned, else CPU
    # a local folder the input lives in (None: the input is in a store); a worker that
    # does not see it is on a node without the driver's files and refuses to start
    input_folder: str | None = None


@dataclass
class ShardTask:
    shard_id: int
    name: str
    items: tuple[tuple[int, str], ...] = ()
    source: str | None = None  # an input SA-1B shard (re-annotation)
    source_name: str | None = None  # its file name where the URI is opaque (SA-1B links)
    attempt: int = 1
    # the driver's last attempt at this shard: images the generator fails on are then
    # committed as failed (recorded per image) instead of failing the shard once more
    final: bool = True


@dataclass
class _Loaded:
    image_id: int
    uri: str
    image: np.ndarray | None = None
    jpeg: bytes | None = None
    status: str = "ok"
    reason: str | None = None
    transient: bool = False  # a generator error another attempt may not meet
    records: list[dict[str, Any]] | None = None


class ImageReadError(OSError):
    """An image could not be read for a reason of the network or the store (after
    retries): its shard's attempt fails, and nothing of it is committed."""


class _ImageFailure(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ----------------------------------------------------------------------------- images


def _read_bytes(uri: str, limit: int) -> bytes:
    def read() -> bytes:
        with open_url(uri) as f:
            return f.read(limit + 1)

    try:
        data = retry_io(read, what=uri)
    except Exception as e:
        if is_transient(e):
            # the network or the store, not the image: recording it as failed would make a
            # rerun skip it for good, so the shard's attempt fails and nothing is committed
            raise ImageReadError(f"{redact(uri)}: still failing after retries: {describe(e)}") from None
        if isinstance(e, FileNotFoundError):
            status = http_status(e.__cause__) if e.__cause__ is not None else None
            if status in (401, 403):
                raise _ImageFailure("unreadable", f"access denied (HTTP {status})") from None
            raise _ImageFailure("missing", "not found") from None
        if isinstance(e, (IsADirectoryError, NotADirectoryError)):
            raise _ImageFailure("missing", "not a file") from None
        if isinstance(e, PermissionError):
            raise _ImageFailure("unreadable", f"access denied: {e}") from None
        raise _ImageFailure("unreadable", f"{type(e).__name__}: {e}") from None
    if len(data) > limit:
        raise _ImageFailure("too_large", f"more than {limit} bytes")
    return data


def _decode(data: bytes, max_pixels: int, jpeg_quality: int) -> tuple[np.ndarray, bytes]:
    """``(RGB uint8 array, JPEG bytes for the output)``; the source bytes are kept when
    they are a JPEG that needs no EXIF rotation."""
    from PIL import Image

    from sam.predictor import pil_to_rgb

    if not data:
        raise _ImageFailure("corrupt", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _ImageFailure("too_large", f"{w}x{h} px exceeds {max_pixels} px")
            fmt = im.format
            orientation = im.getexif().get(0x0112, 1)
            im.load()
            rgb = pil_to_rgb(im)
    except _ImageFailure:
        raise
    except Image.DecompressionBombError as e:
        raise _ImageFailure("too_large", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for bad files
        raise _ImageFailure("corrupt", f"{type(e).__name__}: {e}") from None
    if fmt == "JPEG" and orientation in (None, 1):
        jpeg = data
    else:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=jpeg_quality)
        jpeg = buf.getvalue()
    return rgb, jpeg


def load_image(
    image_id: int,
    uri: str,
    data: bytes | None = None,
    *,
    max_image_bytes: int = 256 << 20,
    max_image_pixels: int = 100_000_000,
    jpeg_quality: int = 95,
) -> _Loaded:
    """Read (unless ``data`` is given) and decode one image; failures become a status."""
    try:
        if data is None:
            data = _read_bytes(uri, max_image_bytes)
        elif len(data) > max_image_bytes:
            raise _ImageFailure("too_large", f"more than {max_image_bytes} bytes")
        arr, jpeg = _decode(data, max_image_pixels, jpeg_quality)
        return _Loaded(image_id, uri, arr, jpeg)
    except _ImageFailure as e:
        return _Loaded(image_id, uri, status=e.status, reason=scrub(e.reason))


def _transient(e: BaseException) -> bool:
    """Whether a generator error may well not recur on another attempt or device."""
    if isinstance(e, MemoryError):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    return any(w in text for w in ("out of memory", "outofmemory", "cuda", "cudnn", "cublas"))


def _ordered(
    calls: Iterable[Callable[[], _Loaded]], pool: ThreadPoolExecutor, window: int
) -> Iterator[_Loaded]:
    """Results of ``calls`` in order, at most ``window`` running or waiting ahead."""
    futures: deque = deque()
    for c in calls:
        futures.append(pool.submit(c))
        if len(futures) >= window:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


def _background(it: Iterable[Any], maxsize: int) -> Iterator[Any]:
    """Iterate ``it`` on a thread (e.g. inflating a tar) with a bounded buffer.

    When the consumer stops early (closes this generator), the thread stops at its next
    item, closes the source iterator (releasing e.g. an open shard stream) and exits: it
    never blocks on a queue nobody reads.
    """
    q: queue.Queue = queue.Queue(maxsize)
    done = object()
    stop = threading.Event()
    err: list[BaseException] = []

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        source: Any = None
        try:
            source = iter(it)
            for x in source:
                if not put(x):
                    return
        except BaseException as e:  # re-raised in the consumer
            err.append(e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:  # a failing close must not hide the real outcome
                    log.debug("closing the background source failed: %s", e)
            put(done)

    t = threading.Thread(target=run, name="sa1b-shard-reader", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                break
            yield x
        if err:
            raise err[0]
    finally:
        stop.set()


# ----------------------------------------------------------------------------- writing


_LOOSE_FILE = re.compile(r"sa_\d+\.(json|jpg)")


class _ShardOutput:
    """Writes one shard's SA-1B JSON (+ images), index parts and status rows."""

    def __init__(self, cfg: WorkerConfig, task: ShardTask):
        self.cfg = cfg
        self.task = task
        self.builder = IndexPartBuilder(task.name, with_counts=cfg.index_counts)
        self.status: dict[str, list] = {f.name: [] for f in STATUS_SCHEMA}
        self.files: list[str] = []
        self.images_ok = 0
        self.annotations = 0
        self.failures: list[dict[str, Any]] = []
        self._tar: ShardWriter | None = None

    # -- lifecycle
    def remove_stale_temps(self) -> None:
        """Delete the hidden temp files an earlier, killed attempt at this shard left
        behind (local outputs only; object stores have no temp files)."""
        from pipeline.io import is_local

        if not is_local(self.cfg.output):
            return
        root = self.cfg.output.removeprefix("file://")
        name = self.task.name
        dirs = [
            root,
            *(os.path.join(root, "index", d) for d in ("images", "annotations", "status")),
        ]
        pats = [os.path.join(d, f".{name}.*.tmp-*") for d in dirs]
        pats += [
            os.path.join(root, "_commits", f".{name}.json.tmp-*"),
            os.path.join(root, name, ".*.tmp-*"),
        ]
        for pat in pats:
            for path in glob.glob(pat):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    log.info("removed %s left by an earlier attempt", os.path.basename(path))

    def remove_stale_files(self) -> None:
        """Loose layout: delete the ``sa_<id>.json/.jpg`` an earlier, killed attempt at
        this shard wrote for images that this attempt did not write (they failed now),
        so the folder holds exactly what the status index calls ok."""
        folder = join(self.cfg.output, self.task.name)
        written = set(self.files)
        for url in retry_io(lambda: list_dir(folder), what=folder):
            name = posixpath.basename(url.rstrip("/"))
            if _LOOSE_FILE.fullmatch(name) and f"{self.task.name}/{name}" not in written:
                retry_io(lambda url=url: remove(url), what=url)
                log.info("removed %s/%s left by an earlier attempt", self.task.name, name)

    def open(self) -> None:
        self.remove_stale_temps()
        if self.cfg.layout == "tar":
            url = join(self.cfg.output, f"{self.task.name}.tar")
            self._tar = ShardWriter(url)
            self._tar.__enter__()
            self.files.append(f"{self.task.name}.tar")

    def abort(self, exc: BaseException) -> None:
        """Discard the partial tar (its temp file, or the unfinished upload)."""
        if self._tar is not None:
            tar, self._tar = self._tar, None
            with contextlib.suppress(BaseException):  # re-raises exc after cleaning up
                tar.__exit__(type(exc), exc, exc.__traceback__)

    def close(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.__exit__(None, None, None)
        if self.cfg.layout == "files":
            self.remove_stale_files()
        index_dir = join(self.cfg.output, "index")
        images_t, anns_t = self.builder.tables()
        retry_io(
            lambda: write_index_part(index_dir, self.task.name, images_t, anns_t),
            what=join(index_dir, self.task.name),
        )
        status_t = pa.Table.from_pydict(self.status, schema=STATUS_SCHEMA)
        url = join(index_dir, "status", f"{self.task.name}.parquet")

        def write_status() -> None:
            with atomic_write(url) as f:
                pq.write_table(status_t, f, compression="zstd")

        retry_io(write_status, what=url)
        self.files += [
            f"index/annotations/{self.task.name}.parquet",
            f"index/images/{self.task.name}.parquet",
            f"index/status/{self.task.name}.parquet",
        ]

    # -- per image
    def _status_row(self, it: _Loaded, n: int | None) -> None:
        shape = it.image.shape if it.image is not None else None
        row = {
            "image_id": it.image_id,
            "uri": redact(it.uri),
            "shard": self.task.name,
            "status": it.status,
            "reason": it.reason,
            "width": int(shape[1]) if shape else None,
            "height": int(shape[0]) if shape else None,
            "num_annotations": n,
        }
        for k, v in row.items():
            self.status[k].append(v)

    def add(self, it: _Loaded) -> None:
        if it.status != "ok":
            self.failures.append(
                {
                    "image_id": it.image_id,
                    "uri": redact(it.uri),
                    "status": it.status,
                    "reason": it.reason,
                }
            )
            self._status_row(it, None)
            return
        assert it.image is not None and it.records is not None
        h, w = it.image.shape[:2]
        records = nonempty(it.records)
        if it.image_id * ANNOTATION_ID_STRIDE + len(records) >= 2**63:
            raise ValueError(f"image id {it.image_id} is too large for annotation ids")
        anns = []
        for j, r in enumerate(records):
            a = dict(r)
            a["id"] = it.image_id * ANNOTATION_ID_STRIDE + j
            anns.append(a)
        record = {
            "image": {
                "image_id": it.image_id,
                "width": w,
                "height": h,
                "file_name": f"sa_{it.image_id}.jpg",
            },
            "annotations": anns,
        }
        js = write_image_json(record)
        jpg_loc = json_loc = None
        if self._tar is not None:
            if self.cfg.copy_images:
                jpg_loc = self._tar.add_member(f"./sa_{it.image_id}.jpg", it.jpeg or b"")
            json_loc = self._tar.add_member(f"./sa_{it.image_id}.json", js)
        else:
            folder = join(self.cfg.output, self.task.name)
            if self.cfg.copy_images:
                jurl = join(folder, f"sa_{it.image_id}.jpg")
                jpeg = it.jpeg or b""
                retry_io(lambda: _write(jurl, jpeg), what=jurl)
                self.files.append(f"{self.task.name}/sa_{it.image_id}.jpg")
            url = join(folder, f"sa_{it.image_id}.json")
            retry_io(lambda: _write(url, js), what=url)
            self.files.append(f"{self.task.name}/sa_{it.image_id}.json")
        self.builder.add_record(record, jpg=jpg_loc, json_loc=json_loc)
        self._status_row(it, len(anns))
        self.images_ok += 1
        self.annotations += len(anns)


def _write(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
        f.write(data)


class _Writer:
    """Runs a :class:`_ShardOutput` on its own thread, fed through a bounded queue."""

    _END = object()

    def __init__(self, out: _ShardOutput, maxsize: int):
        self.out = out
        self.q: queue.Queue = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, name="sa1b-shard-writer", daemon=True)
        self.t.start()

    def _run(self) -> None:
        ended = False
        try:
            self.out.open()
            while True:
                it = self.q.get()
                if it is self._END or isinstance(it, BaseException):
                    ended = True
                    if isinstance(it, BaseException):
                        raise it
                    break
                self.out.add(it)
            self.out.close()
        except BaseException as e:
            self.error = e
            self.out.abort(e)
            while not ended:  # drain until the producer's last item, so it never blocks
                it = self.q.get()
                ended = it is self._END or isinstance(it, BaseException)

    def put(self, it: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(it, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(self._END)
        self.t.join()
        if self.error is not None:
            raise self.error

    def cancel(self, exc: BaseException) -> None:
        while self.t.is_alive():
            try:
                self.q.put(exc, timeout=0.5)
                break
            except queue.Full:
                continue
        self.t.join()


# ----------------------------------------------------------------------------- processor


class _Progress:
    """Throttled, fire-and-forget progress notes to a Ray counter actor."""

    def __init__(self, counter: Any, shard: str, attempt: int, every: float = 0.5):
        self.counter = counter
        self.key = (shard, attempt)
        self.every = every
        self.images = self.masks = 0
        self.t = time.monotonic()
        if counter is not None:
            counter.started.remote(shard, attempt)

    def add(self, images: int, masks: int) -> None:
        self.images += images
        self.masks += masks
        if time.monotonic() - self.t >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.counter is not None and (self.images or self.masks):
            self.counter.add.remote(*self.key, self.images, self.masks)
        self.images = self.masks = 0
        self.t = time.monotonic()


class ShardProcessor:
    """Loads the model once; :meth:`process` turns one shard task into committed output."""

    def __init__(self, cfg: WorkerConfig):
        import torch

        from sam import build_sam
        from sam.amg import SamAutomaticMaskGenerator

        self.cfg = cfg
        if cfg.torch_threads:
            torch.set_num_threads(int(cfg.torch_threads))
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._verify_checkpoint()
        t = time.perf_counter()
        self.model = build_sam(cfg.model, cfg.checkpoint, device=self.device)
        gen = {k: v for k, v in cfg.generator.items() if k != "output_mode"}
        self.generator = SamAutomaticMaskGenerator(self.model, **gen, output_mode="coco_rle")
        log.info("model loaded on %s in %.1fs", self.device, time.perf_counter() - t)

    def _verify_checkpoint(self) -> None:
        """The checkpoint this worker loads must be the one the manifest records."""
        if not self.cfg.checkpoint_sha256:
            return
        from sam.checkpoint import CheckpointError, file_digest
        from sam.registry import bundled_checkpoint

        url = self.cfg.checkpoint
        if url is None and isinstance(self.cfg.model, str):
            from sam.config import model_config

            b = bundled_checkpoint(model_config(self.cfg.model)["name"])
            url = str(b) if b is not None else None
        if url is None:
            return
        digest = file_digest(url, "sha256")
        if digest != self.cfg.checkpoint_sha256:
            raise CheckpointError(
                f"checkpoint {redact(url)}: sha256 {digest[:12]} on this worker differs from the "
                f"run's {self.cfg.checkpoint_sha256[:12]}; the file changed during the run"
            )

    # -- input
    def _inputs(self, task: ShardTask, pool: ThreadPoolExecutor, report: dict) -> Iterator[_Loaded]:
        cfg = self.cfg
        opts = {
            "max_image_bytes": cfg.max_image_bytes,
            "max_image_pixels": cfg.max_image_pixels,
            "jpeg_quality": cfg.jpeg_quality,
        }
        if task.source is None:
            calls = ((lambda i=i, u=u: load_image(i, u, **opts)) for i, u in task.items)
            yield from _ordered(calls, pool, cfg.prefetch)
            return
        from pipeline.sa1b_reader import ShardReader

        reader = ShardReader(task.source, load_images=True)
        shown = task.source_name or redact(task.source)

        def calls_of_shard() -> Iterator[Callable[[], _Loaded]]:
            for rec in _background(reader, cfg.prefetch):
                uri = f"{shown}#sa_{rec.image_id}.jpg"
                yield lambda rec=rec, uri=uri: load_image(
                    rec.image_id, uri, rec.jpeg_bytes or b"", **opts
                )

        yield from _ordered(calls_of_shard(), pool, cfg.prefetch)
        rep = reader.report
        if not rep.complete and rep.read_failure:
            # the shard could not be read to its end (network, storage): not a property of
            # the input, so nothing is committed and the driver runs the shard again
            raise OSError(f"{shown}: reading failed: {rep.error}")
        problems = []
        if not rep.complete:
            problems.append(rep.error or "incomplete")
        if rep.unpaired:
            problems.append(f"unpaired members: {', '.join(rep.unpaired[:10])}")
        if rep.skipped:  # not sa_<id> members, unsafe names, oversized or duplicate ones
            shown_skips = ", ".join(f"{n} ({why})" for n, why in rep.skipped[:5])
            problems.append(f"{len(rep.skipped)} members skipped: {shown_skips}")
        if problems:
            report["input_error"] = scrub("; ".join(problems))

    # -- generation
    def _generate(self, batch: list[_Loaded]) -> int:
        """Fill ``records`` of the loaded images of ``batch``; returns generator errors."""
        ok = [it for it in batch if it.status == "ok"]
        if not ok:
            return 0
        try:
            results = self.generator.generate_batch([it.image for it in ok])
            for it, recs in zip(ok, results):
                it.records = recs
            return 0
        except Exception as e:
            if len(ok) > 1:  # find the image at fault
                return sum(self._generate([it]) for it in ok)
            self._free_device_memory()
            it = ok[0]
            it.status, it.reason = "error", scrub(f"generator: {type(e).__name__}: {e}")
            it.transient = _transient(e)
            log.warning("image %d (%s): %s", it.image_id, redact(it.uri), it.reason)
            return 1

    def _free_device_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def process(self, task: ShardTask, progress: Any = None) -> dict[str, Any]:
        """Write every output of ``task`` and then its commit marker; returns the marker."""
        cfg = self.cfg
        t0 = time.perf_counter()
        report: dict[str, Any] = {"input_error": None}
        out = _ShardOutput(cfg, task)
        writer = _Writer(out, cfg.prefetch)
        prog = _Progress(progress, task.name, task.attempt)
        gen_errors = generated = transient = unreadable = 0
        first_error: list[str | None] = []
        first_unreadable: list[str] = []
        try:
            with ThreadPoolExecutor(
                max(1, cfg.read_threads), thread_name_prefix="sa1b-read"
            ) as pool:
                batch: list[_Loaded] = []

                def flush() -> None:
                    nonlocal gen_errors, generated, transient, unreadable
                    generated += sum(it.status == "ok" for it in batch)
                    gen_errors += self._generate(batch)
                    for it in batch:
                        transient += it.transient
                        if it.status == "error" and not first_error:
                            first_error.append(it.reason)
                        if it.status == "unreadable":
                            unreadable += 1
                            if not first_unreadable:
                                first_unreadable.append(f"{redact(it.uri)}: {it.reason}")
                        writer.put(it)
                        prog.add(1, len(it.records or ()))
                    batch.clear()

                for it in self._inputs(task, pool, report):
                    batch.append(it)
                    if sum(b.status == "ok" for b in batch) >= cfg.batch_images:
                        flush()
                flush()
                if task.source is None and task.items and unreadable == len(task.items):
                    # no image could be read (expired credentials, a bucket denied): more
                    # likely the run's access than every image, so nothing is committed
                    raise RuntimeError(
                        f"{task.name}: none of its {unreadable} images could be read; "
                        f"first: {first_unreadable[0]}"
                    )
                if (transient and not task.final) or (gen_errors and gen_errors == generated):
                    # nothing of this attempt is committed: a transient failure (out of
                    # memory, a GPU error) gets another chance, on another worker
                    what = "every image" if gen_errors == generated else f"{gen_errors} images"
                    raise RuntimeError(
                        f"{task.name}: the generator failed on {what} "
                        f"({gen_errors} of {generated}); first: {first_error[0]}"
                    )
            writer.finish()
        except BaseException as e:
            writer.cancel(e)
            raise
        finally:
            prog.flush()
        marker = {
            "shard": task.name,
            "shard_id": task.shard_id,
            "run_id": cfg.run_id,
            "layout": cfg.layout,
            "source": redact(task.source) if task.source else None,
            "source_name": task.source_name,
            "images_planned": None if task.source else len(task.items),
            "images_ok": out.images_ok,
            "images_failed": len(out.failures),
            "generator_errors": gen_errors,  # of images_failed, after the last attempt
            "annotations": out.annotations,
            "failures": out.failures,
            "input_error": report["input_error"],
            "files": sorted(out.files),
            "attempt": task.attempt,
            "worker": self.describe(),
            "seconds": round(time.perf_counter() - t0, 3),
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_marker(cfg.output, task.name, marker)  # LAST: the shard is now committed
        return marker

    def describe(self) -> dict[str, Any]:
        import socket

        info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
        }
        try:
            import ray

            if ray.is_initialized():
                info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
                info["node_id"] = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return info


# ----------------------------------------------------------------------------- Ray


def _check_output_visible(out: str) -> None:
    """The driver records the run's manifest before any worker starts: a worker that
    cannot see it writes where the driver never looks (a local folder on another node of
    a cluster), so it refuses to start."""
    import socket

    from pipeline.io import exists
    from pipeline.manifest import RUN_DIR, manifest_url

    url = manifest_url(out)
    if not retry_io(lambda: exists(url), what=url):
        raise RuntimeError(
            f"output {redact(out)}: the run's {RUN_DIR}/manifest.json is not visible on this "
            f"worker's node ({socket.gethostname()}); on a cluster of several nodes the "
            "output must be shared storage (s3://..., or a folder every node mounts)"
        )


def _check_input_visible(folder: str | None) -> None:
    """A local input read on another node of a cluster: every image would be recorded
    as missing; the worker refuses to start instead, naming the folder and the node."""
    if folder is None or os.path.isdir(folder):
        return
    import socket

    raise RuntimeError(
        f"input folder {folder} is not visible on this worker's node "
        f"({socket.gethostname()}); on a cluster of several nodes the input must be "
        "shared storage (s3://..., https://..., or a folder every node mounts)"
    )


class ShardWorker:
    """Ray actor body: one per GPU (or per CPU slot), model loaded once."""

    def __init__(self, cfg: WorkerConfig, log_level: int = logging.INFO):
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        import ray

        gpu_ids = ray.get_gpu_ids()
        if cfg.device is None:
            import torch

            cfg.device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        _check_output_visible(cfg.output)
        _check_input_visible(cfg.input_folder)
        self.processor = ShardProcessor(cfg)

    def info(self) -> dict[str, Any]:
        import ray

        return {
            **self.processor.describe(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def process_shard(self, task: ShardTask, progress: Any = None) -> dict[str, Any]:
        return self.processor.process(task, progress)


class ProgressCounter:
    """Ray actor collecting progress notes from workers: images and masks per shard
    attempt, and the attempts that started."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], list[int]] = {}
        self.started_keys: set[tuple[str, int]] = set()

    def started(self, shard: str, attempt: int) -> None:
        self.started_keys.add((shard, attempt))

    def add(self, shard: str, attempt: int, images: int, masks: int) -> None:
        c = self.counts.setdefault((shard, attempt), [0, 0])
        c[0] += images
        c[1] += masks

    def take(self) -> tuple[dict[tuple[str, int], list[int]], list[tuple[str, int]]]:
        """``({(shard, attempt): [images, masks]} since the last call, started attempts)``."""
        out, self.counts = self.counts, {}
        return out, sorted(self.started_keys)


_ACTOR_CLASSES: dict[str, Any] = {}


def worker_actor_class() -> Any:
    """``ShardWorker`` as a Ray actor class (Ray imported only when needed)."""
    if "worker" not in _ACTOR_CLASSES:
        import ray

        _ACTOR_CLASSES["worker"] = ray.remote(max_restarts=0, max_task_retries=0)(ShardWorker)
    return _ACTOR_CLASSES["worker"]


def progress_actor_class() -> Any:
    if "progress" not in _ACTOR_CLASSES:
        import ray

        _ACTOR_CLASSES["progress"] = ray.remote(num_cpus=0, max_restarts=-1)(ProgressCounter)
    return _ACTOR_CLASSES["progress"]
