"""`sam-amg`: the reference script's layouts, SA-1B JSON, and clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from sam.cli import main
from sam.scenes import make_scene

mask_utils = pytest.importorskip("pycocotools.mask")

FAST = ["--points-per-side", "12", "--pred-iou-thresh", "0.3", "--stability-score-thresh", "0.6"]


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for seed, name in [(1, "sa_42.jpg"), (2, "b.png")]:
        Image.fromarray(make_scene(seed=30_000 + seed, height=200, width=260).image).save(d / name)
    return d


def test_png_layout(image_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["--input", str(image_dir), "--output", str(out), *FAST]) == 0
    rows = list(csv.DictReader(open(out / "sa_42" / "metadata.csv")))
    assert rows, "expected masks"
    for row in rows:
        m = np.asarray(Image.open(out / "sa_42" / f"{row['id']}.png")) > 0
        assert m.shape == (200, 260)
        assert int(row["area"]) == m.sum()
        ys, xs = np.nonzero(m)
        assert [int(float(row[k])) for k in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")] == [
            xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_coco_and_sa1b_layouts(image_dir, tmp_path):
    out = tmp_path / "coco"
    assert main(["--input", str(image_dir / "b.png"), "--output", str(out), "--convert-to-rle", *FAST]) == 0
    recs = json.loads((out / "b.json").read_text())
    assert recs and all(mask_utils.area(r["segmentation"]) == r["area"] for r in recs)
    out = tmp_path / "sa1b"
    assert main(["--input", str(image_dir), "--output", str(out), "--format", "sa1b", *FAST]) == 0
    doc = json.loads((out / "sa_42.json").read_text())
    assert list(doc) == ["image", "annotations"]
    assert doc["image"] == {"image_id": 42, "width": 260, "height": 200, "file_name": "sa_42.jpg"}
    ids = [a["id"] for a in doc["annotations"]]
    assert ids == list(range(len(ids)))


def test_errors(tmp_path, capsys, image_dir):
    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), "--model", "vit_b"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), "--model", "vit_b",
                 "--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), "--preset", "x"]) == 2
    corrupt = image_dir / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o2"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err
    assert (tmp_path / "o2" / "sa_42" / "metadata.csv").exists()  # the good images are kept


def test_broken_images_of_every_kind_are_per_image_failures(
    tmp_path, capsys, image_dir, monkeypatch
):
    """PIL fails on broken files with OSError, but also SyntaxError ("broken PNG file")
    or struct.error (bad EXIF): each is one message naming the file, and the other
    images are still written."""
    import struct

    import PIL.Image

    png = (image_dir / "b.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(png[: len(png) // 2])  # OSError
    (image_dir / "syntax.png").write_bytes(png)
    (image_dir / "exif.png").write_bytes(png)
    (image_dir / "empty.jpg").write_bytes(b"")
    real_open = PIL.Image.open

    def pil_open(fp, *a, **k):  # the failures PIL raises for some malformed files
        name = getattr(fp, "name", str(fp))
        if name.endswith("syntax.png"):
            raise SyntaxError("broken PNG file")
        if name.endswith("exif.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_open(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", pil_open)
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), *FAST]) == 1
    err = capsys.readouterr().err
    for name in ("truncated.png", "syntax.png", "exif.png", "empty.jpg"):
        assert f"failed: {image_dir / name}: image {image_dir / name}: cannot be read" in err
    assert "Traceback" not in err
    assert (tmp_path / "o" / "sa_42" / "metadata.csv").exists()
    assert (tmp_path / "o" / "b" / "metadata.csv").exists()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """Like OpenCV's imread (the reference script's reader): 16-bit gray becomes 8-bit by
    scaling; Pillow's convert("RGB") would clip it to a nearly white image."""
    from sam.cli import read_image

    ramp = (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 2]).all()
    import cv2

    np.testing.assert_array_equal(img[..., ::-1], cv2.imread(str(tmp_path / "g16.png")))


