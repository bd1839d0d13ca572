"""sam.rle against pycocotools (oracle), hand-computed cases and the real SA-1B RLEs."""

from __future__ import annotations

import numpy as np
import pytest

from sam import rle
from tests.sa1b_samples import real_records

mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is the RLE oracle")


def coco_encode(m: np.ndarray) -> dict:
    r = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def random_masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 7), (7, 1), (5, 3), (64, 48), (33, 130), (300, 200)]
    for h, w in shapes:
        yield np.zeros((h, w), bool)
        yield np.ones((h, w), bool)
        yield rng.random((h, w)) < 0.5
        yield rng.random((h, w)) < 0.02
        # blobs: long runs give multi-character counts and negative deltas
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        yield m


def test_encode_matches_pycocotools_and_decode_inverts():
    for m in random_masks():
        ours = rle.encode(m)
        assert ours == coco_encode(m)
        np.testing.assert_array_equal(rle.decode(ours), m)
        assert rle.area(ours) == int(m.sum()) == int(mask_api.area(_b(ours)))


def _b(r: dict) -> dict:
    return {"size": r["size"], "counts": r["counts"].encode()}


def test_large_mask_against_pycocotools():
    rng = np.random.default_rng(3)
    m = np.zeros((1500, 2250), bool)
    for _ in range(20):
        y, x = rng.integers(0, 1400), rng.integers(0, 2100)
        m[y : y + rng.integers(1, 400), x : x + rng.integers(1, 400)] ^= True
    ours = rle.encode(m)
    assert ours == coco_encode(m)
    np.testing.assert_array_equal(rle.decode(ours), mask_api.decode(_b(ours)).astype(bool))


def test_hand_computed_case():
    # column-major: [[0,1],[1,1]] flattens to 0,1,1,1 -> runs [1, 3]
    m = np.array([[0, 1], [1, 1]], bool)
    assert rle.encode(m) == {"size": [2, 2], "counts": "13"}
    # a mask starting with a 1 starts with a zero-length run of zeros
    assert rle.counts_from_string(rle.encode(np.ones((2, 2)))["counts"]).tolist() == [0, 4]


def test_counts_string_roundtrip_with_large_and_negative_deltas():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        counts = rng.integers(0, 5_000_000, size=n)
        s = rle.counts_to_string(counts)
        assert rle.counts_from_string(s).tolist() == counts.tolist()
        h = int(counts.sum()) or 1
        if counts.sum():
            coco = mask_api.frPyObjects({"size": [h, 1], "counts": counts.tolist()}, h, 1)
            assert coco["counts"].decode() == s


def test_bbox_is_sa1b_inclusive_and_coco_bbox_is_tobbox():
    for m in random_masks(5):
        r = rle.encode(m)
        assert rle.bbox(r) == rle.mask_bbox(m)
        assert rle.coco_bbox(r) == mask_api.toBbox(_b(r)).astype(int).tolist()
        if m.any():
            ys, xs = np.nonzero(m)
            assert rle.bbox(r) == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_full_width_mask_width_is_w_minus_one():
    m = np.zeros((10, 2000), bool)
    m[3:5, :] = True
    assert rle.bbox(rle.encode(m)) == [0, 3, 1999, 1]


def test_validate_rejects_bad_runs_and_characters():
    good = rle.encode(np.eye(4, dtype=bool))
    rle.validate(good)
    with pytest.raises(rle.RLEError, match="sum to"):
        rle.validate({"size": [4, 5], "counts": good["counts"]})
    with pytest.raises(rle.RLEError, match="outside"):
        rle.validate({"size": [4, 4], "counts": "ab~"})
    with pytest.raises(rle.RLEError, match="continuation"):
        rle.validate({"size": [4, 4], "counts": "1P"})
    with pytest.raises(rle.RLEError):
        rle.decode({"size": [4, 4], "counts": [3, 2]})


def test_real_sa1b_rles_roundtrip_and_match_area_and_bbox():
    n = 0
    for rec in real_records():
        h, w = rec["image"]["height"], rec["image"]["width"]
        for a in rec["annotations"]:
            seg = a["segmentation"]
            assert seg["size"] == [h, w]
            rle.validate(seg)
            m = rle.decode(seg)
            np.testing.assert_array_equal(m, mask_api.decode(_b(seg)).astype(bool))
            assert rle.encode(m)["counts"] == seg["counts"]
            assert rle.area(seg) == a["area"] == int(m.sum())
            assert rle.bbox(seg) == [int(v) for v in a["bbox"]]
            # pycocotools toBbox would be one larger: SA-1B is inclusive
            assert mask_api.toBbox(_b(seg))[2] == a["bbox"][2] + 1
            n += 1
    assert n == 13
