"""Our SAM against the reference `segment-anything` package, with identical weights."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from sam import SamPredictor, build_sam, model_config, sam_model_registry
from sam.model import build_sam_from_config
from tests.conftest import SMALL_CONFIG, random_state_dict
from tests.reference import build_reference_sam, segment_anything

REL = 1e-4


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A non-trivial RGB image: blobs of colour plus noise, so resizing matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """Our model and the reference built from one saved random state dict."""
    ref = build_reference_sam(SMALL_CONFIG)
    sd = random_state_dict(ref, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.save(sd, path)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ours = build_sam(SMALL_CONFIG, checkpoint=path)
    return ours, ref


# ----------------------------------------------------------------------------- keys
@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b"])
def test_official_key_sets(name):
    """The reference's own builders define the official state-dict format."""
    with torch.device("meta"):
        ref = segment_anything.sam_model_registry[name]()
        ours = build_sam_from_config(model_config(name))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_default_is_vit_h():
    assert model_config("default") == model_config("vit_h")
    assert sam_model_registry["default"] is sam_model_registry["vit_h"]


def test_model_config_is_complete():
    cfg = model_config("vit_b")
    for key in [
        "image_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
        "encoder_window_size", "encoder_global_attn_indexes", "prompt_embed_dim",
        "mask_in_chans", "decoder_depth", "decoder_mlp_dim", "decoder_num_heads",
        "iou_head_depth", "iou_head_hidden_dim",
    ]:
        assert key in cfg
    assert (cfg["encoder_embed_dim"], cfg["encoder_depth"], cfg["encoder_num_heads"]) == (768, 12, 12)
    with pytest.raises(KeyError, match="unknown model"):
        model_config("vit_x")


# ----------------------------------------------------------------------------- parity
def test_small_config_embeddings_and_decoder(small_pair):
    ours, ref = small_pair
    x = torch.rand(2, 3, 256, 256) * 255
    with torch.no_grad():
        e_ref = ref.image_encoder(ref.preprocess(x))
        e_our = ours.image_encoder(ours.preprocess(x))
    assert rel_err(e_our, e_ref) < REL


PROMPTS = {
    "one_point": dict(point_coords=[[50, 40]], point_labels=[1]),
    "points": dict(point_coords=[[50, 40], [200, 120], [10, 300]], point_labels=[1, 0, 1]),
    "box": dict(box=[30, 20, 300, 200]),
    "box_and_points": dict(box=[30, 20, 300, 200], point_coords=[[100, 100]], point_labels=[0]),
}


@pytest.mark.parametrize("shape", [(333, 517), (517, 333), (257, 255), (64, 300)])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_small_config_predictor(small_pair, shape, prompt, multimask):
    ours, ref = small_pair
    image = textured_image(*shape, seed=sum(shape))
    p_ref, p_our = segment_anything.SamPredictor(ref), SamPredictor(ours)
    p_ref.set_image(image)
    p_our.set_image(image)
    assert rel_err(p_our.get_image_embedding(), p_ref.get_image_embedding()) < REL
    kwargs = dict(PROMPTS[prompt])
    kwargs = {k: np.asarray(v) for k, v in kwargs.items()}
    m_ref, i_ref, l_ref = p_ref.predict(**kwargs, multimask_output=multimask)
    m_our, i_our, l_our = p_our.predict(**kwargs, multimask_output=multimask)
    assert m_our.shape == m_ref.shape == ((3 if multimask else 1), *shape)
    assert rel_err(l_our, l_ref) < REL
    assert rel_err(i_our, i_ref) < REL
    assert agreement(m_our, m_ref) >= 0.9999
    # mask input: feed the best low-res logits back
    best = int(np.argmax(i_ref))
    m2_ref, i2_ref, l2_ref = p_ref.predict(**kwargs, mask_input=l_ref[best : best + 1], multimask_output=multimask)
    m2_our, i2_our, l2_our = p_our.predict(**kwargs, mask_input=l_ref[best : best + 1], multimask_output=multimask)
    assert rel_err(l2_our, l2_ref) < REL
    assert rel_err(i2_our, i2_ref) < REL
    assert agreement(m2_our, m2_ref) >= 0.9999


