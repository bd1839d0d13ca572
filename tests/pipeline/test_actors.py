"""The shard worker without Ray: outputs of one shard against the generator run directly,
failing images recorded, re-annotation of SA-1B shards, loose-file layout."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.actors import ANNOTATION_ID_STRIDE, ShardProcessor, ShardTask, WorkerConfig
from pipeline.driver import resolve_generator_settings
from pipeline.sa1b_reader import ShardReader
from tests.jobs.helpers import GENERATOR, hidden_files, image_bytes, tar_records, write_model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model"))


def _config(out, model_files, **kw):
    cfg_json, ckpt = model_files
    with open(cfg_json) as f:
        model = json.load(f)
    settings = resolve_generator_settings("default", GENERATOR)
    base = {"torch_threads": 1, "device": "cpu", "read_threads": 2, "prefetch": 3}
    return WorkerConfig(
        output=str(out), run_id="test", model=model, checkpoint=ckpt, generator=settings,
        **{**base, **kw},
    )  # fmt: skip


def _expected(processor, data: bytes):
    """What the generator itself says for an image (decoded independently)."""
    from sam import build_sam
    from sam.amg import SamAutomaticMaskGenerator

    cfg = processor.cfg
    model = build_sam(cfg.model, cfg.checkpoint)
    gen = SamAutomaticMaskGenerator(model, **cfg.generator, output_mode="coco_rle")
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return img.shape[:2], gen.generate(img)


def test_shard_outputs_match_the_generator_and_failures_are_recorded(tmp_path, model_files):
    src = tmp_path / "src"
    src.mkdir()
    good = {1: image_bytes(1), 2: image_bytes(2, fmt="PNG"), 6: image_bytes(6, h=40, w=30)}
    for i, data in good.items():
        (src / f"{i}.img").write_bytes(data)
    (src / "3.img").write_bytes(b"garbage, not an image")
    (src / "4.img").write_bytes(b"")
    (src / "5.img").write_bytes(image_bytes(5, h=120, w=100))  # over the pixel limit below
    items = tuple((i, str(src / f"{i}.img")) for i in range(1, 8))  # 7 does not exist
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files, max_image_pixels=100 * 100))
    marker = proc.process(ShardTask(3, "sa_000003", items))

    assert (marker["images_ok"], marker["images_failed"]) == (3, 4)
    statuses = {f["image_id"]: f["status"] for f in marker["failures"]}
    assert statuses == {3: "corrupt", 4: "corrupt", 5: "too_large", 7: "missing"}
    assert json.loads((out / "_commits" / "sa_000003.json").read_text())["images_ok"] == 3

    recs = tar_records(out / "sa_000003.tar")
    assert sorted(recs) == [1, 2, 6]
    total = 0
    for i, data in good.items():
        (h, w), expected = _expected(proc, data)
        rec = recs[i]
        assert rec["image"] == {"image_id": i, "width": w, "height": h, "file_name": f"sa_{i}.jpg"}
        got = rec["annotations"]
        assert [a["id"] for a in got] == [i * ANNOTATION_ID_STRIDE + j for j in range(len(got))]
        for a, e in zip(got, expected):
            assert a["segmentation"] == e["segmentation"]
            assert a["bbox"] == e["bbox"] and a["area"] == e["area"]
            assert a["point_coords"] == e["point_coords"] and a["crop_box"] == e["crop_box"]
            assert a["predicted_iou"] == pytest.approx(e["predicted_iou"], abs=0)
        assert len(got) == len(expected) > 0
        assert len({a["segmentation"]["counts"] for a in got}) >= 10  # real masks, no blob
        total += len(got)
    assert marker["annotations"] == total

    # the SA-1B reader pairs every image with its JSON; JPEG bytes are copied verbatim
    reader = ShardReader(str(out / "sa_000003.tar"))
    by_id = {r.image_id: r for r in reader}
    assert reader.report.ok and sorted(by_id) == [1, 2, 6]
    assert by_id[1].jpeg_bytes == good[1]
    assert Image.open(io.BytesIO(by_id[2].jpeg_bytes)).format == "JPEG"  # PNG re-encoded

    images = pd.read_parquet(out / "index" / "images")
    anns = pd.read_parquet(out / "index" / "annotations")
    status = pd.read_parquet(out / "index" / "status").set_index("image_id")
    assert sorted(images.image_id) == [1, 2, 6] and len(anns) == total
    assert set(anns.id) == {a["id"] for r in recs.values() for a in r["annotations"]}
    row = images.set_index("image_id").loc[6]
    assert (row.jpg_offset, row.json_offset) == (by_id[6].jpg_offset, by_id[6].json_offset)
    assert list(status.index) == list(range(1, 8))
    assert status.loc[7, "status"] == "missing" and status.loc[7, "reason"] == "not found"
    assert status.loc[5, "status"] == "too_large" and "100x120 px" in status.loc[5, "reason"]
    assert status.loc[1, "status"] == "ok" and status.loc[1, "num_annotations"] == len(
        recs[1]["annotations"]
    )
    assert hidden_files(out) == []


def test_exif_rotated_jpeg_is_annotated_upright(tmp_path, model_files):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    data = image_bytes(3, h=40, w=64, exif=exif)
    (tmp_path / "r.jpg").write_bytes(data)
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files))
    proc.process(ShardTask(0, "sa_000000", ((1, str(tmp_path / "r.jpg")),)))
    rec = tar_records(out / "sa_000000.tar")[1]
    assert (rec["image"]["width"], rec["image"]["height"]) == (40, 64)
    stored = next(iter(ShardReader(str(out / "sa_000000.tar")))).jpeg_bytes
    assert stored != data and Image.open(io.BytesIO(stored)).size == (40, 64)


def test_reannotation_keeps_shard_and_image_ids(tmp_path, model_files):
    from pipeline.sa1b_writer import ShardWriter

    src = tmp_path / "sa_000042.tar"
    with ShardWriter(str(src)) as w:
        for i in (1001, 77):
            w.add(i, image_bytes(i), {"image": {"image_id": i}, "annotations": []})
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files))
    marker = proc.process(ShardTask(42, "sa_000042", source=str(src)))
    assert marker["images_ok"] == 2 and marker["input_error"] is None
    recs = tar_records(out / "sa_000042.tar")
    assert sorted(recs) == [77, 1001]
    assert all(len(r["annotations"]) > 0 for r in recs.values())
    assert recs[77]["annotations"][0]["id"] == 77 * ANNOTATION_ID_STRIDE


def test_reannotation_streams_a_shard_from_an_sa1b_links_file(tmp_path, model_files, http_server):
    """A links file's shard is read from its signed link (an opaque path, as SA-1B's CDN
    gives), named by its file_name, and the signature is written nowhere."""
    from pipeline.plan import build_plan
    from pipeline.sa1b_writer import ShardWriter

    base, www, _ = http_server
    with ShardWriter(str(www / "An8MNcSV8eixKBYJ2.tar")) as w:
        for i in (5, 6):
            w.add(i, image_bytes(i), {"image": {"image_id": i}, "annotations": []})
    links = tmp_path / "SA-1B_links.txt"
    links.write_text(
        "file_name\tcdn_link\n"
        f"sa_000009.tar\t{base}/An8MNcSV8eixKBYJ2.tar?ccb=10-5&oh=SECRET&oe=1\n"
    )
    (spec,) = build_plan(str(links)).shards
    out = tmp_path / "out"
    marker = ShardProcessor(_config(out, model_files)).process(
        ShardTask(spec.shard_id, spec.name, source=spec.source, source_name=spec.source_name)
    )
    assert marker["images_ok"] == 2 and marker["input_error"] is None
    assert marker["source_name"] == "sa_000009.tar" and "SECRET" not in json.dumps(marker)
    recs = tar_records(out / "sa_000009.tar")
    assert sorted(recs) == [5, 6] and all(r["annotations"] for r in recs.values())
    assert not [p for p in out.rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()]


def test_truncated_input_shard_keeps_what_was_read(tmp_path, model_files):
    from pipeline.sa1b_writer import ShardWriter

    full = tmp_path / "full.tar"
    with ShardWriter(str(full)) as w:
        for i in range(1, 5):
            w.add(i, image_bytes(i), {"image": {"image_id": i}, "annotations": []})
    data = full.read_bytes()
    src = tmp_path / "sa_000001.tar"
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    marker = ShardProcessor(_config(out, model_files)).process(
        ShardTask(1, "sa_000001", source=str(src))
    )
    assert marker["input_error"] and 0 < marker["images_ok"] < 4
    assert len(tar_records(out / "sa_000001.tar")) == marker["images_ok"]


def test_input_shard_read_failure_commits_nothing(tmp_path, model_files, monkeypatch):
    """A connection reset half-way through an input shard is no property of the input:
    the shard raises (the driver runs it again), and neither its marker nor its output
    shard exists, so nothing partial looks complete."""
    import pipeline.sa1b_reader as reader_mod
    from pipeline.manifest import marker_url
    from pipeline.sa1b_writer import ShardWriter

    src = tmp_path / "sa_000003.tar"
    with ShardWriter(str(src)) as w:
        for i in range(1, 5):
            w.add(i, image_bytes(i), {"image": {"image_id": i}, "annotations": []})
    cut = src.stat().st_size // 2

    class Resetting(io.BytesIO):
        def read(self, n=-1):
            left = cut - self.tell()
            if left <= 0:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(left if n is None or n < 0 else min(n, left))

    monkeypatch.setattr(reader_mod, "open_url", lambda url: Resetting(src.read_bytes()))
    out = tmp_path / "out"
    with pytest.raises(OSError, match="sa_000003.tar: reading failed: ConnectionResetError"):
        ShardProcessor(_config(out, model_files)).process(
            ShardTask(3, "sa_000003", source=str(src))
        )
    assert not os.path.exists(marker_url(str(out), "sa_000003"))
    assert not (out / "sa_000003.tar").exists()
    assert hidden_files(out) == []


def test_loose_files_layout_without_images(tmp_path, model_files):
    (tmp_path / "a.jpg").write_bytes(image_bytes(4))
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files, layout="files", copy_images=False))
    marker = proc.process(ShardTask(0, "sa_000000", ((9, str(tmp_path / "a.jpg")),)))
    assert sorted(os.listdir(out / "sa_000000")) == ["sa_9.json"]
    rec = json.loads((out / "sa_000000" / "sa_9.json").read_text())
    assert rec["image"]["image_id"] == 9 and len(rec["annotations"]) == marker["annotations"]
    assert not (out / "sa_000000.tar").exists()
    img = pd.read_parquet(out / "index" / "images")
    assert img.jpg_offset.isna().all()


def test_loose_files_of_a_killed_attempt_for_images_failing_now_are_removed(
    tmp_path, model_files
):
    """Loose layout, redo of a shard: an earlier attempt wrote sa_5's files, and image 5
    fails this time; after the redo the folder holds exactly the images that are ok."""
    (tmp_path / "a.jpg").write_bytes(image_bytes(4))
    out = tmp_path / "out"
    folder = out / "sa_000000"
    folder.mkdir(parents=True)
    for name in ("sa_5.json", "sa_5.jpg", "sa_9.json", "notes.txt"):
        (folder / name).write_bytes(b"from the killed attempt")
    items = ((9, str(tmp_path / "a.jpg")), (5, str(tmp_path / "gone.jpg")))
    marker = ShardProcessor(_config(out, model_files, layout="files")).process(
        ShardTask(0, "sa_000000", items, attempt=2)
    )
    assert (marker["images_ok"], marker["images_failed"]) == (1, 1)
    assert sorted(os.listdir(folder)) == ["notes.txt", "sa_9.jpg", "sa_9.json"]
    assert json.loads((folder / "sa_9.json").read_text())["image"]["image_id"] == 9


def test_stale_temp_files_of_a_killed_attempt_are_removed(tmp_path, model_files):
    (tmp_path / "a.jpg").write_bytes(image_bytes(4))
    out = tmp_path / "out"
    (out / "index" / "images").mkdir(parents=True)
    stale = [
        out / ".sa_000000.tar.tmp-0123456789ab",
        out / "index" / "images" / ".sa_000000.parquet.tmp-x",
    ]
    other = out / ".sa_000001.tar.tmp-0123456789ab"  # another shard's: not ours to touch
    for p in [*stale, other]:
        p.write_bytes(b"partial")
    ShardProcessor(_config(out, model_files)).process(
        ShardTask(0, "sa_000000", ((1, str(tmp_path / "a.jpg")),))
    )
    assert not any(p.exists() for p in stale) and other.exists()


@pytest.mark.parametrize("layout", ["tar", "files"])
def test_a_failing_write_fails_the_shard_without_hanging(tmp_path, model_files, layout):
    import threading

    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
    out = tmp_path / "out"
    out.mkdir()
    if layout == "tar":
        (out / "sa_000000.tar").mkdir()  # the tar cannot be put in place at the end
    else:
        (out / "sa_000000").write_bytes(b"")  # the first per-image file cannot be written
    proc = ShardProcessor(_config(out, model_files, layout=layout, prefetch=2))
    items = tuple((i + 1, str(tmp_path / f"{i}.jpg")) for i in range(6))
    result: dict = {}

    def run():
        try:
            proc.process(ShardTask(0, "sa_000000", items))
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the shard hung after a write error"
    assert isinstance(result.get("error"), OSError)
    assert not (out / "_commits").exists()  # not committed
    assert hidden_files(out) == []  # no temp file left behind


def test_generator_errors_fail_the_attempt_and_are_recorded_only_on_the_last(
    tmp_path, model_files
):
    """An image the generator fails on (out of memory, a lost GPU) fails the attempt and
    nothing of it is committed, so the driver retries the shard; on the last attempt the
    shard is committed with that image recorded as failed and counted in the marker."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
    items = tuple((i + 1, str(tmp_path / f"{i}.jpg")) for i in range(4))
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files, batch_images=2))
    real = proc.generator.generate_batch

    from pipeline.actors import load_image

    bad = load_image(3, "3", (tmp_path / "2.jpg").read_bytes()).image
    assert not any(
        np.array_equal(bad, load_image(0, "x", image_bytes(i)).image) for i in (0, 1, 3)
    )

    def flaky(images):
        if any(np.array_equal(im, bad) for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images)

    proc.generator.generate_batch = flaky
    with pytest.raises(RuntimeError, match=r"sa_000000: the generator failed on 1 images \(1 of 4\)"):
        proc.process(ShardTask(0, "sa_000000", items, attempt=1, final=False))
    assert not (out / "_commits").exists()
    assert not (out / "sa_000000.tar").exists() and not (out / "index").exists()
    assert hidden_files(out) == []

    marker = proc.process(ShardTask(0, "sa_000000", items, attempt=3, final=True))
    assert (marker["images_ok"], marker["images_failed"], marker["generator_errors"]) == (3, 1, 1)
    [failure] = marker["failures"]
    assert failure["image_id"] == 3 and failure["status"] == "error"
    assert "CUDA out of memory" in failure["reason"]
    assert sorted(tar_records(out / "sa_000000.tar")) == [1, 2, 4]

    # an error that would recur on every attempt is recorded at once: no retries that
    # would spend the whole shard's GPU time again for one image
    def broken(images):
        if any(np.array_equal(im, bad) for im in images):
            raise ValueError("an image the generator cannot handle")
        return real(images)

    out2 = tmp_path / "out2"
    proc2 = ShardProcessor(_config(out2, model_files, batch_images=2))
    proc2.generator.generate_batch = broken
    marker = proc2.process(ShardTask(0, "sa_000000", items, attempt=1, final=False))
    assert (marker["images_ok"], marker["generator_errors"]) == (3, 1)
    assert "ValueError" in marker["failures"][0]["reason"]

    def all_broken(images):
        raise ValueError("nothing works")

    proc2.generator.generate_batch = all_broken  # every image: the shard is not committed
    with pytest.raises(RuntimeError, match="the generator failed on every image"):
        proc2.process(ShardTask(1, "sa_000001", items, attempt=3, final=True))
    assert not (out2 / "_commits" / "sa_000001.json").exists()


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    """A 16-bit grayscale PNG is scaled (not clipped to white by Pillow's RGB convert),
    and the stored JPEG is the scaled image."""
    from pipeline.actors import load_image

    ramp = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    it = load_image(1, "g16.png", buf.getvalue())
    assert it.status == "ok" and it.image.shape == (48, 64, 3)
    np.testing.assert_array_equal(it.image[..., 1], ramp >> 8)  # as OpenCV's imread
    stored = np.asarray(Image.open(io.BytesIO(it.jpeg)).convert("L")).astype(int)
    assert np.abs(stored - (ramp >> 8)).mean() < 2


