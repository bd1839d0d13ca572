"""The training command: data, losses, and a short run that reduces the loss."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from sam import train as T

# A very small SAM (same family) so a few training steps take seconds.
MICRO = {
    "name": "micro",
    "image_size": 128,
    "patch_size": 16,
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_window_size": 4,
    "encoder_global_attn_indexes": [1],
    "prompt_embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}
SMALL_DATA = {"p_native": 1.0, "max_objects": 4, "p_jpeg": 0.0}


def test_focal_dice_iou_hand_computed():
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    p = torch.sigmoid(logits)
    # focal: -alpha_t (1 - p_t)^2 log p_t per pixel, averaged
    pt = torch.tensor([[0.5, float(p[0, 0, 1])], [1 - float(p[0, 1, 0]), 0.5]])
    at = torch.tensor([[0.25, 0.25], [0.75, 0.75]])
    want = (-at * (1 - pt) ** 2 * torch.log(pt)).mean()
    assert torch.allclose(T.focal_loss(logits, target), want.reshape(1), atol=1e-6)
    inter = float(p[0, 0, 0] + p[0, 0, 1])
    dice = 1 - (2 * inter + 1) / (float(p.sum()) + 2 + 1)
    assert math.isclose(float(T.dice_loss(logits, target)), dice, rel_tol=1e-6)
    # IoU of logits > 0 (only (0, 1)) with the target (two pixels): 1 / 2
    assert float(T.mask_iou(logits, target)) == pytest.approx(0.5)


def test_scene_seeds_never_reach_held_out_range():
    seeds = [T.scene_seed(s, step, i, 4) for s in (0, 3) for step in (0, 10**6) for i in range(4)]
    assert min(seeds) >= T.TRAIN_SEED_BASE
    assert len(set(seeds)) == len(seeds)


def _scene_of(sample, data):
    return T.make_scene(
        sample["seed"],
        *sample["valid"],
        **{k: data[k] for k in ("max_objects", "min_objects", "parts_prob")},
        max_background_regions=data["max_background_regions"],
        min_size=data["min_size"],
        max_size=data["max_size"],
    )


def test_sample_targets_and_prompts_match_the_scene():
    data = {**T.DEFAULT_DATA, **SMALL_DATA}
    s = T.make_sample(T.scene_seed(0, 0, 0, 1), 128, 6, data, target_scale=1)
    tgt = s["target"]
    assert tgt.shape[1:] == (32, 32) and 0 <= float(tgt.min()) and float(tgt.max()) <= 1
    areas = set(_scene_of(s, data).areas().tolist())
    for j in range(len(tgt)):
        # at native size the low-res target is an exact 4x4 average: area is preserved
        area = round(float(tgt[j].sum()) * 16)
        assert area in areas
        if not s["is_box"][j]:
            x, y = s["coords"][j].tolist()
            assert tgt[j, int(y) // 4, int(x) // 4] > 0, "the point lies on its target"


def test_hard_instances_weigh_more_when_asked():
    data = {**T.DEFAULT_DATA, **SMALL_DATA, "max_objects": 8, "hard_weight": 1e6}
    seen = {"hard": 0, "other": 0}
    for i in range(40):
        s = T.make_sample(T.scene_seed(0, i, 0, 1), 128, 1, data, target_scale=1)
        scene = _scene_of(s, data)
        areas = scene.areas()
        image_area = scene.height * scene.width
        hard = [
            k
            for k, kind in enumerate(scene.kinds)
            if kind != "background"
            and (scene.shapes[k] == "bar" or areas[k] < data["small_area"] * image_area)
        ]
        w = T.instance_weights(scene, data)
        for k, kind in enumerate(scene.kinds):  # the weights follow the documented rule
            base = data["bg_weight"] if kind == "background" else 1.0
            assert w[k] == pytest.approx(base * (1e6 if k in hard else 1.0))
        if not hard:
            continue
        area = round(float(s["target"][0].sum()) * 16)  # native size: area is exact
        seen["hard" if any(areas[k] == area for k in hard) else "other"] += 1
    assert seen["hard"] >= 5 and seen["other"] == 0, seen
    # the default leaves the weighting as it was: objects 1, background 0.4
    w = T.instance_weights(scene, {**data, "hard_weight": 1.0})
    assert set(w.tolist()) <= {1.0, data["bg_weight"]}


def test_weighted_prompts_follow_the_weights_on_crowded_scenes():
    """With 16 prompts on scenes of about as many instances, "cover" sampling gives every
    instance one prompt whatever its weight; weighted_prompts=1 draws every prompt by
    weight, so the hard share approaches the weighted share."""
    base = {**T.DEFAULT_DATA, **SMALL_DATA, "min_objects": 10, "max_objects": 14, "hard_weight": 4.0}

    def hard_share(data):
        got = want = 0.0
        for i in range(12):
            s = T.make_sample(T.scene_seed(0, i, 0, 1), 128, 16, data, target_scale=1)
            scene = _scene_of(s, data)
            w = T.instance_weights(scene, data)
            hard = w > np.where(np.array(scene.kinds) == "background", data["bg_weight"], 1.0)
            areas = scene.areas()
            for t in s["target"]:
                k = int(np.flatnonzero(areas == round(float(t.sum()) * 16))[0])
                got += hard[k]
            want += 16 * w[hard].sum() / w.sum()
        return got / (12 * 16), want / (12 * 16)

    cover, expected = hard_share(base)
    weighted, expected2 = hard_share({**base, "weighted_prompts": 1})
    assert expected == pytest.approx(expected2)
    assert weighted > cover + 0.1 and abs(weighted - expected) < 0.1, (cover, weighted, expected)


def test_centre_points_and_the_inference_pixel_convention():
    """p_centre_point=1 puts every point prompt on the instance's centre line (within 1 px
    of its largest boundary distance); point_offset=0 passes pixel indices as the
    predictor does (its prompt encoder adds the half pixel)."""
    import cv2

    data = {**T.DEFAULT_DATA, **SMALL_DATA, "p_centre_point": 1.0, "point_offset": 0.0}
    n = 0
    for i in range(6):
        s = T.make_sample(T.scene_seed(0, i, 0, 1), 128, 6, data, target_scale=1)
        scene = _scene_of(s, data)
        assert max(scene.height, scene.width) == 128  # native size: coordinates are pixels
        areas = scene.areas()
        for j in np.flatnonzero(~s["is_box"].numpy()):
            x, y = s["coords"][j].tolist()
            assert x == int(x) and y == int(y)  # a pixel index, no half-pixel shift
            k = int(np.flatnonzero(areas == round(float(s["target"][j].sum()) * 16))[0])
            m = scene.masks[k]
            dist = cv2.distanceTransform(np.pad(m.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
            assert m[int(y), int(x)] and dist[int(y), int(x)] >= dist.max() - 1.0
            n += 1
    assert n >= 5
    with pytest.raises(ValueError, match="weighted_prompts must be 0 or 1"):
        T.check_data({"weighted_prompts": 2})


def test_tight_and_jittered_box_prompts():
    """p_box=1 makes every object and part prompt a box; p_tight_box=1 gives each the
    instance's tight box in pixel edges (bench.quality's convention), 0 the jittered box
    of the default recipe."""
    data = {**T.DEFAULT_DATA, **SMALL_DATA, "p_box": 1.0, "p_tight_box": 1.0}
    n = jittered = 0
    for i in range(6):
        s = T.make_sample(T.scene_seed(0, i, 0, 1), 128, 6, data, target_scale=1)
        loose = T.make_sample(T.scene_seed(0, i, 0, 1), 128, 6, {**data, "p_tight_box": 0.0})
        scene = _scene_of(s, data)
        assert max(scene.height, scene.width) == 128  # native size: boxes are pixels
        areas = scene.areas()
        for j in range(len(s["target"])):
            k = int(np.flatnonzero(areas == round(float(s["target"][j].sum()) * 16))[0])
            assert bool(s["is_box"][j]) == (scene.kinds[k] != "background")
            if not s["is_box"][j]:
                continue
            m = scene.masks[k]
            ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            want = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
            assert s["boxes"][j].tolist() == pytest.approx(want)
            jittered += s["boxes"][j].tolist() != pytest.approx(loose["boxes"][j].tolist())
            n += 1
    assert n >= 10 and jittered >= n - 1, (n, jittered)
    with pytest.raises(ValueError, match="p_tight_box must be in"):
        T.check_data({"p_tight_box": 1.5})


@pytest.mark.parametrize("scale", [2, 4])
def test_binary_targets_on_a_finer_grid(scale):
    data = {**T.DEFAULT_DATA, **SMALL_DATA}
    seed = T.scene_seed(0, 0, 0, 1)
    s = T.make_sample(seed, 128, 6, data, target_scale=scale)
    soft = T.make_sample(seed, 128, 6, data, target_scale=1)["target"]
    tgt = s["target"]
    assert tgt.dtype == torch.bool and tgt.shape[1:] == (32 * scale, 32 * scale)
    scene = _scene_of(s, data)
    h, w = s["valid"]
    f = 4 // scale
    for j in range(len(tgt)):
        # at native size: the majority vote of each f x f block of one instance's mask
        padded = np.zeros((128, 128), bool)
        hits = []
        for m in scene.masks:
            padded[:h, :w] = m
            blocks = padded.reshape(32 * scale, f, 32 * scale, f).mean((1, 3)) > 0.5
            hits.append(np.array_equal(blocks, tgt[j].numpy()))
        assert sum(hits) >= 1
        # the same instance as the soft target: averaged down, they agree
        down = tgt[j].float().reshape(32, scale, 32, scale).mean((1, 3))
        assert float((down - soft[j]).abs().max()) <= 0.5 + 1e-6
        if not s["is_box"][j]:
            x, y = s["coords"][j].tolist()
            assert tgt[j, int(y * scale / 4), int(x * scale / 4)], "the point lies on its target"
    with pytest.raises(ValueError, match="target_scale"):
        T.make_sample(seed, 128, 6, data, target_scale=3)


def test_fine_targets_compare_upsampled_logits():
    """With binary targets 4x finer, the loss and IoU are taken on the logits upsampled
    the way the predictor upsamples them (bilinear, half-pixel centres)."""
    logits = torch.zeros(1, 1, 8, 8) - 6.0
    logits[..., 2:6, 2:6] = 6.0
    up = T.to_target_grid(logits, torch.zeros(1, 1, 32, 32))
    want = torch.nn.functional.interpolate(logits, (32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(up, want)
    assert T.to_target_grid(logits, torch.zeros(1, 1, 8, 8)) is logits
    hard = torch.zeros(1, 1, 32, 32)
    hard[..., 8:24, 8:24] = 1.0
    # hand-computed: along an edge the zero crossing falls exactly on the block's border
    # (pixel 7 -> -1.5, pixel 8 -> +1.5); at the 4 corners -6 + 12 * 0.625**2 < 0
    assert float(T.mask_iou(up, hard)) == pytest.approx(252 / 256)
    loss_up = T.seg_loss(up, hard)
    loss_sharper = T.seg_loss(up * 4, hard)  # same zero crossings, steeper edges
    assert float(loss_sharper) < float(loss_up)


def _fixed_loss(model, seeds):
    data = {**T.DEFAULT_DATA, **SMALL_DATA}
    batch = [T.make_sample(s, 128, 8, data) for s in seeds]
    with torch.no_grad():
        loss, _ = T.compute_loss(model, batch, 0.0, np.random.default_rng(0))
    return float(loss)


@pytest.mark.slow
def test_short_training_run_reduces_loss(tmp_path):
    out = tmp_path / "micro.pth"
    held_out = [T.TRAIN_SEED_BASE - 1 - i for i in range(4)]  # never trained on
    torch.manual_seed(0)
    initial = T.build_model(MICRO)
    before = _fixed_loss(initial, held_out)
    meta = T.train(
        str(out),
        steps=30,
        seed=0,
        config=MICRO,
        batch=2,
        prompts=8,
        lr=2e-3,
        warmup=5,
        workers=0,
        threads=1,
        save_every=0,
        data=SMALL_DATA,
        progress=False,
        log_every=10,
    )
    model = T.build_model(MICRO)
    sd = torch.load(out, weights_only=True)
    model.load_state_dict(sd, strict=True)
    after = _fixed_loss(model, held_out)
    assert after < 0.85 * before, (before, after)
    # the same initial weights (seeded) are what the run started from
    assert meta["steps"] == 30 and meta["seed"] == 0
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert json.loads(out.with_suffix(".json").read_text())["config"]["encoder_embed_dim"] == 32
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert set(sd) == set(initial.state_dict())


def test_resume_continues_from_saved_state(tmp_path):
    kw = dict(
        seed=1,
        config=MICRO,
        batch=1,
        prompts=4,
        warmup=1,
        workers=0,
        threads=1,
        save_every=2,
        data=SMALL_DATA,
        progress=False,
        refine_frac=0.5,  # the refinement round draws from the run's RNG
    )
    whole = str(tmp_path / "whole.pth")
    T.train(whole, steps=4, **kw)
    # the same run killed during step 3 (after the save at step 2), then resumed
    out = str(tmp_path / "m.pth")
    real, calls = T.compute_loss, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "compute_loss", dies_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            T.train(out, steps=4, **kw)
    assert torch.load(out + ".state", weights_only=True)["step"] == 2
    meta = T.train(out, steps=4, resume=True, **kw)
    assert meta["steps"] == 4
    a, b = torch.load(whole, weights_only=True), torch.load(out, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming changed the run"
    # the finished run leaves its final state: more steps later go on from step 4
    assert torch.load(out + ".state", weights_only=True)["step"] == 4


def test_loader_workers_split_steps_in_order():
    """Two loader workers make alternate steps; the batches arrive in step order and are
    the same as with no worker process."""
    data = {**T.DEFAULT_DATA, **SMALL_DATA}
    args = (7, 3, 9, 2, 128, 4, data)  # seed, start, steps, batch, size, prompts, data
    serial = [[s["seed"] for s in b] for b in T.SceneStream(*args)]
    loader = torch.utils.data.DataLoader(
        T.SceneStream(*args),
        batch_size=None,
        num_workers=2,
        worker_init_fn=T._worker_init,
        multiprocessing_context="spawn",
    )
    parallel = [[s["seed"] for s in b] for b in loader]
    want = [[T.scene_seed(7, step, i, 2) for i in range(2)] for step in range(3, 9)]
    assert serial == want and parallel == want


def test_normalise_matches_the_model_preprocessing():
    data = {**T.DEFAULT_DATA, "p_native": 0.0, "long_min": 300, "long_max": 400, "p_jpeg": 0.0}
    torch.manual_seed(0)
    model = T.build_model(MICRO)
    batch = [T.make_sample(T.scene_seed(0, 0, i, 2), 128, 4, data) for i in range(2)]
    x = T.normalise(batch, torch.device("cpu"))
    for i, s in enumerate(batch):
        h, w = s["valid"]
        assert (h, w) != (128, 128) and max(h, w) == 128
        want = model.preprocess(s["image"][:, :h, :w].float()[None])[0]
        torch.testing.assert_close(x[i], want)


def test_correction_points_hand_computed():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(4, 4, 4, dtype=torch.bool)
    prev = torch.full((4, 4, 4), -1.0)
    gt[0, 1:3, 1:3] = True  # 0: mask misses one pixel of the target -> positive click there
    prev[0, 1:3, 1:3] = 1.0
    prev[0, 2, 2] = -1.0
    gt[1, 0, 0] = True  # 1: mask spills over two pixels -> negative click on one of them
    prev[1, 0, 0] = prev[1, 3, 3] = prev[1, 3, 2] = 1.0
    gt[2, 3, 0] = True  # 2: exact mask -> positive click inside the target
    prev[2, 3, 0] = 1.0
    # 3: empty target (too thin for the grid) -> the fallback point, positive
    fallback = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 7.0]])
    pts, lab = T.correction_points(prev, gt, fallback, gen)
    assert lab.tolist() == [1, 0, 1, 1]
    assert pts[0].tolist() == [2 * 4 + 2, 2 * 4 + 2]  # (x, y) of cell (2, 2)
    assert pts[1].tolist() in ([3 * 4 + 2, 3 * 4 + 2], [2 * 4 + 2, 3 * 4 + 2])
    assert pts[2].tolist() == [0 * 4 + 2, 3 * 4 + 2]
    assert pts[3].tolist() == [9.0, 7.0]


def test_batched_loss_equals_the_mean_of_per_scene_losses():
    """All prompts of a batch go through the decoder together, each with its own scene's
    embedding: with equal prompt counts the batch loss is the mean of per-scene losses."""
    data = {**T.DEFAULT_DATA, **SMALL_DATA}
    torch.manual_seed(0)
    model = T.build_model(MICRO).eval()
    batch = [T.make_sample(T.scene_seed(1, 0, i, 3), 128, 6, data) for i in range(3)]
    # points of every scene are decoded before all boxes: the order differs from the batch's
    assert all(0 < int(s["is_box"].sum()) < len(s["is_box"]) for s in batch)
    with torch.no_grad():
        whole, stats = T.compute_loss(model, batch, 0.0, np.random.default_rng(0))
        parts = [T.compute_loss(model, [s], 0.0, np.random.default_rng(0)) for s in batch]
    assert float(whole) == pytest.approx(np.mean([float(p[0]) for p in parts]), rel=1e-4)
    assert stats["best_iou"] == pytest.approx(np.mean([p[1]["best_iou"] for p in parts]), rel=1e-4)


@pytest.mark.parametrize(
    "arg, message",
    [
        ('{"hard_weigth": 2}', "unknown data parameter(s) hard_weigth"),
        ("[1]", "expected a JSON object"),
        ("{bad", "not valid JSON"),
        ("missing.json", "missing.json"),
        ('{"bg_weight": 0}', "bg_weight must be > 0"),
        ('{"long_min": 900, "long_max": 500}', "long_min must be 64 <= min <= long_max"),
        ('{"p_jpeg": "yes"}', "p_jpeg must be a number"),
    ],
)
def test_bad_data_argument_is_refused_before_training(tmp_path, capsys, arg, message):
    out = tmp_path / "m.pth"
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(out), "--steps", "0", "--data", arg])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_data_argument_from_a_file_and_unknown_keys_in_the_api(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps({"hard_weight": 3.0, "max_objects": 5}))
    assert T._data_arg(None, str(f)) == {"hard_weight": 3.0, "max_objects": 5}
    with pytest.raises(ValueError, match="unknown data parameter"):
        T.train(out=str(tmp_path / "m.pth"), steps=0, data={"nope": 1})


def test_init_from_several_checkpoints_starts_from_their_mean(tmp_path, capsys):
    """--init with several state dicts starts from their element-wise mean (weight
    averaging) and records each input; inputs that do not fit together are refused."""
    paths = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"w{seed}.pth"))
        torch.save(T.build_model(MICRO).state_dict(), paths[-1])
    sds = [torch.load(q, weights_only=True) for q in paths]
    mean = T.mean_state_dict(paths)
    for k in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        torch.testing.assert_close(mean[k], (sds[0][k] + sds[1][k] + sds[2][k]) / 3)
    assert T.mean_state_dict(paths[:1])["mask_decoder.iou_token.weight"].equal(sds[0]["mask_decoder.iou_token.weight"])
    out = str(tmp_path / "avg.pth")
    meta = T.train(out, steps=1, seed=0, config=MICRO, batch=1, prompts=2, lr=1e-12, warmup=0,
                   workers=0, threads=1, save_every=0, data=SMALL_DATA, progress=False, init=paths[:2])
    assert [m["path"] for m in meta["init"]["mean_of"]] == ["w0.pth", "w1.pth"]
    assert meta["init"]["mean_of"][1]["sha256"] == hashlib.sha256(open(paths[1], "rb").read()).hexdigest()
    got = torch.load(out, weights_only=True)["mask_decoder.iou_token.weight"]
    want = (sds[0]["mask_decoder.iou_token.weight"] + sds[1]["mask_decoder.iou_token.weight"]) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # one step at lr 1e-12 moves nothing
    one = T.train(out, steps=1, seed=0, config=MICRO, batch=1, prompts=2, lr=1e-12, warmup=0,
                  workers=0, threads=1, save_every=0, data=SMALL_DATA, progress=False, init=paths[2])
    assert one["init"] == {"path": "w2.pth", "sha256": hashlib.sha256(open(paths[2], "rb").read()).hexdigest()}
    got = torch.load(out, weights_only=True)["mask_decoder.iou_token.weight"]
    torch.testing.assert_close(got, sds[2]["mask_decoder.iou_token.weight"], rtol=0, atol=1e-6)
    other = str(tmp_path / "other.pth")
    torch.save({k: v for k, v in sds[0].items() if not k.startswith("mask_decoder")}, other)
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path / "m.pth"), "--steps", "1", "--config", "tiny", "--init", paths[0], other])
    assert e.value.code == 2
    assert "other.pth: its keys or shapes differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "0"], "--prompts must be >= 1"),
        (["--log-every", "0"], "--log-every must be >= 1"),
        (["--max-minutes", "0"], "--max-minutes must be > 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--config", "vit_q"], "--config vit_q: "),
        (["--config", "nope.json"], "--config nope.json: No such file"),
        (["--init", "nope.pth"], "--init nope.pth: no such file"),
    ],
)
def test_bad_training_arguments_are_refused_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "m.pth"
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(out), "--steps", "1", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_metadata_cannot_overwrite_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="use a .pth name"):
        T.train(str(tmp_path / "m.json"), steps=0, config=MICRO)


def test_recorded_command_reruns_as_given(tmp_path):
    """The metadata's command is shell-quoted: split as a shell would, it gives back the
    arguments of the run, a JSON --data with its spaces and quotes included."""
    import shlex

    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    out = tmp_path / "m.pth"
    data = json.dumps({**SMALL_DATA, "hard_weight": 2.0})
    argv = ["--out", str(out), "--steps", "1", "--config", str(cfg), "--batch", "1",
            "--prompts", "2", "--threads", "1", "--workers", "0", "--save-every", "0",
            "--no-progress", "--data", data]  # fmt: skip
    T.main(argv)
    command = json.loads(out.with_suffix(".json").read_text())["command"]
    assert shlex.split(command) == ["python", "-m", "sam.train", *argv]