def test_small_config_return_logits_and_torch_batch(small_pair):
    ours, ref = small_pair
    image = textured_image(301, 413, seed=3)
    p_ref, p_our = segment_anything.SamPredictor(ref), SamPredictor(ours)
    p_ref.set_image(image)
    p_our.set_image(image)
    coords = torch.tensor([[[30.0, 40.0]], [[200.0, 100.0]], [[120.0, 250.0]]])
    coords = p_ref.transform.apply_coords_torch(coords, image.shape[:2])
    labels = torch.ones(3, 1, dtype=torch.int)
    boxes = p_ref.transform.apply_boxes_torch(torch.tensor([[10.0, 10, 200, 200]] * 3), image.shape[:2])
    r = p_ref.predict_torch(coords, labels, boxes, multimask_output=True, return_logits=True)
    o = p_our.predict_torch(coords, labels, boxes, multimask_output=True, return_logits=True)
    for a, b in zip(o, r):
        assert a.shape == b.shape
        assert rel_err(a, b) < REL


def test_sam_forward_matches_reference(small_pair):
    ours, ref = small_pair
    from segment_anything.utils.transforms import ResizeLongestSide

    t = ResizeLongestSide(256)
    batch = []
    for shape in [(200, 300), (300, 120)]:
        image = textured_image(*shape)
        x = torch.as_tensor(t.apply_image(image)).permute(2, 0, 1).float()
        pts = t.apply_coords_torch(torch.tensor([[[20.0, 30.0], [100.0, 60.0]]]), shape)
        batch.append({"image": x, "original_size": shape, "point_coords": pts,
                      "point_labels": torch.tensor([[1, 0]])})
    r = ref(batch, multimask_output=True)
    o = ours(batch, multimask_output=True)
    for a, b in zip(o, r):
        assert rel_err(a["low_res_logits"], b["low_res_logits"]) < REL
        assert rel_err(a["iou_predictions"], b["iou_predictions"]) < REL
        assert agreement(a["masks"].numpy(), b["masks"].numpy()) >= 0.9999


def test_set_images_batched_equals_single(small_pair):
    ours, _ = small_pair
    images = [textured_image(120, 200, 1), textured_image(333, 150, 2), textured_image(256, 256, 3)]
    p = SamPredictor(ours)
    p.set_images(images)
    assert p.num_images == 3 and p.get_image_embedding().shape[0] == 3
    for i, image in enumerate(images):
        single = SamPredictor(ours)
        single.set_image(image)
        p.select(i)
        assert p.original_size == image.shape[:2]
        assert rel_err(p.features, single.features) < REL
        a = p.predict(np.array([[40, 50]]), np.array([1]))
        b = single.predict(np.array([[40, 50]]), np.array([1]))
        assert rel_err(a[2], b[2]) < REL
    p.select(-1)  # Python's negative index: the last image
    assert p.original_size == images[-1].shape[:2] and p.features.shape[0] == 1
    p.select(0)
    with pytest.raises(IndexError, match="image index 3 out of range for 3 images"):
        p.select(3)
    assert p.original_size == images[0].shape[:2]  # a refused index changes nothing


def test_vit_b_parity(tmp_path):
    """vit_b at full size on an odd, non-square image: points, box and mask input."""
    ref = segment_anything.sam_model_registry["vit_b"]()
    sd = random_state_dict(ref, seed=2)
    path = tmp_path / "vit_b_random.pth"
    torch.save(sd, path)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ours = sam_model_registry["vit_b"](checkpoint=path)
    image = textured_image(451, 603, seed=7)
    p_ref, p_our = segment_anything.SamPredictor(ref), SamPredictor(ours)
    p_ref.set_image(image)
    p_our.set_image(image)
    assert rel_err(p_our.features, p_ref.features) < REL
    cases = [
        dict(point_coords=np.array([[100, 200], [400, 50]]), point_labels=np.array([1, 0])),
        dict(box=np.array([50, 60, 500, 400])),
    ]
    for kw in cases:
        for mm in (True, False):
            r = p_ref.predict(**kw, multimask_output=mm)
            o = p_our.predict(**kw, multimask_output=mm)
            assert rel_err(o[2], r[2]) < REL
            assert rel_err(o[1], r[1]) < REL
            assert agreement(o[0], r[0]) >= 0.9999
    # mask input: the box prompt's low-res logits refine the point prompt
    prior = p_ref.predict(**cases[1], multimask_output=False)[2]
    r = p_ref.predict(**cases[0], mask_input=prior)
    o = p_our.predict(**cases[0], mask_input=prior)
    assert rel_err(o[2], r[2]) < REL
    assert agreement(o[0], r[0]) >= 0.9999


