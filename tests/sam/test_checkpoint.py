"""Checkpoint loading: strict, safe, and with one clear error naming the file."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

from sam import CheckpointError, build_sam, sam_model_registry
from sam.checkpoint import OFFICIAL_CHECKPOINTS, identify, recognise_official
from tests.conftest import SMALL_CONFIG, random_state_dict
from tests.reference import segment_anything


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory):
    """A state dict saved from the reference's vit_b, in the official format."""
    ref = segment_anything.sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("ckpt") / "vit_b_from_reference.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


def test_reference_vit_b_loads_strictly(vit_b_file):
    path, ref = vit_b_file
    model = sam_model_registry["vit_b"](checkpoint=path)
    ours = model.state_dict()
    theirs = ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_vit_b_file_offered_as_vit_l_fails_clearly(vit_b_file):
    path, _ = vit_b_file
    with pytest.raises(CheckpointError) as e:
        sam_model_registry["vit_l"](checkpoint=path)
    msg = str(e.value)
    assert str(path) in msg and "vit_b" in msg and "vit_l" in msg


def test_identify_names_the_architecture(vit_b_file):
    sd = torch.load(vit_b_file[0], weights_only=True)
    assert identify(sd) == "vit_b"


def test_truncated_file(tmp_path):
    model = build_sam(SMALL_CONFIG)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*not a readable PyTorch state dict"):
        build_sam(SMALL_CONFIG, checkpoint=bad)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth"):
        build_sam(SMALL_CONFIG, checkpoint=bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth: file not found"):
        build_sam(SMALL_CONFIG, checkpoint=tmp_path / "nowhere.pth")


def test_pickled_object_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_sam(SMALL_CONFIG, checkpoint=bad)


def test_state_dict_with_missing_keys(tmp_path):
    sd = build_sam(SMALL_CONFIG).state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing keys.*iou_token"):
        build_sam(SMALL_CONFIG, checkpoint=path)


def test_wrapped_state_dict_and_fsspec_url(tmp_path):
    """A {"model": state_dict} wrapper and a memory:// URL both load."""
    src = build_sam(SMALL_CONFIG)
    sd = random_state_dict(src, seed=5)
    with fsspec.open("memory://ckpts/small.pth", "wb") as f:
        torch.save({"model": sd}, f)
    model = build_sam(SMALL_CONFIG, checkpoint="memory://ckpts/small.pth")
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_official_recognition_by_size_and_md5(tmp_path):
    """Files are checked against the official list only when their size matches one."""
    small = tmp_path / "other.pth"
    small.write_bytes(b"x" * 100)
    assert recognise_official(str(small)) is None
    names = {c.filename for c in OFFICIAL_CHECKPOINTS}
    assert names == {"sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth"}
    for c in OFFICIAL_CHECKPOINTS:  # the md5 prefix is in the official file name
        assert c.filename.split("_")[-1].removesuffix(".pth") == c.md5[:6]


def test_a_file_matching_an_official_size_and_md5_is_recognised(tmp_path, monkeypatch):
    """The positive case, on a small stand-in: a state dict registered (size, md5) as an
    official small-model checkpoint is recognised, loads into that model, and offered to
    another model is refused with the right model type named."""
    import hashlib

    import sam.checkpoint as ck

    path = tmp_path / "renamed_by_the_user.pth"
    torch.save(random_state_dict(build_sam(SMALL_CONFIG), seed=3), path)
    data = path.read_bytes()
    fake = ck.OfficialCheckpoint("small", "sam_small_abcdef.pth", len(data), hashlib.md5(data).hexdigest())
    monkeypatch.setattr(ck, "OFFICIAL_CHECKPOINTS", (*OFFICIAL_CHECKPOINTS, fake))
    assert recognise_official(str(path)) == fake
    (tmp_path / "copy.pth").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert recognise_official(str(tmp_path / "copy.pth")) is None  # same size, other md5
    model = build_sam(SMALL_CONFIG, checkpoint=path)  # SMALL_CONFIG's name is "small"
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"],
                       torch.load(path, weights_only=True)["mask_decoder.iou_token.weight"])
    with pytest.raises(CheckpointError, match="official sam_small_abcdef.pth .small.*'small'"):
        build_sam({**SMALL_CONFIG, "name": "other"}, checkpoint=path)
    # the reference-style build_sam(path) builds the model an official file is
    import sam.config as sc

    small = {**sc._COMMON, **{k: v for k, v in SMALL_CONFIG.items() if k != "name"}}
    monkeypatch.setitem(sc._CONFIGS, "small", small)
    import sam.registry as reg

    calls = []
    monkeypatch.setattr(reg, "recognise_official", lambda u: calls.append(u) or fake)
    assert build_sam(str(path)).image_encoder.patch_embed.proj.out_channels == 64
    assert calls == [str(path)]  # the md5 of an official file is read once