def test_background_reader_stops_and_closes_its_source_when_abandoned():
    """A consumer that stops early (a failed attempt) must not leave the reader thread
    blocked on a full queue with the shard stream still open."""
    import threading
    import time

    from pipeline.actors import _background

    closed = threading.Event()
    before = {t for t in threading.enumerate() if t.name == "sa1b-shard-reader"}

    def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    g = _background(source(), 2)
    assert [next(g), next(g)] == [0, 1]
    time.sleep(0.5)  # let the reader fill the queue: the case that used to block
    g.close()
    assert closed.wait(5), "the source iterator was not closed"
    deadline = time.monotonic() + 5
    def ours():
        return [t for t in threading.enumerate() if t.name == "sa1b-shard-reader"
                and t not in before]  # fmt: skip

    while time.monotonic() < deadline and ours():
        time.sleep(0.05)
    assert not ours()


def test_background_reader_passes_items_and_errors_through():
    from pipeline.actors import _background

    def failing():
        yield from range(5)
        raise OSError("stream reset")

    got = []
    with pytest.raises(OSError, match="stream reset"):
        for x in _background(failing(), 2):
            got.append(x)
    assert got == list(range(5))


def test_images_the_network_fails_on_are_not_committed_as_failed(
    tmp_path, model_files, http_server, monkeypatch
):
    """A 404 is a missing image, recorded; a server error that outlasts the retries is the
    network's, not the image's: the shard's attempt fails, naming the image (without its
    signature), and nothing is committed, so a rerun tries the image again."""
    from pipeline.actors import ImageReadError
    from pipeline.manifest import marker_url

    monkeypatch.setattr("time.sleep", lambda s: None)  # retry_io's backoff
    base, www, _ = http_server
    (www / "ok.jpg").write_bytes(image_bytes(1))
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files))
    items = ((1, f"{base}/ok.jpg"), (2, f"{base}/gone.jpg?sig=SECRET"))
    marker = proc.process(ShardTask(0, "sa_000000", items))
    assert (marker["images_ok"], marker["images_failed"]) == (1, 1)
    assert marker["failures"][0]["status"] == "missing" and "SECRET" not in json.dumps(marker)

    items = ((1, f"{base}/ok.jpg"), (2, f"{base}/down/b.jpg?sig=SECRET"))
    with pytest.raises(ImageReadError, match=r"down/b\.jpg: still failing after retries") as e:
        proc.process(ShardTask(1, "sa_000001", items))
    assert "SECRET" not in str(e.value)
    assert not os.path.exists(marker_url(str(out), "sa_000001"))
    assert not (out / "sa_000001.tar").exists() and hidden_files(out) == []


