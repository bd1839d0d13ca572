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
