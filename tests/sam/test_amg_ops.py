"""The generator's vectorised building blocks against the reference's utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam import amg_ops as ops
from tests.reference import segment_anything  # noqa: F401  (skips without the oracle)

ref_amg = pytest.importorskip("segment_anything.utils.amg")
mask_utils = pytest.importorskip("pycocotools.mask")


def random_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Blobs, stripes, full and empty masks: every edge case of run-length coding."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, max(2, h // 8), max(2, w // 8), generator=g)
    m = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.3
    m[0] = False
    if n > 1:
        m[1] = True
    if n > 2:
        m[2] = False
        m[2, :, ::3] = True  # vertical stripes: runs span whole columns and join
    if n > 3:
        m[3] = False
        m[3, -1, -1] = True
        m[3, 0, 0] = True
    return m


@pytest.mark.parametrize("n_per_side,layers,scale", [(32, 0, 1), (16, 2, 2), (7, 1, 3)])
def test_point_grids(n_per_side, layers, scale):
    ours = ops.layer_point_grids(n_per_side, layers, scale)
    ref = ref_amg.build_all_layer_point_grids(n_per_side, layers, scale)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(1500, 2000), (1500, 2250), (2060, 1500), (333, 517)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes(size, layers):
    ours = ops.crop_boxes(size, layers, 512 / 1500)
    ref = ref_amg.generate_crop_boxes(size, layers, 512 / 1500)
    assert ours == (ref[0], ref[1])


def test_sa1b_crop_windows():
    """FORMAT.md: a 2000x1500 image has 1256x1006 (layer 1) and 692x567 (layer 2) crops."""
    boxes, layers = ops.crop_boxes((1500, 2000), 2, 512 / 1500)
    sizes = {(b[2] - b[0], b[3] - b[1]) for b, layer in zip(boxes, layers) if layer == 1}
    assert (1256, 1006) in sizes
    sizes = {(b[2] - b[0], b[3] - b[1]) for b, layer in zip(boxes, layers) if layer == 2}
    assert (692, 567) in sizes


def test_stability_and_boxes_match_reference():
    logits = torch.randn(6, 57, 83) * 3
    ref = ref_amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ops.stability_score(logits, 0.0, 1.0), ref)
    masks = random_masks(6, 57, 83)
    assert torch.equal(ops.masks_to_boxes(masks), ref_amg.batched_mask_to_box(masks))


def test_near_crop_edge_matches_reference():
    g = torch.Generator().manual_seed(1)
    boxes = torch.randint(0, 300, (200, 4), generator=g)
    boxes[:, 2:] = boxes[:, :2] + torch.randint(0, 200, (200, 2), generator=g)
    crop, image = [100, 50, 500, 400], [0, 0, 500, 600]
    ref = ref_amg.is_box_near_crop_edge(boxes, crop, image)
    assert torch.equal(ops.near_crop_edge(boxes, crop, image), ref)


@pytest.mark.parametrize(
    "crop,image",
    [((0, 0, 40, 30), (30, 40)), ((10, 5, 50, 35), (60, 70)), ((0, 7, 70, 37), (60, 70)),
     ((13, 0, 33, 60), (60, 70))],
)
def test_runs_in_image_frame_match_pycocotools(crop, image):
    """Run lengths of crop masks placed in the image equal pycocotools' on padded masks."""
    x0, y0, x1, y1 = crop
    masks = random_masks(7, y1 - y0, x1 - x0, seed=x0 + y0)
    runs = ops.masks_to_runs(masks, (x0, y0), image)
    padded = torch.zeros(len(masks), *image, dtype=torch.bool)
    padded[:, y0:y1, x0:x1] = masks
    for counts, m in zip(runs, padded):
        arr = np.asfortranarray(m.numpy().astype(np.uint8))
        expect = mask_utils.frPyObjects(ref_amg.mask_to_rle_pytorch(m[None])[0], *image)
        got = {"size": list(image), "counts": counts.tolist()}
        assert got == ref_amg.mask_to_rle_pytorch(m[None])[0]
        assert mask_utils.decode(mask_utils.frPyObjects(got, *image)).tolist() == arr.tolist()
        assert ops.runs_area(counts) == int(m.sum()) == int(mask_utils.area(expect))
        np.testing.assert_array_equal(ops.runs_to_mask(counts, image), m.numpy())
        np.testing.assert_array_equal(ops.mask_to_runs_np(m.numpy()), counts)


def test_upsample_matches_reference_postprocess():
    """Partial first-stage upsampling gives the reference's numbers."""
    from tests.conftest import SMALL_CONFIG
    from tests.reference import build_reference_sam

    ref = build_reference_sam(SMALL_CONFIG)
    low = torch.randn(5, 3, 64, 64)
    for input_size, out in [((256, 171), (600, 401)), ((99, 256), (200, 517)), ((256, 256), (256, 256))]:
        expect = ref.postprocess_masks(low, input_size, out)
        got = ops.upsample_logits(low.flatten(0, 1), 256, input_size, out).view_as(expect)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


