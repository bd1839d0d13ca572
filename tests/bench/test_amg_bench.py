"""The generator benchmark's bf16-vs-fp32 comparisons."""

import numpy as np
import pytest

from bench.amg import _best_ious, decoder_agreement
from sam import sam_model_registry
from sam.scenes import make_scene


def _record(mask):
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
    return {"segmentation": mask, "bbox": box}  # SA-1B boxes: inclusive last pixel


def test_best_ious_hand_computed_both_ways():
    a = np.zeros((20, 30), bool)
    a[2:6, 3:9] = True  # 24 px
    b = np.zeros_like(a)
    b[2:6, 5:11] = True  # 24 px, 16 shared: IoU 16 / 32
    c = np.zeros_like(a)
    c[15:18, 20:29] = True  # far away: its box does not touch the others
    d = np.zeros_like(a)
    d[6:8, 9:12] = True  # diagonal neighbour of a: boxes do not overlap, IoU 0
    fwd = _best_ious([_record(a), _record(c)], [_record(b), _record(d)])
    assert fwd == pytest.approx([0.5, 0.0])
    bwd = _best_ious([_record(b), _record(d)], [_record(a), _record(c)])
    assert bwd == pytest.approx([0.5, 0.0])
    assert _best_ious([_record(c)], [_record(c)]) == pytest.approx([1.0])
    assert len(_best_ious([], [_record(a)])) == 0


def test_decoder_agreement_reports_close_bf16_masks():
    model = sam_model_registry["tiny"]()
    image = make_scene(seed=40_002, height=200, width=260).image
    line = decoder_agreement(model, image, n=4, batch=6)
    assert "(4x4 grid, 48 masks)" in line
    mean_iou = float(line.split("mean mask IoU ")[1].split(",")[0])
    assert 0.9 <= mean_iou <= 1.0, line


def test_checkpoint_weights_reach_both_sides(tmp_path, monkeypatch, capsys):
    """`--checkpoint` loads the given weights into our model and the reference's alike
    (not the bundled or seeded ones), and is refused without the one model it holds."""
    import sys

    import torch

    from bench import amg
    from bench.common import model_pair

    sd = sam_model_registry["tiny"]().state_dict()
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "shifted.pth"
    torch.save(sd, path)
    ours, ref = model_pair("tiny", "cpu", str(path))
    for model in (ours, ref):
        got = model.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    monkeypatch.setattr(sys, "argv", ["bench.amg", "--checkpoint", str(path)])
    with pytest.raises(SystemExit) as e:
        amg.main()
    assert e.value.code == 2
    assert "name the one model it holds with --models" in capsys.readouterr().err
