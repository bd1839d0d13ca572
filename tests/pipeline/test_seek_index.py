"""Random access through the seek index: local, HTTP range reads and S3 (moto)."""

from __future__ import annotations

import random

import pytest

from pipeline.sa1b_reader import CorruptShardError
from pipeline.seek_index import (
    SeekIndex,
    SeekIndexError,
    build_seek_index,
    find_record_by_scan,
)
from tests.pipeline.conftest import members_of, write_members


@pytest.fixture
def big_shard(tmp_path):
    """~40 images with shuffled members and several inflate checkpoints."""
    members, records = members_of(40, seed=7, h=120, w=160, masks=6)
    random.Random(1).shuffle(members)
    return write_members(tmp_path / "sa_000020.tar", members), records


def test_random_access_matches_the_records(big_shard, tmp_path):
    path, records = big_shard
    idx = build_seek_index(str(path), spacing=64 << 10)
    assert idx.compression == "gzip" and len(idx.checkpoints) > 0
    assert idx.image_ids() == sorted(records)
    idx.save(str(tmp_path / "sa_000020.sidx"))
    loaded = SeekIndex.load(str(tmp_path / "sa_000020.sidx"))
    with loaded.open(str(path)) as ra:
        for image_id in random.Random(0).sample(sorted(records), 10):
            rec = ra.get(image_id)
            assert rec.jpeg_bytes == records[image_id][0]
            assert rec.data == records[image_id][1]
        with pytest.raises(KeyError):
            ra.get(999_999)


def test_plain_tar_random_access(tmp_path):
    members, records = members_of(5)
    path = write_members(tmp_path / "sa_000021.tar", members, gzip=False)
    idx = build_seek_index(str(path))
    assert idx.compression == "none" and idx.checkpoints == b""
    with idx.open(str(path)) as ra:
        assert ra.get(3).data == records[3][1]


def test_scan_without_index_finds_the_same_record(big_shard):
    path, records = big_shard
    rec = find_record_by_scan(str(path), 17)
    assert rec.data == records[17][1] and rec.jpeg_bytes == records[17][0]
    with pytest.raises(KeyError):
        find_record_by_scan(str(path), 123456)


def test_damaged_shard_gives_no_index_and_bad_index_is_rejected(big_shard, tmp_path):
    path, _ = big_shard
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CorruptShardError):
        build_seek_index(str(cut))
    with pytest.raises(SeekIndexError):
        SeekIndex.from_bytes(b"garbage" * 10)


@pytest.mark.parametrize("key", ["compression", "names"])
def test_a_seek_index_header_without_a_key_is_rejected_by_name(key):
    import json
    import struct
    import zlib

    from pipeline import seek_index

    good = SeekIndex("sa_000001.tar", "gzip", 10, 20, 1 << 20, ["sa_1.json"], [0], [5])
    assert SeekIndex.from_bytes(good.to_bytes()).names == ["sa_1.json"]
    header = {k: v for k, v in json.loads(zlib.decompress(good.to_bytes()[17:])).items()}
    del header[key]
    h = zlib.compress(json.dumps(header).encode())
    data = seek_index.MAGIC + struct.pack("<BQ", seek_index.VERSION, len(h)) + h
    with pytest.raises(SeekIndexError, match=f"x.sidx: damaged seek index: KeyError: '{key}'"):
        SeekIndex.from_bytes(data, "x.sidx")


def test_random_access_over_http_uses_range_requests(big_shard, http_server):
    path, records = big_shard
    base, root, srv = http_server
    (root / path.name).write_bytes(path.read_bytes())
    idx = build_seek_index(str(path), spacing=64 << 10)
    url = f"{base}/{path.name}"
    with idx.open(url, block_size=16 << 10) as ra:
        srv.ranges.clear()
        rec = ra.get(33)
    assert rec.data == records[33][1] and rec.jpeg_bytes == records[33][0]
    assert srv.ranges, "expected HTTP range requests"
    fetched = sum(e - s + 1 for s, e in srv.ranges)
    assert fetched < path.stat().st_size  # not the whole shard


def test_streaming_and_random_access_over_s3(big_shard, s3_bucket):
    from pipeline.sa1b_reader import ShardReader

    path, records = big_shard
    bucket, fs = s3_bucket
    url = f"s3://{bucket}/shards/{path.name}"
    fs.put(str(path), url)
    reader = ShardReader(url)
    assert {r.image_id for r in reader} == set(records) and reader.report.ok
    idx = build_seek_index(url, spacing=64 << 10)
    idx.save(f"s3://{bucket}/seek/sa_000020.sidx")
    with SeekIndex.load(f"s3://{bucket}/seek/sa_000020.sidx").open(url) as ra:
        assert ra.get(5).data == records[5][1]


def test_index_of_another_shard_is_refused_naming_both(big_shard, tmp_path):
    path, _ = big_shard
    idx = build_seek_index(str(path), spacing=64 << 10)
    idx.save(str(tmp_path / "sa_000020.sidx"))
    loaded = SeekIndex.load(str(tmp_path / "sa_000020.sidx"))
    other = tmp_path / "sa_000021.tar"
    other.write_bytes(path.read_bytes())
    with pytest.raises(SeekIndexError, match="sa_000020.sidx") as e:
        loaded.open(str(other))
    assert "sa_000021.tar" in str(e.value) and "sa_000020.tar" in str(e.value)


def test_index_of_a_rewritten_shard_is_refused(big_shard, tmp_path):
    path, _ = big_shard
    idx = build_seek_index(str(path), spacing=64 << 10)
    members, _ = members_of(5, seed=9)
    same_name = tmp_path / "again" / path.name
    write_members(same_name, members)  # other bytes under the same name
    with pytest.raises(SeekIndexError, match="compressed bytes") as e:
        idx.open(str(same_name))
    assert str(same_name) in str(e.value) and path.name in str(e.value)


def test_failed_checkpoint_import_closes_the_shard(big_shard, monkeypatch):
    import pipeline.seek_index as seek_mod

    path, _ = big_shard
    idx = build_seek_index(str(path), spacing=64 << 10)
    idx.checkpoints = b"GZIDX" + bytes(40)  # unloadable checkpoints
    opened = []
    real_open = seek_mod.open_url

    def tracking_open(url, *a, **kw):
        f = real_open(url, *a, **kw)
        opened.append(f)
        return f

    monkeypatch.setattr(seek_mod, "open_url", tracking_open)
    with pytest.raises(SeekIndexError, match="checkpoints"):
        idx.open(str(path))
    assert len(opened) == 1 and opened[0].closed
