"""The shipped tiny checkpoint: recorded, loadable offline, identical in our model and
the reference classes, and it really segments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as RefPredictor

import sam as sam_pkg
from sam import SamPredictor, build_sam, sam_model_registry
from sam.config import model_config
from sam.scenes import make_scene
from tests.reference import build_reference_sam

WEIGHTS = Path(sam_pkg.__file__).resolve().parent / "weights"
CKPT = WEIGHTS / "sam_tiny.pth"
META = WEIGHTS / "sam_tiny.json"
HELD_OUT_SEED = 4242  # below sam.train.TRAIN_SEED_BASE: never used in training


@pytest.fixture(scope="module")
def state_dict():
    if not CKPT.exists():
        pytest.fail("the tiny checkpoint is not shipped")
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def models(state_dict):
    ours = sam_model_registry["tiny"]()
    ref = build_reference_sam(model_config("tiny"), state_dict)
    return ours.eval(), ref.eval()


@pytest.fixture(scope="module")
def scene():
    return make_scene(HELD_OUT_SEED, 600, 820, max_objects=8)


def test_checkpoint_is_recorded_and_in_official_format(state_dict):
    meta = json.loads(META.read_text())
    assert meta["sha256"] == hashlib.sha256(CKPT.read_bytes()).hexdigest()
    assert CKPT.stat().st_size < 16 * 2**20, "a few MB"
    cfg = model_config("tiny")
    assert {k: v for k, v in meta["config"].items()} == cfg
    assert meta["seed"] is not None and meta["steps"] > 0 and "data" in meta
    ref_keys = set(build_reference_sam(cfg).state_dict())
    assert set(state_dict) == ref_keys
    assert all(v.dtype == torch.float32 for v in state_dict.values())


def test_registry_loads_bundled_weights_without_arguments(models, state_dict):
    ours, _ = models
    loaded = ours.state_dict()
    for k, v in state_dict.items():
        assert torch.equal(loaded[k], v), k
    assert torch.equal(
        build_sam("tiny").state_dict()["mask_decoder.iou_token.weight"],
        state_dict["mask_decoder.iou_token.weight"],
    )


def test_identical_outputs_in_our_model_and_the_reference(models, scene):
    ours, ref = models
    p_ours, p_ref = SamPredictor(ours), RefPredictor(ref)
    p_ours.set_image(scene.image)
    p_ref.set_image(scene.image)
    e_ours = p_ours.get_image_embedding()
    e_ref = p_ref.get_image_embedding()
    assert e_ours.shape == e_ref.shape
    assert torch.allclose(e_ours, e_ref, atol=1e-4, rtol=0)

    objs = scene.indices("object")[:3]
    for i in objs:
        ys, xs = np.nonzero(scene.masks[i])
        pt = np.array([[xs[len(xs) // 2], ys[len(ys) // 2]]], dtype=float)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
        for kw in (
            {"point_coords": pt, "point_labels": np.array([1]), "multimask_output": True},
            {"box": box, "multimask_output": False},
        ):
            m_o, s_o, low_o = p_ours.predict(**kw, return_logits=True)
            m_r, s_r, low_r = p_ref.predict(**kw, return_logits=True)
            # float32 rounding in the decoder's last products grows with the size of the
            # terms, i.e. with the logits' scale (sharp masks reach |logit| ~ 80): the
            # reference run on 1 and on 2 threads differs by up to ~1e-6 of that scale
            scale = max(1.0, float(np.abs(low_r).max()) / 16)
            assert np.allclose(low_o, low_r, atol=1e-4 * scale, rtol=1e-5)
            assert np.allclose(s_o, s_r, atol=1e-4)
            assert np.allclose(m_o, m_r, atol=1e-3 * scale, rtol=1e-5)
            # binary masks agree except where a logit sits within rounding of zero
            diff = (m_o > 0) != (m_r > 0)
            assert not (diff & (np.abs(m_r) > 1e-3 * scale)).any()


def _point_mean_iou(model, scene) -> float:
    from bench.quality import interior_point

    pred = SamPredictor(model)
    pred.set_image(scene.image)
    ious = []
    for i in scene.indices("object"):
        x, y = interior_point(scene.masks[i])
        masks, _, _ = pred.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        inter = (masks & scene.masks[i]).sum((1, 2))
        union = (masks | scene.masks[i]).sum((1, 2))
        ious.append((inter / union).max())
    return float(np.mean(ious))


def test_tiny_model_segments_a_held_out_scene(models, scene):
    """Independent expectation: the ground truth of a scene it never saw, with the same
    architecture at its random initialisation as the floor to beat."""
    from sam.model import build_sam_from_config

    ours, _ = models
    trained = _point_mean_iou(ours, scene)
    torch.manual_seed(0)
    untrained = _point_mean_iou(build_sam_from_config(model_config("tiny")).eval(), scene)
    # the shipped model scores about 0.8 on held-out scenes (README): a checkpoint that
    # fell far below that must not pass as "it segments"
    assert trained > max(0.7, 2 * untrained), (trained, untrained)


def test_tiny_preset_finds_most_objects_of_a_held_out_scene(models):
    """The generator's ``tiny`` preset suits the bundled model: on a held-out scene of
    bench.quality it finds most ground-truth objects and parts at IoU 0.5, with most of
    its masks right, and no fewer than at SAM's default thresholds (bench.quality's own
    measure, checked by hand in tests/bench)."""
    from bench.quality import amg_recall, eval_scene
    from sam.amg import PRESETS

    ours, _ = models
    scene = eval_scene(1003)  # 537 x 674, 11 objects and parts

    def run(preset):
        return amg_recall(ours, [scene], points_per_side=16, **PRESETS[preset])

    tiny, default = run("tiny"), run("default")
    assert tiny["recall@0.5"] >= 0.8 and tiny["precision@0.5"] >= 0.6, (tiny, default)
    assert tiny["recall@0.5"] >= default["recall@0.5"], (tiny, default)