def test_png_rerun_replaces_the_folder(image_dir, tmp_path):
    """A second run into the same output leaves only its own masks (the reference script
    refuses an existing folder; leaving the first run's PNGs would mix two runs)."""
    out = tmp_path / "out"
    assert main(["--input", str(image_dir), "--output", str(out), *FAST]) == 0
    stale = out / "sa_42" / "999.png"
    stale.write_bytes(b"from an earlier run")
    assert main(["--input", str(image_dir), "--output", str(out), *FAST]) == 0
    rows = list(csv.DictReader(open(out / "sa_42" / "metadata.csv")))
    assert sorted(p.name for p in (out / "sa_42").iterdir()) == sorted(
        [f"{r['id']}.png" for r in rows] + ["metadata.csv"]
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resize_on_the_device(image_dir, tmp_path, monkeypatch):
    """--resize torch resizes with torch (counted) and gives the same masks up to
    resampling rounding (most records keep their point); a bad value is refused."""
    from sam.transforms import ResizeLongestSide

    calls = []
    original = ResizeLongestSide.apply_image_torch

    def counted(self, image):
        calls.append(image.shape)
        return original(self, image)

    monkeypatch.setattr(ResizeLongestSide, "apply_image_torch", counted)
    runs = {}
    for how in ("pil", "torch"):
        out = tmp_path / how
        args = ["--input", str(image_dir / "b.png"), "--output", str(out), "--convert-to-rle"]
        assert main([*args, "--resize", how, *FAST]) == 0
        runs[how] = {tuple(r["point_coords"][0]) for r in json.loads((out / "b.json").read_text())}
        assert len(calls) == (how == "torch")  # one image: one resize on the device
    assert len(runs["pil"]) >= 3
    assert len(runs["pil"] & runs["torch"]) >= 0.8 * len(runs["pil"] | runs["torch"])
    with pytest.raises(SystemExit):
        main(["--input", str(image_dir), "--output", str(tmp_path / "x"), "--resize", "cubic"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--points-per-side", "0"], "points_per_side must be in [1, 1024], got 0"),
        (["--points-per-side", "70000"], "points_per_side must be in [1, 1024], got 70000"),
        (["--pred-iou-thresh", "nan"], "pred_iou_thresh must be a finite number"),
        (["--crop-n-layers", "6", "--crop-n-points-downscale-factor", "2"], "crop layer 6 would"),
        (["--crop-n-layers", "1", "--crop-overlap-ratio", "5"], "crop_overlap_ratio must be"),
        (["--stability-score-thresh", "1.5"], "stability_score_thresh must be at most 1"),
    ],
)
def test_impossible_generator_flags_exit_2(image_dir, tmp_path, capsys, flags, message):
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_problems_and_clashing_stems(image_dir, tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("not a folder")
    assert main(["--input", str(image_dir), "--output", str(taken), *FAST]) == 2
    assert f"output {taken}: cannot create the folder" in capsys.readouterr().err
    Image.open(image_dir / "b.png").save(image_dir / "sa_42.png")  # sa_42.jpg is there too
    assert main(["--input", str(image_dir), "--output", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "sa_42.jpg and sa_42.png would write the same output sa_42" in err


def test_image_ids_never_collide():
    from pathlib import Path

    from sam.cli import image_ids

    names = ["a.jpg", "b.png", "sa_1.jpg", "sa_3.jpg", "c.jpg"]
    assert image_ids([Path(n) for n in names]) == [2, 4, 1, 3, 5]


def test_empty_masks_at_zero_thresholds_write_valid_json(tmp_path):
    """At stability threshold 0 the generator keeps empty masks, as the reference does,
    some with stability 0/0: the SA-1B JSON leaves empty masks out, the COCO-RLE JSON says
    null for the undefined scores."""
    d = tmp_path / "in"
    d.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (7, 7, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "n.png")
    zero = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]

    def strict(text):
        def refuse(c):
            raise ValueError(f"not JSON: {c}")

        return json.loads(text, parse_constant=refuse)

    assert main(["--input", str(d), "--output", str(tmp_path / "coco"), "--convert-to-rle", *zero]) == 0
    recs = strict((tmp_path / "coco" / "n.json").read_text())
    empty = [r for r in recs if r["area"] == 0]
    # a real case: some empty masks have nothing above thr - offset either (0/0)
    assert empty and any(r["stability_score"] is None for r in empty)
    assert main(["--input", str(d), "--output", str(tmp_path / "sa1b"), "--format", "sa1b", *zero]) == 0
    doc = strict((tmp_path / "sa1b" / "n.json").read_text())
    assert [a["id"] for a in doc["annotations"]] == list(range(len(recs) - len(empty)))
    assert all(a["area"] > 0 for a in doc["annotations"])
