"""Opt-in fast paths: bf16 autocast and on-device resizing, measured against fp32/Pillow."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sam import SamPredictor, sam_model_registry
from sam.scenes import make_scene


@pytest.fixture(scope="module")
def tiny():
    return sam_model_registry["tiny"]()


def _object_points(scene, k=6):
    """The most interior pixel of each of the first ``k`` instances: a point near an edge
    is ambiguous, and there fp32 itself sits on a knife edge between two masks."""
    import cv2

    pts = []
    for m in scene.masks[:k]:
        if m.any():
            dist = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5)
            y, x = np.unravel_index(int(dist[1:-1, 1:-1].argmax()), m.shape)
            pts.append((x, y))
    return pts


@pytest.mark.parametrize("mode", ["bf16", "fp16", "torch_resize"])
def test_fast_modes_agree_with_exact(mode):
    tiny = sam_model_registry["tiny"]()  # fresh: nothing cached from an fp32 run
    scene = make_scene(seed=40_001, height=420, width=560)
    if mode == "torch_resize":
        fast = SamPredictor(tiny, resize="torch")
    else:
        fast = SamPredictor(tiny, precision=mode)
    exact = SamPredictor(tiny)
    fast.set_image(scene.image)  # the fast mode runs first, as in a bf16-only job
    exact.set_image(scene.image)
    ious = []
    for x, y in _object_points(scene, k=8):
        a = exact.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)[0][0]
        b = fast.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)[0][0]
        ious.append((a & b).sum() / max(1, (a | b).sum()))  # IoU: not flattered by background
    assert len(ious) >= 6
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.9, np.round(ious, 3)


def test_positional_encodings_stay_fp32_under_autocast():
    """The Fourier phases reach ~2 pi * 10 rad; in bf16 they would be off by ~0.1 rad.
    Computed first under autocast (so that is what gets cached), they must equal fp32."""
    fresh = sam_model_registry["tiny"]()
    pe = fresh.prompt_encoder
    pts = (torch.tensor([[[10.0, 20.0], [500.0, 300.0]]]), torch.tensor([[1, 0]]))
    box = torch.tensor([[5.0, 7.0, 400.0, 480.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_bf16 = pe.get_dense_pe()
        sparse_bf16, _ = pe(points=pts, boxes=box, masks=None)
    reference = sam_model_registry["tiny"]().prompt_encoder
    assert dense_bf16.dtype == torch.float32
    assert torch.equal(dense_bf16, reference.get_dense_pe())
    assert torch.equal(pe.get_dense_pe(), reference.get_dense_pe())  # cache not poisoned
    sparse, _ = reference(points=pts, boxes=box, masks=None)
    assert torch.equal(sparse_bf16.float(), sparse)


def test_constant_tensors_are_cached(tiny):
    pe = tiny.prompt_encoder
    assert pe.get_dense_pe() is pe.get_dense_pe()


def test_bad_options(tiny):
    with pytest.raises(ValueError, match="precision"):
        SamPredictor(tiny, precision="int8")
    with pytest.raises(ValueError, match="resize"):
        SamPredictor(tiny, resize="cubic")
    p = SamPredictor(tiny)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(np.array([[1, 1]]), np.array([1]))
    with pytest.raises(ValueError, match="set_torch_image"):
        p.set_torch_image(torch.zeros(1, 3, 10, 10), (10, 10))


def test_decoder_image_tokens_stay_in_autocast_dtype_for_inference():
    """Under autocast without autograd the per-prompt image tokens (the decoder's largest
    tensors) stay bf16 end to end and agree with fp32 to bf16 rounding; with autograd
    (training) and without autocast they stay fp32. On SAM_TEST_DEVICE (default cpu;
    CUDA's autocast differs)."""
    device = os.environ.get("SAM_TEST_DEVICE", "cpu")
    dec = sam_model_registry["tiny"]().to(device).mask_decoder  # the module's fixture stays
    c = dec.transformer_dim
    g = torch.Generator().manual_seed(0)
    image, pe = (torch.randn(1, c, 16, 16, generator=g).to(device) for _ in range(2))
    tokens = torch.randn(5, 7, c, generator=g).to(device)  # 5 prompts over one shared image
    dense = torch.zeros(1, c, 16, 16, device=device)
    with torch.no_grad():
        q32, k32 = dec.transformer(image, pe, tokens)
        with torch.autocast(device, dtype=torch.bfloat16):
            q16, k16 = dec.transformer(image, pe, tokens)
            low_res, _ = dec.predict_masks(image, pe, tokens[:, 2:], dense)
    assert k32.dtype == torch.float32 and k16.dtype == torch.bfloat16
    assert low_res.dtype == torch.bfloat16
    rel = (k16.float() - k32).norm() / k32.norm()
    assert 1e-4 < rel < 3e-2  # bf16 rounding: present, and small
    assert (q16.float() - q32).norm() / q32.norm() < 3e-2
    with torch.autocast(device, dtype=torch.bfloat16):  # autograd on: as in training
        _, k_train = dec.transformer(image, pe, tokens)
    assert k_train.dtype == torch.float32


def test_predicted_ious_are_not_rounded_to_bf16(tiny):
    """The IoU head runs in fp32 under autocast: bf16 would round scores to steps of
    1/256, moving the 0.88 threshold and tying NMS ranks. Both decoding paths (the
    predictor's and the generator's, which upscales only masks over the threshold)."""
    scene = make_scene(seed=40_002, height=300, width=400)
    fast = SamPredictor(tiny, precision="bf16")
    fast.set_image(scene.image)
    pts = torch.tensor(_object_points(scene, k=8), dtype=torch.float)
    coords = fast.transform.apply_coords_torch(pts, scene.image.shape[:2])[:, None]
    labels = torch.ones(len(pts), 1, dtype=torch.int)
    _, iou, _ = fast.predict_torch(coords, labels, multimask_output=True)
    _, above, _ = fast.decode_above(coords, labels, -1e9)
    for scores in (iou.flatten(), above):
        assert scores.dtype == torch.float32 and len(scores) >= 18
        as_bf16 = scores.to(torch.bfloat16).float()
        assert (as_bf16 != scores).float().mean() > 0.5, scores  # not bf16 values
    torch.testing.assert_close(above, iou.flatten(), rtol=0, atol=1e-6)