def test_official_size_with_wrong_hash_is_corrupt(tmp_path):
    """A sparse file with vit_b's exact size but other bytes is a corrupt download."""
    c = next(c for c in OFFICIAL_CHECKPOINTS if c.model == "vit_b")
    path = tmp_path / c.filename
    with open(path, "wb") as f:
        f.truncate(c.size)
    with pytest.raises(CheckpointError, match="md5"):
        sam_model_registry["vit_b"](checkpoint=path)


def test_image_conversion():
    from sam.predictor import as_rgb_uint8

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(as_rgb_uint8(gray), np.repeat(gray[..., None], 3, 2))
    rgba = np.random.randint(0, 255, (3, 4, 4), dtype=np.uint8)
    assert np.array_equal(as_rgb_uint8(rgba), rgba[..., :3])
    deep = np.full((2, 2, 3), 65535, np.uint16)
    assert (as_rgb_uint8(deep) == 255).all()
    assert (as_rgb_uint8(np.full((2, 2, 3), 257, np.uint16)) == 1).all()
    big_endian = np.full((2, 2, 3), 0x1234, ">u2")  # as some TIFF readers give them
    assert (as_rgb_uint8(big_endian) == 0x12).all()
    with pytest.raises(ValueError, match="uint8"):
        as_rgb_uint8(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        as_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


@pytest.mark.parametrize(
    "url,why", [("foo://x/y.pth", "Protocol not known: foo"), ("gs://b/x.pth", "gcsfs")]
)
def test_unopenable_checkpoint_url_is_one_clear_error(url, why):
    """An unknown protocol or a missing fsspec backend: a CheckpointError naming the URL."""
    import importlib.util

    if why == "gcsfs" and importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed: gs:// would try the network")
    with pytest.raises(CheckpointError, match=f"checkpoint {url}: cannot open: .*{why}"):
        build_sam(SMALL_CONFIG, checkpoint=url)


def test_reference_style_build_sam_with_a_path_builds_vit_h(tmp_path, monkeypatch):
    """The reference's ``build_sam`` is ``build_sam_vit_h``: ``build_sam(path)`` loads that
    path as a vit_h checkpoint (so a small model's file is refused as not vit_h), and the
    checkpoint is read and checked before any model is built."""
    import sam
    import sam.registry

    for name in ("build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "build_sam_tiny"):
        assert callable(getattr(sam, name))
    path = tmp_path / "sam_small.pth"
    torch.save(build_sam(SMALL_CONFIG).state_dict(), path)

    def no_build(cfg):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(sam.registry, "build_sam_from_config", no_build)
    with pytest.raises(CheckpointError, match="sam_small.pth.*vit_h"):
        sam.build_sam(str(path))
    with pytest.raises(CheckpointError, match="sam_small.pth.*vit_h"):
        sam.build_sam(path)
    with pytest.raises(CheckpointError, match="nowhere.pth: file not found"):
        sam.build_sam(str(tmp_path / "nowhere.pth"))
    with pytest.raises(KeyError, match="unknown model 'vit_hh'"):
        sam.build_sam("vit_hh")
    (tmp_path / "ckpt").write_bytes(path.read_bytes())  # no suffix, but an existing file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="ckpt.*vit_h"):
        sam.build_sam("ckpt")