def test_a_shard_none_of_whose_images_can_be_read_is_not_committed(
    tmp_path, model_files, http_server
):
    """Every image denied (credentials expired, a bucket closed): more likely the run's
    access than the images, so the shard is not committed with all of them failed; one
    denied image among readable ones is recorded."""
    from pipeline.manifest import marker_url

    base, www, _ = http_server
    (www / "ok.jpg").write_bytes(image_bytes(1))
    out = tmp_path / "out"
    proc = ShardProcessor(_config(out, model_files))
    denied = ((1, f"{base}/expired/a.jpg"), (2, f"{base}/expired/b.jpg"))
    with pytest.raises(RuntimeError, match=r"none of its 2 images could be read; first: .*a\.jpg"):
        proc.process(ShardTask(0, "sa_000000", denied))
    assert not os.path.exists(marker_url(str(out), "sa_000000"))
    marker = proc.process(ShardTask(1, "sa_000001", ((3, f"{base}/ok.jpg"), denied[0])))
    assert marker["images_ok"] == 1
    assert marker["failures"][0]["status"] == "unreadable"
    assert "access denied (HTTP 403)" in marker["failures"][0]["reason"]


def test_input_shard_with_skipped_members_is_reported_damaged(tmp_path, model_files):
    """An input tar whose members are not sa_<id>.jpg/.json (here, under a folder) yields
    no image: its marker says why instead of committing an empty shard as clean."""
    import tarfile

    src = tmp_path / "sa_000005.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in (("sa_000005/sa_1.jpg", image_bytes(1)), ("sa_000005/sa_1.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    marker = ShardProcessor(_config(tmp_path / "out", model_files)).process(
        ShardTask(5, "sa_000005", source=str(src))
    )
    assert marker["images_ok"] == 0
    assert marker["input_error"].startswith("2 members skipped: sa_000005/sa_1.jpg (")


def test_a_worker_that_cannot_see_the_run_refuses_to_start(tmp_path):
    """A local output on a cluster of several nodes: a worker on another node finds no
    manifest where the driver recorded it, and says so instead of writing unseen."""
    from pipeline.actors import _check_output_visible
    from pipeline.manifest import write_manifest

    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"manifest\.json is not visible on this worker's node"):
        _check_output_visible(out)
    write_manifest(out, {"run_id": "r"})
    _check_output_visible(out)


def test_a_worker_that_cannot_see_a_local_input_refuses_to_start(tmp_path):
    """A local input on a cluster of several nodes: a worker on another node would record
    every image as missing; it refuses to start instead, naming the folder."""
    from pipeline.actors import _check_input_visible

    _check_input_visible(None)  # input in a store: nothing to check
    _check_input_visible(str(tmp_path))
    gone = str(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match=r"input folder .*elsewhere is not visible on this"):
        _check_input_visible(gone)
