"""Parquet index: built without decoding masks, one part per shard, queried by pandas."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.parquet_index import (
    index_rows_from_record,
    index_shard,
    is_indexed,
    write_index_part,
)
from pipeline.seek_index import SeekIndex
from schemas import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, SCHEMA_VERSION
from tests.pipeline.conftest import members_of, write_members
from tests.sa1b_samples import real_records


def _shard(tmp_path, n, first_id, name, seed=0, shuffle=True):
    from pipeline.sa1b_writer import write_image_json
    from pipeline.synthetic import iter_synthetic

    members, records = [], {}
    for image_id, jpeg, rec in iter_synthetic(n, first_id=first_id, seed=seed, masks=6):
        members += [
            (f"./sa_{image_id}.jpg", jpeg),
            (f"./sa_{image_id}.json", write_image_json(rec)),
        ]
        records[image_id] = (jpeg, rec)
    if shuffle:
        random.Random(seed).shuffle(members)
    return write_members(tmp_path / name, members), records


def test_index_two_shards_and_query_with_pandas(tmp_path, monkeypatch):
    import sam.rle

    def no_decode(*a, **k):
        raise AssertionError("the index must not decode masks")

    monkeypatch.setattr(sam.rle, "decode", no_decode)
    out = str(tmp_path / "idx")
    p1, r1 = _shard(tmp_path, 8, 1, "sa_000000.tar", seed=1)
    p2, r2 = _shard(tmp_path, 5, 100, "sa_000001.tar", seed=2)
    for p in (p1, p2):
        res = index_shard(str(p), out)
        assert res.report.complete and not res.report.unpaired
    records = {**r1, **r2}

    images = pd.read_parquet(out + "/images")
    assert sorted(images.image_id) == sorted(records)
    assert set(images.shard) == {"sa_000000", "sa_000001"}
    anns = pd.read_parquet(out + "/annotations")
    assert len(anns) == sum(len(r["annotations"]) for _, r in records.values())
    big = pd.read_parquet(out + "/annotations", filters=[("area", ">", 500)])
    want = sorted(a["id"] for _, r in records.values() for a in r["annotations"] if a["area"] > 500)
    assert sorted(big.id) == want
    # bbox and scores kept exactly
    row = anns.set_index("id").loc[r1[3][1]["annotations"][2]["id"]]
    a = r1[3][1]["annotations"][2]
    assert list(row.bbox) == a["bbox"] and row.predicted_iou == a["predicted_iou"]
    assert anns.counts.isna().all()
    # member locations let a plain range read + seek index fetch the JSON
    one = images.set_index("image_id").loc[104]
    idx = SeekIndex.load(out + "/seek/sa_000001.sidx")
    with idx.open(str(p2)) as ra:
        assert (int(one.json_offset), int(one.json_size)) == idx.locate("sa_104.json")
        assert json.loads(ra.read_member("sa_104.json")) == r2[104][1]
    meta = pq.read_schema(out + "/images/sa_000000.parquet").metadata
    assert meta[b"sa1b_engine.schema_version"] == SCHEMA_VERSION.encode()


def test_with_counts_and_resume(tmp_path):
    out = str(tmp_path / "idx")
    p, records = _shard(tmp_path, 4, 1, "sa_000003.tar")
    res = index_shard(str(p), out, with_counts=True, seek_index=False)
    assert is_indexed(out, str(p))
    anns = pd.read_parquet(out + "/annotations")
    by_id = {
        a["id"]: a["segmentation"]["counts"] for _, r in records.values() for a in r["annotations"]
    }
    assert all(by_id[i] == c for i, c in zip(anns.id, anns.counts))
    again = index_shard(str(p), out)
    assert again.skipped and res.images == 4


def test_damaged_shard_is_salvaged_but_not_marked_indexed(tmp_path):
    out = str(tmp_path / "idx")
    p, records = _shard(tmp_path, 12, 1, "sa_000004.tar", shuffle=False)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    res = index_shard(str(p), out)
    assert not res.report.complete
    assert 0 < res.images < 12
    images = pd.read_parquet(out + "/images")
    assert len(images) >= res.images
    assert not is_indexed(out, str(p))  # a re-run retries it


def test_corrupt_json_is_reported_and_the_rest_indexed(tmp_path):
    out = str(tmp_path / "idx")
    members, records = members_of(3)
    members[3] = ("./sa_2.json", b"{not json")
    p = write_members(tmp_path / "sa_000005.tar", members)
    res = index_shard(str(p), out)
    assert res.report.complete and [n for n, _ in res.report.bad_records] == ["./sa_2.json"]
    assert sorted(pd.read_parquet(out + "/images").image_id) == [1, 3]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda a: a.update(bbox=[1, 2, 3]), "bbox must be a list of 4 numbers"),
        (lambda a: a.update(crop_box="0 0 8 8"), "crop_box must be a list of 4 numbers"),
        (lambda a: a.update(point_coords=[[1.0]]), "point_coords[0] must be a list of 2"),
        (lambda a: a["segmentation"].update(counts=[3, 4]), "COCO RLE string, got list"),
        (lambda a: a.update(id=2**70), "annotation id 1180591620717411303424 does not fit"),
        (lambda a: a.update(area=float("inf")), "area is not a finite number"),
    ],
)
def test_malformed_record_fields_are_reported_per_member(tmp_path, damage, message):
    """A record whose fields do not fit the index's columns goes to bad_records with its
    member name; the shard's other records are indexed and the shard is complete."""
    out = str(tmp_path / "idx")
    members, _ = members_of(3)
    rec = json.loads(members[3][1])
    assert members[3][0] == "./sa_2.json"
    damage(rec["annotations"][0])
    members[3] = ("./sa_2.json", json.dumps(rec).encode())
    p = write_members(tmp_path / "sa_000006.tar", members)
    res = index_shard(str(p), out, with_counts=True)
    assert res.report.complete
    [(name, why)] = res.report.bad_records
    assert name == "./sa_2.json" and message in why
    assert sorted(pd.read_parquet(out + "/images").image_id) == [1, 3]
    assert is_indexed(out, str(p))