def _regions_case() -> tuple[np.ndarray, dict]:
    """A 60x80 mask: a big region with holes of 5, 29 and 31 px, plus separate islands of
    5, 29 and 31 px (4-connected areas, counted by hand)."""
    m = np.zeros((60, 80), bool)
    m[5:45, 5:45] = True  # the big region, 1600 px
    m[10, 10:15] = False  # hole of 5
    m[20:23, 10:19] = False  # 27 ...
    m[23, 10:12] = False  # ... + 2 = hole of 29
    m[30:33, 20:30] = False  # 30 ...
    m[33, 20] = False  # ... + 1 = hole of 31
    m[2, 60:65] = True  # island of 5
    m[10:13, 60:69] = True  # 27 ...
    m[13, 60:62] = True  # ... + 2 = island of 29
    m[20:23, 60:70] = True  # 30 ...
    m[23, 60] = True  # ... + 1 = island of 31
    return m, {"holes": (10, 12), "islands": (2, 62)}  # a pixel of the 5 and 29 px region


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_hand_computed_and_matches_reference(mode):
    """Regions under the threshold (5, 29 px) go, those at or over it (31 px) stay."""
    m, probes = _regions_case()
    got, changed = ops.remove_small_regions(m, 30, mode)
    assert changed
    expect = m.copy()
    small = [(10, slice(10, 15)), (slice(20, 23), slice(10, 19)), (23, slice(10, 12))]
    if mode == "islands":
        small = [(2, slice(60, 65)), (slice(10, 13), slice(60, 69)), (13, slice(60, 62))]
    for idx in small:
        expect[idx] = mode == "holes"  # holes filled, islands removed
    np.testing.assert_array_equal(got, expect)
    assert got[probes[mode]] == (mode == "holes")
    assert not got[33, 20] and got[23, 60]  # the 31 px hole and island stay in both modes
    ref, ref_changed = ref_amg.remove_small_regions(m, 30, mode)
    assert ref_changed == changed
    np.testing.assert_array_equal(got, ref)
    for r in random_masks(5, 80, 90, seed=4).numpy():
        a, ca = ops.remove_small_regions(r, 30, mode)
        b, cb = ref_amg.remove_small_regions(r, 30, mode)
        assert ca == cb
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "model_size,low,input_size,out",
    [(1024, 256, (683, 1024), (1500, 2250)), (512, 128, (512, 341), (801, 534)),
     (512, 128, (300, 512), (90, 153)), (1024, 256, (1024, 1024), (692, 567)),
     (512, 128, (512, 512), (2000, 2000))],
)
@pytest.mark.parametrize("scale", [30.0, 1.5])
def test_tiled_statistics_match_dense(model_size, low, input_size, out, scale):
    """Stability, area and boxes from the tiled evaluation equal the dense upsampling's
    up to float rounding (a pixel here and there out of millions), for steep logits and
    for flat ones (many tiles between the stability thresholds)."""
    g = torch.Generator().manual_seed(low + out[0])
    coarse = torch.randn(12, 1, low // 16, low // 16, generator=g) * scale
    logits = F.interpolate(coarse, (low, low), mode="bilinear", align_corners=False)[:, 0]
    logits[0] = -5.0  # empty mask
    logits[1] = 5.0  # full mask
    tiled = ops.TiledUpsampler(model_size, (low, low), input_size, out, torch.device("cpu"))
    stab, area, boxes = tiled.stats(logits, 0.0, 1.0)
    full = ops.upsample_logits(logits, model_size, input_size, out)
    masks = full > 0
    ref_stab = ops.stability_score(full, 0.0, 1.0)
    valid = ~torch.isnan(ref_stab)
    torch.testing.assert_close(stab[valid], ref_stab[valid], rtol=0, atol=1e-4)
    assert (area - masks.flatten(1).sum(1)).abs().max() <= max(2, out[0] * out[1] // 100_000)
    assert (boxes - ops.masks_to_boxes(masks)).abs().max() <= 1
    assert area[0] == 0 and area[1] == out[0] * out[1]
    # evaluated a few tiles at a time (bounded memory): the same numbers
    for got, want in zip(tiled.stats(logits, 0.0, 1.0, max_pixels=5000), (stab, area, boxes)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, equal_nan=True)


def test_neighbourhood_max_min_equal_pooling():
    """The separable 3x3 max and min used to classify tiles equal max pooling over the
    cells present (edges and corners included)."""
    x = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(5))
    mx, mn = ops._neighbourhood_max_min(x)
    torch.testing.assert_close(mx, F.max_pool2d(x[:, None], 3, 1, 1)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(mn, -F.max_pool2d(-x[:, None], 3, 1, 1)[:, 0], rtol=0, atol=0)


def test_tiles_between_the_thresholds_need_no_evaluation():
    """A logit map lying wholly between two thresholds is known without evaluating a
    tile: above the low one and the mask threshold everywhere, above the high one
    nowhere (stability 0, full area, full box); one map crossing the mask threshold
    is evaluated only along that edge."""
    tiled = ops.TiledUpsampler(512, (128, 128), (512, 384), (600, 450), torch.device("cpu"))
    flat = torch.full((1, 128, 128), 0.5)
    assert tiled.mixed_fraction(flat, 0.0, 1.0).tolist() == [0.0]
    stab, area, boxes = tiled.stats(flat, 0.0, 1.0)
    assert stab.item() == 0.0 and area.item() == 600 * 450
    assert boxes.tolist() == [[0, 0, 449, 599]]
    step = torch.full((1, 128, 128), -0.5)
    step[:, :, 64:] = 0.5  # one vertical edge at the mask threshold, all within +-1
    frac = tiled.mixed_fraction(step, 0.0, 1.0).item()
    assert 0.0 < frac < 0.05
    full = ops.upsample_logits(step, 512, (512, 384), (600, 450))
    stab, area, boxes = tiled.stats(step, 0.0, 1.0)
    assert area.item() == (full > 0).sum().item()
    assert boxes.tolist() == ops.masks_to_boxes(full > 0).tolist()
    assert stab.item() == 0.0


def test_fast_runs_equal_simple_runs():
    masks = random_masks(9, 37, 53, seed=9)
    for offset, size in [((0, 0), (37, 53)), ((4, 6), (50, 70)), ((0, 13), (50, 53))]:
        a = ops.masks_to_runs(masks, offset, size)
        b = ops.masks_to_runs_fast(masks, offset, size)
        assert len(a) == len(b) == 9
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
