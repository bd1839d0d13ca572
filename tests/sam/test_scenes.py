"""The synthetic scene generator: deterministic, exact masks, varied content."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from sam.scenes import SHAPES, make_scene, read_scene, rle_decode, rle_encode, write_scenes


def _leaf_labels(scene) -> np.ndarray:
    """Per pixel: the part covering it, else its top-level instance."""
    lab = np.full((scene.height, scene.width), -1, np.int64)
    for i in scene.indices("background", "object"):
        lab[scene.masks[i]] = i
    for i in scene.indices("part"):
        lab[scene.masks[i]] = i
    return lab


@pytest.mark.parametrize("seed,size", [(0, (512, 512)), (7, (300, 1100)), (11, (1024, 700))])
def test_deterministic_and_seed_dependent(seed, size):
    a = make_scene(seed, *size)
    b = make_scene(seed, *size)
    c = make_scene(seed + 1000, *size)
    assert a.image.shape == (*size, 3) and a.image.dtype == np.uint8
    assert a.masks.shape[1:] == size and a.masks.dtype == bool
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.masks, b.masks)
    assert a.kinds == b.kinds and a.shapes == b.shapes
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(6))
def test_masks_partition_the_image_and_parts_nest(seed):
    s = make_scene(seed, 384, 448)
    top = s.indices("background", "object")
    # background regions and objects are disjoint and cover every pixel exactly once
    cover = s.masks[top].sum(0)
    assert cover.min() == 1 and cover.max() == 1
    parts = s.indices("part")
    for i in parts:
        parent = s.parents[i]
        assert s.kinds[parent] == "object"
        assert not (s.masks[i] & ~s.masks[parent]).any(), "a part must lie inside its parent"
    if len(parts):
        assert s.masks[parts].sum(0).max() <= 1, "parts are disjoint"
    assert all(p == -1 for i, p in enumerate(s.parents) if s.kinds[i] != "part")
    # every instance keeps a clearly visible area
    assert s.areas().min() >= 48


@pytest.mark.parametrize(
    "seed, size, kwargs",
    [
        (111, (64, 64), {"min_objects": 0, "max_objects": 0}),  # a sliver of a region
        (111, (64, 64), {}),
        (1874, (128, 192), {}),
        (701, (64, 64), {"min_objects": 3, "max_objects": 3}),  # the first region tiny
        (5268, (64, 64), {"min_objects": 3, "max_objects": 3}),
    ],
)
def test_background_slivers_merge_into_a_neighbour(seed, size, kwargs):
    """Background regions under the minimum area are merged into the region they border,
    so every pixel still has exactly one owner and no instance is too small to see."""
    s = make_scene(seed, *size, **kwargs)
    cover = s.masks[s.indices("background", "object")].sum(0)
    assert cover.min() == 1 and cover.max() == 1
    assert s.areas().min() >= 48
    if kwargs.get("min_objects"):
        assert len(s.indices("object")) >= 1


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_flat_scene_has_one_colour_per_visible_instance(seed):
    """With flat fills and no noise, the drawn image and the masks agree pixel for
    pixel: each visible leaf region is exactly one colour, and colours of different
    leaves are what separate them (an error of the masks would mix two colours)."""
    s = make_scene(seed, 320, 400, textures=False, noise=0)
    lab = _leaf_labels(s)
    assert lab.min() >= 0
    colours = {}
    for i in np.unique(lab):
        px = s.image[lab == i]
        uniq = np.unique(px, axis=0)
        assert len(uniq) == 1, f"instance {i} ({s.kinds[i]}) has {len(uniq)} colours"
        colours[i] = tuple(int(v) for v in uniq[0])
    # and the other way round: each colour's pixels form exactly the union of the leaves
    # with that colour
    packed = s.image.astype(np.int64) @ np.array([1, 256, 65536])
    for c in colours.values():
        same = [j for j, d in colours.items() if d == c]
        key = c[0] + 256 * c[1] + 65536 * c[2]
        assert np.array_equal(packed == key, np.isin(lab, same))


def test_variety_over_seeds():
    """Across a few scenes: every shape kind, parts, textures, border contact, rings
    with holes, a wide range of object sizes."""
    shapes, fills, areas, touching, parts, holes = set(), set(), [], 0, 0, 0
    for seed in range(24):
        s = make_scene(seed, 256, 320)
        shapes.update(s.shapes)
        fills.update(s.fills)
        for i in s.indices("object"):
            m = s.masks[i]
            areas.append(m.mean())
            if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
                touching += 1
            if s.shapes[i] == "ring":
                # a hole: a region of the non-mask not connected to the border
                inv = np.pad(~m, 1, constant_values=True).astype(np.uint8)
                n, _ = cv2.connectedComponents(inv, connectivity=4)
                holes += n > 2
        parts += len(s.indices("part"))
    assert set(SHAPES) <= shapes
    assert {"solid", "stripes", "noise", "linear"} <= fills
    assert parts >= 5 and touching >= 10 and holes >= 1
    assert min(areas) < 0.01 and max(areas) > 0.1


@pytest.mark.parametrize("size", [(256, 256), (257, 1500), (1500, 301)])
def test_any_size_and_aspect(size):
    s = make_scene(5, *size, max_objects=6)
    assert s.image.shape[:2] == size and s.masks.shape[1:] == size


def test_random_size_from_seed():
    s = make_scene(123)
    assert 256 <= s.height <= 1500 and 256 <= s.width <= 1500
    assert make_scene(123).image.shape == s.image.shape


def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    s = make_scene(3, 97, 131)
    cases = [*s.masks, np.zeros((5, 7), bool), np.ones((5, 7), bool)]
    for m in cases:
        ours = rle_encode(m)
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["counts"] == ref["counts"].decode()
        assert ours["size"] == list(ref["size"])
        assert np.array_equal(rle_decode(ours), m)


def test_write_and_read_scenes(tmp_path):
    paths = write_scenes(str(tmp_path), [4, 9], height=200, width=260)
    assert len(paths) == 2
    image, masks, anns = read_scene(str(tmp_path / "scene_000009.json"))
    s = make_scene(9, 200, 260)
    assert np.array_equal(masks, s.masks)
    assert [a["kind"] for a in anns] == s.kinds
    assert np.abs(image.astype(int) - s.image).mean() < 6  # JPEG, quality 95
    meta = json.loads((tmp_path / "scene_000004.json").read_text())["image"]
    assert meta["seed"] == 4 and meta["generator"]["height"] == 200
    assert [a["area"] for a in anns] == s.areas().tolist()