def test_duplicate_members_are_reported_and_indexed_once(tmp_path):
    out = str(tmp_path / "idx")
    members, records = members_of(2)
    names = [n for n, _ in members]
    second = json.loads(members[names.index("./sa_1.json")][1])
    second["annotations"] = second["annotations"][:1]  # a different second copy
    members.append(("./sa_1.json", json.dumps(second).encode()))
    members.append(members[names.index("./sa_2.jpg")])
    p = write_members(tmp_path / "sa_000007.tar", members)
    res = index_shard(str(p), out)
    assert sorted(n for n, _ in res.report.bad_records) == ["./sa_1.json", "./sa_2.jpg"]
    assert all("duplicate" in why for _, why in res.report.bad_records)
    assert sorted(pd.read_parquet(out + "/images").image_id) == [1, 2]
    anns = pd.read_parquet(out + "/annotations")
    assert not anns.id.duplicated().any()
    n_first = len(records[1][1]["annotations"])
    assert n_first > 1 and (anns.image_id == 1).sum() == n_first  # the first copy
    # the seek index agrees: random access gives the first copy too
    from pipeline.seek_index import seek_index_name

    idx = SeekIndex.load(f"{out}/seek/{seek_index_name(str(p))}")
    with idx.open(str(p)) as ra:
        assert len(ra.get(1).annotations) == n_first


def test_overwrite_killed_half_way_does_not_stay_marked_indexed(tmp_path, monkeypatch):
    """--overwrite drops the old commit marker before it writes new parts: a run that dies
    between the parts leaves the shard to be indexed again, never a mixed index marked done."""
    import pipeline.parquet_index as pi

    out = str(tmp_path / "idx")
    p, _ = _shard(tmp_path, 3, 1, "sa_000008.tar")
    index_shard(str(p), out)
    assert is_indexed(out, str(p))

    def dies(*a, **k):
        raise OSError("killed while writing parts")

    monkeypatch.setattr(pi, "write_index_part", dies)
    with pytest.raises(OSError, match="killed"):
        index_shard(str(p), out, overwrite=True)
    assert not is_indexed(out, str(p))


