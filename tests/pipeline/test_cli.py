"""The sa1b-decode CLI end to end on synthetic shards and the real samples."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from sam import rle
from tests.pipeline.conftest import members_of, write_members
from tests.sa1b_samples import sa1b_path


@pytest.fixture
def shards(tmp_path):
    from pipeline.synthetic import write_synthetic_shard

    out = []
    for s in range(2):
        p = tmp_path / "in" / f"sa_00000{s}.tar"
        write_synthetic_shard(str(p), 4, first_id=1 + 10 * s, seed=s, h=60, w=80, masks=5)
        out.append(p)
    return out


def test_info_table_and_exit_codes(shards, tmp_path, capsys, caplog):
    assert main(["info", *map(str, shards)]) == 0
    out = capsys.readouterr().out
    assert "sa_000000.tar" in out and " 4 " in out and "ok" in out
    bad = tmp_path / "sa_000009.tar"
    bad.write_bytes(shards[0].read_bytes()[:-3000])
    assert main(["info", "--json", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)[0]["complete"] is False
    assert main(["info", str(tmp_path / "missing.tar")]) == 2
    notar = tmp_path / "x.tar"
    notar.write_text("<html>expired</html>" * 40)
    assert main(["info", str(notar)]) == 2
    assert "x.tar: not a tar or gzip-compressed tar" in caplog.text


def test_index_parallel_resumable(shards, tmp_path, capsys):
    out = str(tmp_path / "idx")
    assert main(["index", *map(str, shards), "--out", out, "--workers", "2"]) == 0
    assert "total: 8 images, 40 masks" in capsys.readouterr().out
    assert len(pd.read_parquet(out + "/images")) == 8
    assert main(["index", *map(str, shards), "--out", out, "--workers", "1"]) == 0
    assert "already indexed" in capsys.readouterr().out


def test_extract_npz_png_and_safety(shards, tmp_path):
    out = tmp_path / "ex"
    seek = tmp_path / "idx"
    assert main(["index", str(shards[1]), "--out", str(seek)]) == 0
    assert (
        main(
            [
                "extract",
                str(shards[1]),
                "--out",
                str(out),
                "--ids",
                "12,13",
                "--masks",
                "npz",
                "--seek-dir",
                str(seek / "seek"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "sa_12.jpg",
        "sa_12.json",
        "sa_12.masks.npz",
        "sa_13.jpg",
        "sa_13.json",
        "sa_13.masks.npz",
    ]
    rec = json.loads((out / "sa_12.json").read_text())
    with np.load(out / "sa_12.masks.npz") as z:
        for a in rec["annotations"]:
            np.testing.assert_array_equal(z[str(a["id"])], rle.decode(a["segmentation"]))
    assert main(["extract", str(shards[0]), "--out", str(out / "png"), "--masks", "png"]) == 0
    from PIL import Image

    rec = json.loads((out / "png" / "sa_2.json").read_text())
    a = rec["annotations"][1]
    png = np.asarray(Image.open(out / "png" / "sa_2_masks" / f"{a['id']}.png"))
    np.testing.assert_array_equal(png.astype(bool), rle.decode(a["segmentation"]))
    assert main(["extract", str(shards[0]), "--out", str(out), "--ids", "999"]) == 1


def test_extract_never_writes_outside_the_target(tmp_path, capsys, caplog):
    import tarfile

    from tests.pipeline.conftest import write_raw_tar

    members, _ = members_of(1)
    entries = []
    for name, data in [("../escape.jpg", b"x"), ("../../sa_5.json", b"{}"), *members]:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        entries.append((ti, data))
    link = tarfile.TarInfo("sa_6.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../outside"
    entries.append((link, None))
    (tmp_path / "a" / "b").mkdir(parents=True)
    shard = write_raw_tar(tmp_path / "a" / "b" / "sa_000001.tar", entries)
    target = tmp_path / "a" / "b" / "out"
    before = {p for p in tmp_path.rglob("*")}
    # the safe record is extracted; the unsafe members are refused and reported (exit 1)
    assert main(["extract", str(shard), "--out", str(target), "--masks", "png"]) == 1
    assert "extracted 1 images" in capsys.readouterr().out
    assert "3 members not used: ../escape.jpg (path escapes" in caplog.text
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(target in p.parents or p == target for p in new)


def test_coco_output_loads_in_pycocotools(shards, tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    out = tmp_path / "coco.json"
    assert main(["coco", str(shards[0]), "--out", str(out)]) == 0
    coco = coco_mod.COCO(str(out))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == 20
    ann = coco.loadAnns(coco.getAnnIds())[0]
    m = coco.annToMask(ann)
    assert m.sum() == ann["area"]
    from pycocotools import mask as mask_api

    seg = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    assert ann["bbox"] == mask_api.toBbox(seg).tolist()  # COCO convention by default
    assert main(["coco", str(shards[0]), "--out", str(out), "--sa1b-bbox"]) == 0
    anns = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    x, y, w, h = mask_api.toBbox(seg).tolist()
    assert anns[ann["id"]]["bbox"] == [x, y, w - 1, h - 1]  # SA-1B's inclusive last pixel


def test_show_writes_an_overlay_png(shards, tmp_path):
    from PIL import Image

    out = tmp_path / "ov.png"
    assert main(["show", str(shards[0]), "--id", "3", "--out", str(out)]) == 0
    im = np.asarray(Image.open(out)).astype(int)
    assert im.shape == (60, 80, 3)
    import cv2

    from pipeline.sa1b_reader import ShardReader

    [rec] = [r for r in ShardReader(str(shards[0])) if r.image_id == 3]
    image = rec.image().astype(int)
    masks = np.stack([rec.mask(i) for i in range(len(rec.annotations))]).astype(np.uint8)
    near = cv2.dilate(masks.max(0), np.ones((3, 3), np.uint8)) > 0  # masks + outlines
    np.testing.assert_array_equal(im[~near], image[~near])  # untouched outside
    inside = cv2.erode(masks.max(0), np.ones((3, 3), np.uint8)) > 0
    assert inside.sum() > 100
    assert (np.abs(im - image).sum(-1)[inside] > 0).mean() > 0.9  # painted inside
    assert main(["show", str(shards[0]), "--id", "77", "--out", str(out)]) == 2


def test_validate_shards_md5_and_real_json(shards, tmp_path, capsys):
    checklist = tmp_path / "md5.txt"
    checklist.write_text(
        "".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shards)
    )
    assert main(["validate", *map(str, shards), "--md5", str(checklist)]) == 0
    assert "md5 ok" in capsys.readouterr().out
    checklist.write_text(f"{'0' * 32}  {shards[0].name}\n")
    assert main(["validate", str(shards[0]), "--md5", str(checklist)]) == 1
    assert "!= checklist" in capsys.readouterr().out
    # bad RLE inside a shard
    members, records = members_of(2)
    rec = records[2][1]
    rec["annotations"][0]["segmentation"]["counts"] = rle.counts_to_string([3, 4])
    members[3] = ("./sa_2.json", json.dumps(rec).encode())
    bad = write_members(tmp_path / "sa_000007.tar", members)
    assert main(["validate", str(bad)]) == 1
    assert "sum to 7" in capsys.readouterr().out
    # the real samples and the real checklist's format
    assert (
        main(
            [
                "validate",
                str(sa1b_path("sa_226381.excerpt.json")),
                str(sa1b_path("other_real_excerpts.json")),
            ]
        )
        == 0
    )
    real = sa1b_path("sa1b_md5_checklist.txt")
    from pipeline.download import read_md5_checklist

    md5s = read_md5_checklist(str(real))
    assert len(md5s) == 1000 and md5s["sa_000000.tar"] == "78d0f487c735a3de86ae6e1b0ff24ea9"


def test_download_status_resume_md5(http_server, tmp_path, capsys, caplog):
    base, root, srv = http_server
    payload = members_of(3)[0]
    shard = write_members(root / "sa_000020.tar", payload)
    data = shard.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    links = tmp_path / "SA-1B_links.txt"
    links.write_text(
        "file_name\tcdn_link\n"
        f"sa_000021.tar\t{base}/expired/sa_000021.tar?oe=abc&oh=SECRET\n"
        f"sa_000020.tar\t{base}/sa_000020.tar?oh=SECRET\n"
        f"sa_000022.tar\t{base}/fake200/sa_000022.tar\n"
    )
    checklist = tmp_path / "md5.txt"
    checklist.write_text(f"{md5}  sa_000020.tar\n")
    out = tmp_path / "dl"
    out.mkdir()
    (out / "sa_000020.tar.part").write_bytes(data[:1000])  # an interrupted download
    assert main(["download", str(links), "--out", str(out), "--md5", str(checklist)]) == 1
    captured = capsys.readouterr()
    assert (out / "sa_000020.tar").read_bytes() == data
    assert "sa_000020.tar: resumed" in captured.out and "md5 ok" in captured.out
    assert "403" in captured.out and "SECRET" not in captured.out + captured.err + caplog.text
    assert not (out / "sa_000021.tar").exists() and not (out / "sa_000021.tar.part").exists()
    assert not (out / "sa_000022.tar").exists() and not (out / "sa_000022.tar.part").exists()
    assert (1000, len(data) - 1) in srv.ranges
    # md5 mismatch: nothing is kept under the final name
    checklist.write_text(f"{'f' * 32}  sa_000020.tar\n")
    (out / "sa_000020.tar").unlink()
    assert (
        main(
            [
                "download",
                str(links),
                "--out",
                str(out),
                "--md5",
                str(checklist),
                "--only",
                "sa_000020.tar",
            ]
        )
        == 1
    )
    assert not (out / "sa_000020.tar").exists()


def test_info_and_validate_stream_from_a_links_file(http_server, shards, tmp_path, capsys, caplog):
    """info and validate take --links like index: shards by file name, every shard by
    default, a damaged one reported under its name, and no signature printed."""
    base, root, _ = http_server
    (root / "An_YmP5OIPXun.tar").write_bytes(shards[0].read_bytes())
    data = shards[1].read_bytes()
    (root / "An-V_ojE_rwIRA.tar").write_bytes(data[: len(data) // 2])  # cut short
    links = tmp_path / "SA-1B_links.txt"
    links.write_text(
        "file_name\tcdn_link\n"
        f"sa_000020.tar\t{base}/An_YmP5OIPXun.tar?ccb=10-5&oh=SECRET&oe=1\n"
        f"sa_000021.tar\t{base}/An-V_ojE_rwIRA.tar?ccb=10-5&oh=SECRET&oe=1\n"
    )
    assert main(["info", "--links", str(links), "sa_000020.tar", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["shard"] == "sa_000020.tar" and row["images"] == 4 and row["complete"]
    assert main(["info", "--links", str(links)]) == 1  # both; the cut one is incomplete
    table = capsys.readouterr().out
    assert re.search(r"sa_000020\.tar .* 4 .* ok", table)
    assert re.search(r"sa_000021\.tar .*INCOMPLETE", table)
    assert main(["validate", "--links", str(links), "sa_000020.tar"]) == 0
    assert "sa_000020.tar: 4 images, ok" in capsys.readouterr().out
    assert main(["validate", "--links", str(links)]) == 1
    assert "sa_000021.tar: " in capsys.readouterr().out
    assert main(["validate", "--links", str(links), "sa_000099.tar"]) == 2
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err + caplog.text


def test_index_streams_shards_from_a_links_file_named_by_file_name(
    http_server, shards, tmp_path, capsys, caplog
):
    """The CDN's paths are opaque tokens: parts, reports and the shard column take the
    links file's names; a rerun skips them; no signature is printed."""
    base, root, _ = http_server
    (root / "An_YmP5OIPXun.tar").write_bytes(shards[0].read_bytes())
    (root / "An-V_ojE_rwIRA.tar").write_bytes(shards[1].read_bytes())
    links = tmp_path / "SA-1B_links.txt"
    links.write_text(
        "file_name\tcdn_link\n"
        f"sa_000021.tar\t{base}/An-V_ojE_rwIRA.tar?ccb=10-5&oh=SECRET&oe=1\n"
        f"sa_images_ids.txt\t{base}/ids.txt?oh=SECRET\n"
        f"sa_000020.tar\t{base}/An_YmP5OIPXun.tar?ccb=10-5&oh=SECRET&oe=1\n"
    )
    out = tmp_path / "idx"
    assert main(["index", "--links", str(links), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sa_000020.tar: 4 images" in printed and "sa_000021.tar: 4 images" in printed
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "sa_000020.parquet",
        "sa_000021.parquet",
    ]
    images = pd.read_parquet(out / "images")
    assert sorted(images.shard.unique()) == ["sa_000020", "sa_000021"]
    assert len(images) == 8 and not (out / "seek").exists()
    # by name, resumable
    assert main(["index", "--links", str(links), "sa_000020.tar", "--out", str(out)]) == 0
    assert "sa_000020.tar: already indexed" in capsys.readouterr().out
    assert main(["index", "--links", str(links), "sa_000099.tar", "--out", str(out)]) == 2
    assert "no link for sa_000099.tar" in caplog.text
    assert main(["index", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err + caplog.text


def test_download_never_promotes_an_incomplete_file(http_server, tmp_path, capsys):
    """A .part that is not the whole file is not renamed on a 416; a body cut short is
    kept as .part (resumable) and reported; a .part that is the whole file is kept."""
    base, root, srv = http_server
    data = write_members(root / "sa_000020.tar", members_of(3)[0]).read_bytes()
    links = tmp_path / "links.txt"
    links.write_text(f"file_name\tcdn_link\nsa_000020.tar\t{base}/sa_000020.tar\n")
    out = tmp_path / "dl"
    out.mkdir()
    (out / "sa_000020.tar.part").write_bytes(data + b"\x00" * 10)  # longer than the file
    assert main(["download", str(links), "--out", str(out)]) == 1
    assert "refused to resume" in capsys.readouterr().out
    assert not (out / "sa_000020.tar").exists() and not (out / "sa_000020.tar.part").exists()

    srv.short = True
    assert main(["download", str(links), "--out", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert not (out / "sa_000020.tar").exists()
    srv.short = False

    (out / "sa_000020.tar.part").write_bytes(data)  # every byte is already there
    assert main(["download", str(links), "--out", str(out)]) == 0
    assert (out / "sa_000020.tar").read_bytes() == data


class _FakeResponse:
    def __init__(self, status, headers, body=b""):
        self.status_code, self.headers, self.body = status, headers, body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_content(self, n):
        yield from (self.body[i : i + n] for i in range(0, len(self.body), n))


class _FakeSession:
    def __init__(self, response):
        self.response = response

    def get(self, *a, **k):
        return self.response


def test_download_checks_sizes_itself(tmp_path):
    """Against a server (or client) that does not enforce lengths: a body shorter than its
    Content-Length stays a resumable .part; a 416 without a size keeps a .part only when
    the md5 checklist vouches for it."""
    import hashlib as hl

    from pipeline.download import DownloadError, download_file

    data = write_members(tmp_path / "src.tar", members_of(2)[0]).read_bytes()
    out = tmp_path / "dl"
    short = _FakeResponse(200, {"Content-Length": str(len(data))}, data[: len(data) // 2])
    with pytest.raises(DownloadError, match=f"got {len(data) // 2} of {len(data)} bytes"):
        download_file("sa_000020.tar", "https://h/x", str(out), session=_FakeSession(short))
    assert (out / "sa_000020.tar.part").stat().st_size == len(data) // 2
    assert not (out / "sa_000020.tar").exists()

    (out / "sa_000020.tar.part").write_bytes(data)
    no_range = _FakeSession(_FakeResponse(416, {}))
    res = download_file("sa_000020.tar", "https://h/x", str(out), session=no_range,
                        md5=hl.md5(data).hexdigest())  # fmt: skip
    assert res.status == "resumed" and (out / "sa_000020.tar").read_bytes() == data
    (out / "sa_000021.tar.part").write_bytes(data[:100])
    with pytest.raises(DownloadError, match="refused to resume"):
        download_file("sa_000021.tar", "https://h/x", str(out), session=no_range)
    assert not (out / "sa_000021.tar.part").exists() and not (out / "sa_000021.tar").exists()


@pytest.mark.parametrize(
    "text,why",
    [(b"", "no md5 entries"), (b"# only a comment\n", "no md5 entries"),
     (b"d41d8cd98f00b204e9800998ecf8427e sa_000000.tar\nnot a line\n", ":2: not an md5sum line"),
     (b"\xff\xfe\x00junk", "not a text file")],
)  # fmt: skip
def test_an_unusable_md5_checklist_is_a_usage_error(small_shard, tmp_path, caplog, text, why):
    shard, _ = small_shard
    checklist = tmp_path / "md5.txt"
    checklist.write_bytes(text)
    assert main(["validate", str(shard), "--md5", str(checklist)]) == 2
    assert f"--md5 {checklist}" in caplog.text and why in caplog.text


@pytest.mark.parametrize("fmt", ["{bom}{md5}  ./{name}\n", "# list\nMD5 ({name}) = {MD5}\n"])
def test_md5_checklist_formats(small_shard, tmp_path, capsys, fmt):
    import hashlib as hl

    shard, _ = small_shard
    md5 = hl.md5(shard.read_bytes()).hexdigest()
    checklist = tmp_path / "md5.txt"
    checklist.write_text(fmt.format(bom="\ufeff", md5=md5, MD5=md5.upper(), name=shard.name))
    assert main(["validate", str(shard), "--md5", str(checklist)]) == 0
    assert "md5 ok" in capsys.readouterr().out


def test_a_links_file_that_is_not_text_is_a_usage_error(tmp_path, caplog):
    links = tmp_path / "links.txt"
    links.write_bytes(b"\xff\xfe\x00\x01")
    assert main(["download", str(links), "--out", str(tmp_path / "dl")]) == 2
    assert f"{links}: not a text file" in caplog.text


def test_validate_names_non_finite_numbers(tmp_path, capsys):
    members, _ = members_of(2)
    rec = json.loads(members[1][1])
    rec["annotations"][0]["bbox"][0] = float("nan")
    rec["annotations"][1]["predicted_iou"] = float("inf")
    members[1] = (members[1][0], json.dumps(rec).encode())
    shard = write_members(tmp_path / "sa_000013.tar", members)
    assert main(["validate", str(shard)]) == 1
    out = capsys.readouterr().out
    assert "sa_1.json: annotations[0].bbox: not a finite number" in out
    assert "sa_1.json: annotations[1].predicted_iou: not a finite number" in out
    (tmp_path / "r.json").write_text(json.dumps(rec))
    assert main(["validate", str(tmp_path / "r.json")]) == 1
    assert "annotations[0].bbox: not a finite number" in capsys.readouterr().out


def test_links_file_shape_of_the_real_one():
    from pipeline.download import read_links

    links = read_links(str(sa1b_path("SA-1B_links_head_truncated.txt")))
    assert list(links)[:2] == ["sa_000020.tar", "sa_000021.tar"]


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "index", "extract", "coco", "show", "stats", "validate", "download"):
        assert cmd in out


@pytest.fixture
def damaged(shards, tmp_path):
    bad = tmp_path / "dmg" / "sa_000005.tar"
    bad.parent.mkdir()
    bad.write_bytes(shards[0].read_bytes()[:-3000])  # cut inside the last images
    return bad


def _errors(caplog) -> list[str]:
    import logging

    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_extract_of_a_damaged_shard_fails_with_one_clear_message(damaged, tmp_path, capsys, caplog):
    out = tmp_path / "ex"
    assert main(["extract", str(damaged), "--out", str(out)]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "sa_000005.tar" in errors[0] and "damaged" in errors[0]
    assert "TruncatedShardError" in errors[0]
    assert "PARTIAL" in capsys.readouterr().out


def test_coco_of_a_damaged_shard_is_not_committed_unless_allowed(shards, damaged, tmp_path, caplog):
    out = tmp_path / "coco.json"
    assert main(["coco", str(shards[1]), str(damaged), "--out", str(out)]) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "coco" in p.name]  # no temp file left
    errors = _errors(caplog)
    assert any("sa_000005.tar" in e and "TruncatedShardError" in e for e in errors)
    assert any("not writing" in e and "--allow-partial" in e for e in errors)
    assert main(["coco", str(shards[1]), str(damaged), "--out", str(out), "--allow-partial"]) == 1
    doc = json.loads(out.read_text())
    ids = {im["id"] for im in doc["images"]}
    assert {11, 12, 13, 14} <= ids and len(ids) < 8  # shards[1] whole, the damaged one partly
    assert main(["coco", str(shards[1]), "--out", str(out)]) == 0


@pytest.mark.parametrize("command", ["index", "info"])
def test_signed_url_secrets_are_never_printed(http_server, tmp_path, capsys, caplog, command):
    """An expired signed link (403) and a missing one (404): the error names the shard
    but neither the signature nor a ``user:password@``; nothing of it reaches the output
    files either."""
    base, root, _ = http_server
    host = base.split("://", 1)[1]
    urls = [
        f"{base}/expired/sa_000021.tar?X-Amz-Signature=SECRET1&oh=SECRET2",
        f"http://alice:SECRET3@{host}/sa_000022.tar?Signature=SECRET4",
    ]
    out = tmp_path / "idx"
    argv = [command, *urls] + (["--out", str(out)] if command == "index" else [])
    assert main(argv) != 0
    printed = capsys.readouterr()
    text = printed.out + printed.err + caplog.text
    if out.exists():
        text += "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert "sa_000021.tar" in text  # ``info`` stops at the first missing input
    assert "SECRET" not in text


def test_scrub_removes_query_strings_and_userinfo():
    from pipeline.io import describe, scrub

    msg = (
        "HTTPSConnectionPool(host='cdn.example', port=443): Max retries exceeded with url: "
        "/sa_000020.tar?_nc_ht=x&Signature=abc (Caused by NewConnectionError)"
    )
    assert scrub(msg) == (
        "HTTPSConnectionPool(host='cdn.example', port=443): Max retries exceeded with url: "
        "/sa_000020.tar (Caused by NewConnectionError)"
    )
    assert scrub("403, url='https://u:pw@h/a.tar?token'") == "403, url='https://h/a.tar'"
    assert scrub("what? s3://b/k?versionId=3 ok") == "what? s3://b/k ok"
    assert describe(FileNotFoundError("https://h/a?X-Amz-Credential=K")) == "FileNotFoundError: https://h/a"


@pytest.mark.parametrize(
    "body,why",
    [
        (b'{"annotations": []}', 'no "image" object'),
        (b"[1, 2]", "a JSON list, not an object"),
        (None, "KeyError: 'segmentation'"),  # an annotation without its mask
    ],
)
def test_coco_and_show_name_a_malformed_record(tmp_path, caplog, capsys, body, why):
    """One clear message naming the member, exit 1; ``coco`` keeps the other images whole
    and writes nothing of the bad one."""
    members, records = members_of(3)
    assert members[3][0] == "./sa_2.json"
    if body is None:
        rec = json.loads(members[3][1])
        del rec["annotations"][1]["segmentation"]
        body = json.dumps(rec).encode()
    members[3] = ("./sa_2.json", body)
    shard = write_members(tmp_path / "sa_000007.tar", members)
    out = tmp_path / "coco.json"
    assert main(["coco", str(shard), "--out", str(out)]) == 1
    assert f"sa_000007.tar: sa_2.json: malformed record: {why}" in caplog.text
    coco = json.loads(out.read_text())
    assert sorted(i["id"] for i in coco["images"]) == [1, 3]
    assert sorted({a["image_id"] for a in coco["annotations"]}) == [1, 3]
    assert len(coco["annotations"]) == sum(len(records[i][1]["annotations"]) for i in (1, 3))
    caplog.clear()
    png = tmp_path / "o.png"
    assert main(["show", str(shard), "--id", "2", "--out", str(png)]) == 1
    assert f"sa_2.json: malformed record: {why}" in caplog.text and not png.exists()
    assert "Traceback" not in capsys.readouterr().err


def _with_member(tmp_path, name, index, body=None, drop=False):
    """A 3-image shard whose member ``index`` is replaced by ``body`` (or dropped)."""
    members, _ = members_of(3)
    if drop:
        del members[index]
    else:
        members[index] = (members[index][0], body)
    return write_members(tmp_path / name, members)


@pytest.mark.parametrize("masks", ["png", "npz"])
def test_extract_skips_an_image_with_a_bad_mask_and_leaves_nothing_of_it(
    tmp_path, caplog, capsys, masks
):
    """An RLE whose runs do not sum to h*w: one message naming shard and member, the
    other images extracted, and no jpg/json/masks of the bad one left to look complete."""
    members, _ = members_of(3)
    assert members[3][0] == "./sa_2.json"
    rec = json.loads(members[3][1])
    rec["annotations"][-1]["segmentation"]["counts"] = "0"  # wrong length
    shard = _with_member(tmp_path, "sa_000010.tar", 3, json.dumps(rec).encode())
    out = tmp_path / "ex"
    assert main(["extract", str(shard), "--out", str(out), "--masks", masks]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and "sa_000010.tar: sa_2.json: malformed record" in errors[0]
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith("sa_2")]
    assert {"sa_1.jpg", "sa_1.json", "sa_3.jpg", "sa_3.json"} <= set(names)
    assert not [n for n in names if "partial" in n or n.startswith(".")]
    assert "extracted 2 images" in capsys.readouterr().out


def test_seek_path_names_a_missing_jpeg_instead_of_a_traceback(tmp_path, caplog, capsys):
    assert members_of(3)[0][2][0] == "./sa_2.jpg"
    shard = _with_member(tmp_path, "sa_000011.tar", 2, drop=True)
    seek = tmp_path / "idx"
    assert main(["index", str(shard), "--out", str(seek)]) == 1  # unpaired: a problem
    assert "1 unpaired" in capsys.readouterr().out
    argv = ["--seek-dir", str(seek / "seek")]
    assert main(["extract", str(shard), "--out", str(tmp_path / "ex"), "--ids", "2", *argv]) == 1
    assert "sa_000011.tar: sa_2.jpg: no such member" in caplog.text
    assert "not found: 2" in capsys.readouterr().out
    assert main(["show", str(shard), "--id", "2", *argv]) == 2


def test_io_errors_other_than_a_missing_file_are_one_message(tmp_path, caplog):
    assert main(["info", str(tmp_path)]) == 2
    assert _errors(caplog) == [f"{tmp_path}: Is a directory"]


def test_coco_refuses_non_finite_numbers(tmp_path, caplog):
    members, _ = members_of(3)
    rec = json.loads(members[3][1])
    rec["annotations"][0]["predicted_iou"] = float("inf")
    shard = _with_member(tmp_path, "sa_000012.tar", 3, json.dumps(rec).encode())
    out = tmp_path / "coco.json"
    assert main(["coco", str(shard), "--out", str(out)]) == 1
    assert "sa_000012.tar: sa_2.json: malformed record" in caplog.text
    coco = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in output"))
    assert sorted(i["id"] for i in coco["images"]) == [1, 3]


def test_links_rows_without_their_header_read_like_the_file(tmp_path):
    from pipeline.download import read_links

    full = tmp_path / "SA-1B_links.txt"
    full.write_text("file_name\tcdn_link\nsa_000021.tar\thttps://c/b.tar?oh=S\nsa_000020.tar\thttps://c/a.tar?oh=S\n")
    grepped = tmp_path / "few.txt"
    grepped.write_text("".join(ln + "\n" for ln in full.read_text().splitlines()[1:]))
    assert read_links(str(grepped)) == read_links(str(full)) == {
        "sa_000021.tar": "https://c/b.tar?oh=S",
        "sa_000020.tar": "https://c/a.tar?oh=S",
    }
    other = tmp_path / "list.txt"
    other.write_text("sa_000020.tar\nsa_000021.tar\n")  # not links
    with pytest.raises(ValueError, match="not an SA-1B links file"):
        read_links(str(other))
    # one parser for both readers: the downloader keeps rows of other files, the job's
    # list reader takes only the shards; a malformed row is named by its line either way
    from pipeline.plan import InputError, read_list_file

    mixed = tmp_path / "mixed.txt"
    mixed.write_text(full.read_text() + "sa_images_ids.txt\thttps://c/ids.txt\n")
    assert read_links(str(mixed))["sa_images_ids.txt"] == "https://c/ids.txt"
    assert [u for u, _ in read_list_file(str(mixed))] == ["https://c/b.tar?oh=S", "https://c/a.tar?oh=S"]
    bad = tmp_path / "bad.txt"
    bad.write_text(full.read_text() + "sa_000022.tar\n")
    for reader in (read_links, read_list_file):
        with pytest.raises(InputError, match="line 4: expected file_name<TAB>cdn_link"):
            reader(str(bad))


def test_a_store_error_mid_shard_is_a_read_failure_and_prints_no_signature(
    shards, tmp_path, capsys, caplog, monkeypatch
):
    """A ranged GET answered 503 half-way (aiohttp's ClientResponseError: no OSError, its
    text the whole signed URL) is a failure to read the shard, reported scrubbed, by info
    (exit 1) and index (one row), and no traceback shows the signature."""
    import aiohttp
    from yarl import URL

    import pipeline.sa1b_reader as reader_mod

    signed = "http://cdn.example/An_x.tar?oh=SECRET&oe=1"
    url = URL(signed)
    error = aiohttp.ClientResponseError(
        aiohttp.RequestInfo(url, "GET", {}, url), (), status=503, message="Service Unavailable"
    )
    data = shards[0].read_bytes()

    class Failing:
        def __init__(self):
            self.pos = 0

        def read(self, n=-1):
            if self.pos > len(data) // 2:
                raise error
            chunk = data[self.pos : self.pos + n]
            self.pos += len(chunk)
            return chunk

        def close(self):
            pass

    monkeypatch.setattr(reader_mod, "open_url", lambda u: Failing())
    assert main(["info", "--json", signed]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["read_failure"] and not row["complete"]
    assert row["error"] == "StoreError: ClientResponseError: 503, message='Service Unavailable', url='http://cdn.example/An_x.tar'"
    assert main(["index", signed, "--out", str(tmp_path / "idx")]) == 1
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err + caplog.text


def test_extract_and_coco_report_members_they_could_not_use(tmp_path, capsys, caplog):
    """A JSON without its image and an image without its JSON: extract says so and exits
    1 instead of "extracted 0 images" and 0; coco converts the JSON, which needs no
    image (as in an output written without images)."""
    shard = tmp_path / "sa_000001.tar"
    from tests.jobs.helpers import image_bytes

    record = {"image": {"image_id": 1, "width": 8, "height": 6, "file_name": "sa_1.jpg"},
              "annotations": []}  # fmt: skip
    write_members(shard, [("sa_1.json", json.dumps(record).encode()), ("sa_2.jpg", image_bytes(2))])
    assert main(["extract", str(shard), "--out", str(tmp_path / "ex")]) == 1
    assert "extracted 0 images" in capsys.readouterr().out
    errors = _errors(caplog)
    assert len(errors) == 1 and "2 members not used: sa_1.json (no partner), sa_2.jpg" in errors[0]
    caplog.clear()
    coco = tmp_path / "coco.json"
    assert main(["coco", str(shard), "--out", str(coco)]) == 0
    assert [i["id"] for i in json.loads(coco.read_text())["images"]] == [1]