# token-side use, by hand: T = 5 output tokens + n_points + 1 (padding point); the token
# side is cheaper when heads * T < dim / 2 (the attention's internal width): 8 * 7 = 56 < 128,
# 4 * 9 = 36 < 64, but 8 * 18 = 144 >= 128
@pytest.mark.parametrize(
    "dim,heads,n_points,token_side_used",
    [(256, 8, 1, True), (128, 4, 3, True), (256, 8, 12, False)],
)
def test_decoder_token_side_projections_equal_direct(
    dim, heads, n_points, token_side_used, monkeypatch
):
    """The decoder's cross-attentions evaluated with the projections moved to the token
    side (associativity, softmax shift invariance) are the same functions: in float64 they
    agree with the direct evaluation to rounding, for a shared image and for one image
    per prompt; with many tokens (H * T >= D) the direct evaluation is used."""
    from sam.mask_decoder import MaskDecoder, TwoWayTransformer

    torch.manual_seed(dim + n_points)
    dec = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=4 * dim, num_heads=heads),
    ).double()
    with torch.no_grad():  # non-zero biases everywhere, so dropping/spreading them is tested
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    b, side = 5, 16
    image = torch.randn(1, dim, side, side, dtype=torch.float64)
    pe = torch.randn(1, dim, side, side, dtype=torch.float64)
    sparse = torch.randn(b, n_points + 1, dim, dtype=torch.float64)
    dense = torch.randn(1, dim, 1, 1, dtype=torch.float64).expand(b, dim, side, side)
    from sam.mask_decoder import Attention

    calls = []
    direct = Attention.tokens_to_image
    monkeypatch.setattr(
        Attention, "tokens_to_image", lambda self, *a: calls.append(1) or direct(self, *a)
    )
    per_prompt = image.expand(b, -1, -1, -1) + 0.1 * torch.randn(b, dim, side, side, dtype=torch.float64)
    for emb in (image, per_prompt):
        outs = []
        for token_side in (False, True):
            dec.transformer.token_side = token_side
            calls.clear()
            with torch.no_grad():
                outs.append(dec.predict_masks(emb, pe, sparse, dense))
        # token->image attentions: 2 blocks + the final one; a shared image stays at batch
        # 1 (projected once) through the first block only, then each prompt has its own
        expected = (3 if emb is per_prompt else 2) if token_side_used else 0
        assert len(calls) == expected
        for a, c in zip(*outs):
            assert torch.allclose(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_above_is_independent_of_the_cpu_chunk(small_pair, monkeypatch, chunk):
    """The CPU decodes a few prompts at a time; the result equals one pass over all."""
    from sam import runtime

    ours, _ = small_pair
    pred = SamPredictor(ours)
    pred.set_image(textured_image(70, 90, seed=3))
    rng = np.random.default_rng(0)
    pts = torch.as_tensor(rng.uniform(0, 60, (10, 1, 2)), dtype=torch.float)
    lbl = torch.ones(10, 1, dtype=torch.int)
    _, iou_all = pred.decode_low_res(pts, lbl)
    thresh = float(iou_all.median())  # some prompts kept, some dropped
    monkeypatch.setattr(runtime, "decoder_chunk", lambda *a: None)
    whole = pred.decode_above(pts, lbl, thresh)
    monkeypatch.setattr(runtime, "decoder_chunk", lambda *a: chunk)
    parts = pred.decode_above(pts, lbl, thresh)
    assert 0 < len(whole[1]) < iou_all.numel()
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_allocator_tuning_is_idempotent_and_can_be_refused():
    code = "from sam import runtime; print(runtime.tune_cpu_allocator(), runtime.tune_cpu_allocator())"
    env = dict(os.environ)
    env.pop("SAM_NO_MALLOPT", None)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    off = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "SAM_NO_MALLOPT": "1"}
    )
    assert off.stdout.split() == ["False", "False"]
    first, second = on.stdout.split()
    assert first == second  # True on glibc, False elsewhere; never raises
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first == "True"