def test_rows_from_in_memory_records_real_sample(tmp_path):
    rec = real_records()[0]
    img_row, ann_rows = index_rows_from_record(rec, "sa_000020.tar", with_counts=True)
    assert img_row["image_id"] == 226381 and img_row["num_annotations"] == 10
    assert img_row["shard"] == "sa_000020" and img_row["jpg_offset"] is None
    assert ann_rows[0]["counts"] == rec["annotations"][0]["segmentation"]["counts"]
    assert set(ann_rows[0]) == set(ANNOTATIONS_SCHEMA.names)
    assert set(img_row) == set(IMAGES_SCHEMA.names)
    out = str(tmp_path / "idx")
    write_index_part(out, "sa_000020", [img_row], ann_rows)
    anns = pd.read_parquet(out + "/annotations")
    assert anns.id.dtype == np.int64 and anns.predicted_iou.max() > 1
    assert [int(v) for v in anns.bbox.iloc[-1]] == rec["annotations"][-1]["bbox"]


def test_index_part_to_object_store(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    rec = real_records()[1]
    img_row, ann_rows = index_rows_from_record(rec, "sa_000999")
    write_index_part("memory://idx", "sa_000999", [img_row], ann_rows)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/idx/images/sa_000999.parquet")
    with fs.open("/idx/annotations/sa_000999.parquet") as f:
        assert pq.read_table(f).num_rows == 1


def test_atomic_write_to_memory_publishes_nothing_until_success():
    import fsspec

    from pipeline.io import atomic_write, write_bytes

    fs = fsspec.filesystem("memory")
    url = "memory://atomic-write-test/part.parquet"
    write_bytes(url, b"complete old version")
    with pytest.raises(RuntimeError), atomic_write(url) as f:
        f.write(b"half of the new")
        assert fs.cat("/atomic-write-test/part.parquet") == b"complete old version"
        raise RuntimeError("writer died")
    assert fs.cat("/atomic-write-test/part.parquet") == b"complete old version"
    with pytest.raises(RuntimeError), atomic_write(url + ".new") as f:
        f.write(b"partial")
        raise RuntimeError("writer died")
    assert not fs.exists("/atomic-write-test/part.parquet.new")
    with atomic_write(url) as f:
        f.write(b"new")
    assert fs.cat("/atomic-write-test/part.parquet") == b"new"
    fs.rm("/atomic-write-test", recursive=True)


def test_atomic_write_to_s3_commits_only_on_success(s3_bucket):
    from pipeline.io import atomic_write

    bucket, fs = s3_bucket
    url = f"s3://{bucket}/idx/part.parquet"
    with pytest.raises(RuntimeError), atomic_write(url) as f:
        f.write(b"x" * 1000)
        f.flush(force=True)  # a part is uploaded already
        raise RuntimeError("writer died")
    fs.invalidate_cache()
    assert not fs.exists(url)
    with atomic_write(url) as f:
        f.write(b"complete")
    fs.invalidate_cache()
    assert fs.cat(url) == b"complete"
    with atomic_write(f"s3://{bucket}/idx/empty") as f:
        pass
    fs.invalidate_cache()
    assert fs.cat(f"s3://{bucket}/idx/empty") == b""


@pytest.mark.parametrize(
    "url,shown",
    [("https://user:secret@host.example:8443/a/sa_000001.tar?X-Amz-Signature=abc",
      "https://host.example:8443/a/sa_000001.tar"),
     ("s3://bucket/prefix/sa_000001.tar", "s3://bucket/prefix/sa_000001.tar"),
     ("relative/sa_000001.tar", "relative/sa_000001.tar")],
)
def test_urls_are_printed_without_credentials(url, shown):
    from pipeline.io import redact
    from sam.checkpoint import display_url

    assert redact(url) == shown
    assert display_url(url) == shown
