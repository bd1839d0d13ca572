"""The quality yardstick's breakdown and its picture of the worst prompts."""

import cv2
import pytest

from bench.quality import breakdown, draw_worst, eval_scene


def test_breakdown_by_shape_and_size_hand_computed():
    rows = [
        {"shape": "bar", "area": 0.002, "point": 0.2, "box": 0.4},
        {"shape": "bar", "area": 0.01, "point": 0.6, "box": 0.8},  # 1% is in "1-5%"
        {"shape": "ring", "area": 0.3, "point": 0.9, "box": 1.0},
    ]
    out = breakdown(rows)
    assert out["by_shape"]["bar"] == pytest.approx({"n": 2, "point": 0.4, "box": 0.6})
    assert out["by_shape"]["ring"] == pytest.approx({"n": 1, "point": 0.9, "box": 1.0})
    assert list(out["by_size"]) == ["< 1%", "1-5%", ">= 5%"]
    assert out["by_size"]["< 1%"] == pytest.approx({"n": 1, "point": 0.2, "box": 0.4})
    assert out["by_size"]["1-5%"]["n"] == 1 and out["by_size"][">= 5%"]["n"] == 1


def test_picture_of_the_worst_prompts(tmp_path):
    from sam import sam_model_registry

    scene = eval_scene(1000)
    fg = scene.indices("object", "part")
    # made-up IoUs: the picture must show the three lowest, in tiles of 384 x 192
    rows = [
        {"seed": 1000, "index": int(i), "shape": scene.shapes[i], "point": 0.1 * j, "box": 0.0}
        for j, i in enumerate(fg)
    ]
    path = str(tmp_path / "worst.png")
    drawn = draw_worst(sam_model_registry["tiny"](), rows, path, n=3)
    assert [r["index"] for r in drawn] == [int(i) for i in fg[:3]]  # the three lowest
    img = cv2.imread(path)
    assert img.shape == (2 * 192, 2 * 384, 3)  # 3 tiles, padded to 2 x 2
    assert img[192:, 384:].max() == 0  # the padding tile
    assert img[:192].std() > 10  # drawn, not blank
    # the overlay half of every tile has the ground truth's outline in pure green, the
    # crop half none
    for ty, tx in [(0, 0), (0, 384), (192, 0)]:
        over = img[ty : ty + 192, tx + 192 : tx + 384].reshape(-1, 3)
        crop = img[ty : ty + 192, tx : tx + 192].reshape(-1, 3)
        assert ((over == [0, 255, 0]).all(1)).sum() > 20
        assert ((crop == [0, 255, 0]).all(1)).sum() <= 20


def test_picture_needs_instances(tmp_path):
    with pytest.raises(ValueError, match="no instances"):
        draw_worst(None, [], str(tmp_path / "x.png"))


def test_amg_recall_and_precision_hand_computed(monkeypatch):
    """A stand-in generator returns: object A exactly, 60% of object B's pixels, a
    background region exactly, and an empty mask. Recall@0.5 counts A and B of the
    scene's objects and parts, recall@0.75 only A; precision@0.5 is 3 of 4 masks (the
    background region is a right segment, not a recalled object)."""
    import argparse

    import numpy as np

    import sam
    from bench.quality import amg_recall, threshold_pair

    scene = eval_scene(1001)
    fg = [int(i) for i in scene.indices("object", "part")]
    bg = [int(i) for i in scene.indices("background")]
    areas = scene.masks.reshape(len(scene.masks), -1).sum(1)
    # two objects that no other object or part overlaps much (the parts of an object do)
    a, b = sorted(fg, key=lambda i: -areas[i])[:2]
    part_b = scene.masks[b].copy()
    ys, xs = np.nonzero(part_b)
    drop = np.argsort(ys * part_b.shape[1] + xs)[int(0.6 * len(ys)) :]
    part_b[ys[drop], xs[drop]] = False
    masks = [scene.masks[a], part_b, scene.masks[bg[0]], np.zeros_like(part_b)]

    class Stand:
        def __init__(self, model, **kw):
            self.kw = kw

        def generate(self, image):
            return [{"segmentation": m} for m in masks]

    monkeypatch.setattr(sam, "SamAutomaticMaskGenerator", Stand)
    out = amg_recall(None, [scene])
    best = {}
    for i in fg:
        g = scene.masks[i]
        best[i] = max((m & g).sum() / max(1, (m | g).sum()) for m in masks)
    want5 = np.mean([best[i] >= 0.5 for i in fg])
    assert out["recall@0.5"] == pytest.approx(want5) and want5 >= 2 / len(fg)
    assert out["recall@0.75"] == pytest.approx(np.mean([best[i] >= 0.75 for i in fg]))
    assert out["precision@0.5"] == pytest.approx(0.75)
    assert out["masks_per_image"] == 4
    assert threshold_pair("0.5/0.8") == (0.5, 0.8)
    for bad in ("0.5", "a/b", "0.5/1.2"):
        with pytest.raises(argparse.ArgumentTypeError):
            threshold_pair(bad)
    from bench.quality import main

    with pytest.raises(SystemExit) as e:  # a sweep without --amg would silently do nothing
        main(["--amg-thresholds", "0.5/0.8"])
    assert e.value.code == 2
