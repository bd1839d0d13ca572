"""Opt-in fast paths: bf16 autocast and on-device resizing, measured against fp32/Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam import SamPredictor, sam_model_registry
from sam.scenes import make_scene


@pytest.fixture(scope="module")
def tiny():
    return sam_model_registry["tiny"]()


def _object_points(scene, k=6):
    pts = []
    for m in scene.masks[:k]:
        ys, xs = np.nonzero(m)
        if len(xs):
            i = len(xs) // 2
            pts.append((xs[i], ys[i]))
    return pts


@pytest.mark.parametrize("mode", ["bf16", "torch_resize"])
def test_fast_modes_agree_with_exact(tiny, mode):
    scene = make_scene(seed=40_001, height=420, width=560)
    exact = SamPredictor(tiny)
    fast = SamPredictor(tiny, precision="bf16") if mode == "bf16" else SamPredictor(tiny, resize="torch")
    exact.set_image(scene.image)
    fast.set_image(scene.image)
    agree = []
    for x, y in _object_points(scene):
        a = exact.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)[0]
        b = fast.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)[0]
        agree.append((a == b).mean())
    assert len(agree) >= 3
    assert np.mean(agree) >= 0.98, agree


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
