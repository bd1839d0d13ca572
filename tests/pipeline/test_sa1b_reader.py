"""Streaming reader on shards our writer makes: pairing, memory bound, damage, safety."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile

import numpy as np
import pytest

from pipeline.sa1b_reader import (
    CorruptShardError,
    RecordError,
    ShardFormatError,
    ShardReader,
    TruncatedShardError,
)
from sam import rle
from tests.pipeline.conftest import members_of, write_members, write_raw_tar


def _read(path, **kw):
    r = ShardReader(str(path), **kw)
    return {rec.image_id: rec for rec in r}, r.report


def test_roundtrip_records_images_and_masks(small_shard):
    path, records = small_shard
    got, rep = _read(path)
    assert rep.complete and rep.ok and rep.compression == "gzip"
    assert sorted(got) == sorted(records)
    for image_id, (jpeg, rec) in records.items():
        r = got[image_id]
        assert r.jpeg_bytes == jpeg
        assert r.data == rec
        assert r.image().shape == (40, 56, 3)
        for i, a in enumerate(rec["annotations"]):
            np.testing.assert_array_equal(r.mask(i), rle.decode(a["segmentation"]))
    assert rep.images == 6 and rep.members == 12


def test_shuffled_members_pair_by_stem_and_spill_past_the_memory_bound(tmp_path):
    members, records = members_of(30, seed=3)
    random.Random(0).shuffle(members)
    path = write_members(tmp_path / "sa_000002.tar", members)
    reader = ShardReader(str(path), max_pending_bytes=2000)  # forces spilling
    got = {r.image_id: r for r in reader}
    assert reader.report.ok
    assert reader.spilled_bytes > 0
    assert {i: (r.jpeg_bytes, r.data) for i, r in got.items()} == records


def test_truncated_gzip_salvages_what_came_before(tmp_path):
    members, records = members_of(20, seed=1)
    full = write_members(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "sa_000003.tar"
    cut.write_bytes(full[: len(full) * 2 // 3])
    got, rep = _read(cut)
    assert not rep.complete and "truncated" in rep.error
    assert 0 < len(got) < 20
    for i, r in got.items():  # what was salvaged is intact
        assert r.data == records[i][1] and r.jpeg_bytes == records[i][0]
    with pytest.raises(TruncatedShardError):
        list(ShardReader(str(cut), on_error="raise"))


def test_corrupt_gzip_bytes_are_reported(tmp_path):
    members, _ = members_of(20, seed=1)
    data = bytearray(write_members(tmp_path / "a.tar", members).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    bad = tmp_path / "sa_000004.tar"
    bad.write_bytes(bytes(data))
    got, rep = _read(bad)
    assert not rep.complete and rep.error
    assert len(got) < 20
    with pytest.raises(CorruptShardError):
        list(ShardReader(str(bad), on_error="raise"))


def test_corrupt_json_member_is_a_record_error_not_a_crash(tmp_path):
    members, _ = members_of(3)
    members[3] = ("./sa_2.json", b'{"image": {"image_id": 2, ')
    got, rep = _read(write_members(tmp_path / "sa_000005.tar", members))
    assert rep.complete and sorted(got) == [1, 2, 3]
    assert got[1].annotations
    with pytest.raises(RecordError, match="sa_2.json"):
        _ = got[2].annotations


def test_rle_whose_runs_do_not_sum_is_detected(tmp_path):
    members, records = members_of(2)
    rec = records[1][1]
    rec["annotations"][0]["segmentation"]["size"] = [41, 56]  # runs now sum to 40*56
    members[1] = ("./sa_1.json", json.dumps(rec).encode())
    got, _ = _read(write_members(tmp_path / "sa_000006.tar", members))
    with pytest.raises(rle.RLEError, match="sum to"):
        got[1].mask(0)


def test_unsafe_and_foreign_members_are_skipped_and_reported(tmp_path):
    members, _ = members_of(2)
    escape = tarfile.TarInfo("../escape.jpg")
    escape.size = 3
    absolute = tarfile.TarInfo("/etc/sa_9.json")
    absolute.size = 2
    link = tarfile.TarInfo("./sa_7.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    hard = tarfile.TarInfo("./sa_8.jpg")
    hard.type = tarfile.LNKTYPE
    hard.linkname = "./sa_1.jpg"
    readme = tarfile.TarInfo("README")
    readme.size = 2
    entries = [(escape, b"bad"), (absolute, b"{}"), (link, None), (hard, None), (readme, b"hi")]
    for name, data in members:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        entries.append((ti, data))
    got, rep = _read(write_raw_tar(tmp_path / "sa_000007.tar", entries))
    assert rep.complete and sorted(got) == [1, 2]
    reasons = dict(rep.skipped)
    assert "escapes" in reasons["../escape.jpg"]
    assert "absolute" in reasons["/etc/sa_9.json"]
    assert "link" in reasons["./sa_7.jpg"] and "link" in reasons["./sa_8.jpg"]
    assert "README" in reasons
    assert not rep.ok


def test_plain_uncompressed_tar_is_read(tmp_path):
    members, records = members_of(4)
    path = write_members(tmp_path / "sa_000008.tar", members, gzip=False)
    assert path.read_bytes()[:2] != b"\x1f\x8b"
    got, rep = _read(path)
    assert rep.complete and rep.compression == "none" and sorted(got) == sorted(records)


def test_gzip_is_sniffed_not_trusted_from_the_name(tmp_path):
    members, records = members_of(2)
    path = write_members(tmp_path / "weird_name.bin", members)
    got, rep = _read(path)
    assert rep.compression == "gzip" and sorted(got) == sorted(records)


@pytest.mark.parametrize(
    "payload",
    [b"<!DOCTYPE html><html>403 Forbidden</html>" * 20, b"", gzip.compress(b"not a tar" * 100)],
)
def test_non_tar_inputs_raise_clear_errors(tmp_path, payload):
    path = tmp_path / "sa_000009.tar"
    path.write_bytes(payload)
    if payload.startswith(b"\x1f\x8b"):  # gzip of garbage: the tar layer complains
        _, rep = _read(path)
        assert not rep.complete and "checksum" in rep.error
    else:
        with pytest.raises(ShardFormatError, match="sa_000009.tar"):
            list(ShardReader(str(path)))


def test_md5_of_the_raw_file(small_shard):
    import hashlib

    path, _ = small_shard
    _, rep = _read(path, md5=True)
    assert rep.md5 == hashlib.md5(path.read_bytes()).hexdigest()


def test_json_only_shards_read_with_images_false(tmp_path):
    """Shards written without images (--no-copy-images): every JSON is a record."""
    members, records = members_of(3)
    path = write_members(tmp_path / "sa_000003.tar", [m for m in members if m[0].endswith(".json")])
    got, rep = _read(path, images=False)
    assert sorted(got) == sorted(records) and rep.ok
    assert all(got[i].data == records[i][1] and got[i].jpeg_bytes is None for i in got)
    np.testing.assert_array_equal(got[1].mask(0), rle.decode(records[1][1]["annotations"][0]["segmentation"]))
    got, rep = _read(path)  # the default wants SA-1B's pairs
    assert got == {} and len(rep.unpaired) == 3 and not rep.ok


def test_missing_partner_is_reported_unpaired(tmp_path):
    members, _ = members_of(3)
    del members[2]  # sa_2.jpg
    got, rep = _read(write_members(tmp_path / "sa_000010.tar", members))
    assert sorted(got) == [1, 3] and rep.unpaired == ["sa_2.json"]


def test_writer_is_deterministic_and_sa1b_shaped(tmp_path):
    from pipeline.synthetic import write_synthetic_shard

    a = tmp_path / "a" / "sa_000011.tar"
    b = tmp_path / "b" / "sa_000011.tar"
    write_synthetic_shard(str(a), 3)
    write_synthetic_shard(str(b), 3)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(a) as tf:
        assert tf.getnames() == [f"./sa_{i}.{e}" for i in (1, 2, 3) for e in ("jpg", "json")]
        assert all(m.isfile() and m.mtime == 0 for m in tf.getmembers())


def test_writer_reports_member_offsets_the_reader_finds(tmp_path):
    from pipeline.sa1b_writer import ShardWriter

    members, records = members_of(3)
    locs = {}
    with ShardWriter(str(tmp_path / "sa_000013.tar")) as w:
        for image_id, (jpeg, rec) in records.items():
            locs[image_id] = w.add(image_id, jpeg, rec)
    got, _ = _read(tmp_path / "sa_000013.tar")
    for image_id, (jpg, js) in locs.items():
        r = got[image_id]
        assert jpg == (r.jpg_offset, r.jpg_size) and js == (r.json_offset, r.json_size)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    from pipeline.sa1b_writer import ShardWriter

    target = tmp_path / "sa_000012.tar"
    with pytest.raises(RuntimeError), ShardWriter(str(target)) as w:
        w.add(1, b"jpeg", {"image": {"image_id": 1}, "annotations": []})
        raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_dataset_splits_shards_across_workers(tmp_path):
    torch = pytest.importorskip("torch")
    from pipeline.sa1b_dataset import SA1BDataset, shards_for_worker
    from pipeline.synthetic import write_synthetic_shard

    urls = []
    for s in range(3):
        p = tmp_path / f"sa_00000{s}.tar"
        write_synthetic_shard(str(p), 2, first_id=1 + 10 * s, seed=s)
        urls.append(str(p))
    parts = [shards_for_worker(urls, w, 2) for w in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(urls) and not set(parts[0]) & set(parts[1])
    ds = SA1BDataset(urls, transform=lambda r: r.image_id)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(loader) == [1, 2, 11, 12, 21, 22]
    sample = next(iter(SA1BDataset(urls[:1])))
    assert sample["image"].shape == (48, 64, 3) and sample["annotations"]


def test_dataset_reports_damage_and_can_raise_through_workers(tmp_path):
    torch = pytest.importorskip("torch")
    from pipeline.sa1b_dataset import SA1BDataset
    from pipeline.synthetic import write_synthetic_shard

    p = tmp_path / "sa_000000.tar"
    write_synthetic_shard(str(p), 6, first_id=1, seed=0)
    p.write_bytes(p.read_bytes()[:-3000])
    ds = SA1BDataset([str(p)], transform=lambda r: r.image_id)
    got = list(ds)
    assert 0 < len(got) < 6 and len(ds.reports) == 1 and not ds.reports[0].complete
    stopped = SA1BDataset([str(p)], transform=lambda r: r.image_id)
    it = iter(stopped)
    next(it)
    it.close()  # a consumer that stops early still gets the shard's report
    assert len(stopped.reports) == 1
    strict = SA1BDataset([str(p)], transform=lambda r: r.image_id, on_error="raise")
    loader = torch.utils.data.DataLoader(strict, batch_size=None, num_workers=1)
    with pytest.raises(Exception, match="TruncatedShardError|truncated|ends early"):
        list(loader)


# ---------------------------------------------------------------- regressions: hangs, damage


def _in_thread(fn, timeout: float = 20.0):
    """Run ``fn()`` in a daemon thread; a hang fails the test instead of the suite."""
    import threading

    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"hung for {timeout}s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _tar_bytes(members, *, end: bool = True) -> bytes:
    """A plain tar of ``members``, with or without its end-of-archive marker."""
    out = bytearray()
    for name, data in members:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        out += ti.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)
    return bytes(out) + (bytes(1024) if end else b"")


def _read_bytes(tmp_path, raw: bytes, **kw):
    path = tmp_path / "sa_000100.tar"
    path.write_bytes(raw)
    return _in_thread(lambda: _read(path, **kw))


def test_zero_padding_after_gzip_of_a_tar_without_end_marker_is_truncated(tmp_path):
    members, records = members_of(3)
    raw = gzip.compress(_tar_bytes(members, end=False)) + bytes(100)
    got, rep = _read_bytes(tmp_path, raw)
    assert sorted(got) == sorted(records)  # everything before the missing marker
    assert not rep.complete and "TruncatedShardError" in rep.error and "end marker" in rep.error


def test_zero_padding_after_a_complete_gzip_stream_is_fine(tmp_path):
    members, records = members_of(3)
    got, rep = _read_bytes(tmp_path, gzip.compress(_tar_bytes(members)) + bytes(5000))
    assert rep.ok and sorted(got) == sorted(records)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_multi_member_gzip_is_one_stream(tmp_path, monkeypatch, chunk):
    import pipeline.sa1b_reader as reader_mod

    monkeypatch.setattr(reader_mod, "_CHUNK", chunk)  # member magic straddles reads
    members, records = members_of(3)
    tar = _tar_bytes(members)
    cut = len(tar) // 2 + 37  # not on a tar block boundary
    raw = gzip.compress(tar[:cut]) + gzip.compress(tar[cut:]) + bytes(7)
    got, rep = _read_bytes(tmp_path, raw)
    assert rep.ok and {i: (r.jpeg_bytes, r.data) for i, r in got.items()} == records


def test_garbage_after_the_gzip_stream_is_corrupt(tmp_path):
    members, _ = members_of(2)
    raw = gzip.compress(_tar_bytes(members, end=False)) + bytes(10) + b"junk"
    _, rep = _read_bytes(tmp_path, raw)
    assert not rep.complete and "trailing garbage" in rep.error


def _damaged(kind: str) -> bytes:
    """A gzip shard damaged only after its last member's data (so every record reads)."""
    members, _ = members_of(3)
    tar = _tar_bytes(members)
    if kind == "after_end_marker":  # data past the end-of-archive marker
        return gzip.compress(tar + b"junk" + bytes(508))
    if kind == "zero_block_mid_archive":  # members hidden behind an early zero block
        more, _ = members_of(2, seed=9)
        return gzip.compress(tar + _tar_bytes(more))
    raw = bytearray(gzip.compress(tar))
    if kind == "bad_crc":
        raw[-8] ^= 0x01  # the trailer's CRC-32: only a check of the trailer notices
    elif kind.startswith("cut_"):
        del raw[-int(kind[4:]) :]  # the trailer (8 bytes) cut short
    return bytes(raw)


DAMAGE = ["bad_crc", "cut_1", "cut_8", "after_end_marker", "zero_block_mid_archive"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_after_the_last_member_is_not_read_as_complete(tmp_path, kind):
    """The gzip trailer (CRC-32, length) and what follows the end-of-archive marker are
    checked: a shard cut in its last bytes, with a flipped bit or with data after the
    archive is incomplete, though all its records read."""
    got, rep = _read_bytes(tmp_path, _damaged(kind))
    if kind != "bad_crc":  # (a small shard's CRC is checked with its first read)
        assert len(got) == 3
    assert not rep.complete and not rep.ok, kind
    assert rep.error


@pytest.mark.parametrize("kind", ["bad_crc", "cut_1", "after_end_marker"])
def test_index_and_seek_index_check_the_end_of_the_shard_too(tmp_path, kind):
    from pipeline.parquet_index import index_shard, is_indexed
    from pipeline.seek_index import build_seek_index

    path = tmp_path / "sa_000101.tar"
    path.write_bytes(_damaged(kind))
    res = index_shard(str(path), str(tmp_path / "idx"))
    assert not res.report.complete and not is_indexed(str(tmp_path / "idx"), str(path))
    with pytest.raises(CorruptShardError):
        build_seek_index(str(path))


@pytest.mark.parametrize(
    "data",
    [b"0 path=x\n", b"-5 path=x\n", b"x path=y\n", b"99 path=x\n", b"3 path=x\n", b"12 pathx\n\n"],
)
def test_malformed_pax_records_raise_corrupt_not_hang(data):
    from pipeline.sa1b_reader import _parse_pax

    with pytest.raises(CorruptShardError, match="pax"):
        _in_thread(lambda: _parse_pax(data))


def test_well_formed_pax_records_parse():
    from pipeline.sa1b_reader import _parse_pax

    assert _parse_pax(b"13 path=abcd\n11 size=10\n" + bytes(20)) == {
        "path": "abcd",
        "size": "10",
    }


@pytest.mark.parametrize("fill", [b"0", b"x"])  # length 0 looped forever; "x.." escaped
def test_bad_pax_length_in_a_shard_is_reported_not_a_crash(tmp_path, fill):
    members, _ = members_of(2)
    long_name = "./" + "d" * 120 + "/../sa_9.json"  # forces a pax header
    entries = []
    for name, data in [members[0], members[1], (long_name, b"{}"), *members[2:]]:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        entries.append((ti, data))
    path = tmp_path / "sa_000101.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    at = raw.index(b" path=")
    start = at
    while raw[start - 1 : start].isdigit():
        start -= 1
    raw[start:at] = fill * (at - start)  # the record's length digits
    path.write_bytes(bytes(raw))
    got, rep = _in_thread(lambda: _read(path))
    assert sorted(got) == [1]  # what came before the bad header
    assert not rep.complete and "CorruptShardError" in rep.error and "pax" in rep.error


def test_oversized_member_is_refused_not_read(tmp_path):
    members, records = members_of(3)
    members[2] = ("./sa_2.jpg", b"\xff" * 50_000)  # a JPEG bigger than the cap
    path = write_members(tmp_path / "sa_000102.tar", members)
    got, rep = _read(path, max_member_bytes=20_000)
    assert sorted(got) == [1, 3] and rep.complete and not rep.ok
    reasons = dict(rep.skipped)
    assert "limit" in reasons["./sa_2.jpg"] and rep.unpaired == ["sa_2.json"]


def test_duplicate_member_name_is_reported_and_first_copy_kept(tmp_path):
    members, records = members_of(2)
    jpg1 = members[0]
    members.insert(1, ("./sa_1.jpg", b"second copy"))  # before its json arrives
    members.append(("./sa_2.json", b"{}"))  # after sa_2 was paired
    got, rep = _read(write_members(tmp_path / "sa_000103.tar", members))
    assert sorted(got) == [1, 2] and got[1].jpeg_bytes == jpg1[1]
    assert got[2].data == records[2][1]
    dup = [name for name, why in rep.skipped if "duplicate" in why]
    assert dup == ["./sa_1.jpg", "./sa_2.json"] and not rep.unpaired and not rep.ok


def test_pending_refuses_a_duplicate_key():
    from pipeline.sa1b_reader import Member, _Pending

    p = _Pending(1 << 20, None)
    p.put((1, "jpg"), Member("sa_1.jpg", 0, 3, b"abc"))
    with pytest.raises(ValueError):
        p.put((1, "jpg"), Member("sa_1.jpg", 512, 5, b"abcde"))
    assert p.mem_bytes == 3 and p.pop((1, "jpg")).data == b"abc" and p.mem_bytes == 0


class _TrackedFile(io.BytesIO):
    opened: list = []

    def __init__(self, data: bytes):
        super().__init__(data)
        _TrackedFile.opened.append(self)


def test_not_a_shard_closes_the_file_it_opened(tmp_path, monkeypatch):
    import pipeline.sa1b_reader as reader_mod

    path = tmp_path / "sa_000104.tar"
    path.write_bytes(b"<html>expired</html>" * 40)
    _TrackedFile.opened = []
    monkeypatch.setattr(reader_mod, "open_url", lambda url: _TrackedFile(path.read_bytes()))
    reader = ShardReader(str(path))
    with pytest.raises(ShardFormatError):
        list(reader)
    assert len(_TrackedFile.opened) == 1 and _TrackedFile.opened[0].closed
    assert "ShardFormatError" in reader.report.error


def test_writer_commits_nothing_when_closing_fails(tmp_path):
    from pipeline.sa1b_writer import ShardWriter

    def boom():
        raise OSError("disk full")

    for which in ("_tar", "_gz"):
        target = tmp_path / which / "sa_000014.tar"
        with pytest.raises(OSError, match="disk full"), ShardWriter(str(target)) as w:
            w.add(1, b"jpeg", {"image": {"image_id": 1}, "annotations": []})
            getattr(w, which).close = boom
        assert not target.exists()
        assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_writer_commits_nothing_to_memory_when_closing_fails():
    import fsspec

    from pipeline.sa1b_writer import ShardWriter

    def boom():
        raise OSError("connection reset")

    url = "memory://writer-close-fails/sa_000015.tar"
    with pytest.raises(OSError, match="reset"), ShardWriter(url) as w:
        w.add(1, b"jpeg", {"image": {"image_id": 1}, "annotations": []})
        w._gz.close = boom
    assert not fsspec.filesystem("memory").exists("/writer-close-fails/sa_000015.tar")


def test_dataset_shuffles_per_epoch_and_still_sees_every_image_once(tmp_path):
    torch = pytest.importorskip("torch")
    from pipeline.sa1b_dataset import SA1BDataset
    from pipeline.synthetic import write_synthetic_shard

    urls = []
    for s in range(8):
        p = tmp_path / f"sa_00000{s}.tar"
        write_synthetic_shard(str(p), 3, first_id=1 + 10 * s, seed=s, h=16, w=16, masks=1)
        urls.append(str(p))
    every = sorted(1 + 10 * s + i for s in range(8) for i in range(3))
    plain = list(SA1BDataset(urls, transform=lambda r: r.image_id))
    assert plain == every  # unshuffled: shard order, member order

    def run(ds, epoch, workers=0):
        ds.set_epoch(epoch)
        return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))

    ds = SA1BDataset(urls, transform=lambda r: r.image_id, shuffle=True, seed=3)
    e0, e1 = run(ds, 0), run(ds, 1)
    assert sorted(e0) == sorted(e1) == every and e0 != e1 and e0 != plain
    assert run(ds, 0) == e0  # the same seed and epoch: the same order
    shard_order = [ids[0] // 10 for ids in (e0[i : i + 3] for i in range(0, 24, 3))]
    assert sorted(shard_order) == list(range(8))  # whole shards, permuted
    # DataLoader workers copy the dataset: set_epoch before iterating reaches them
    assert sorted(run(ds, 1, workers=2)) == every
    both = [run(ds, e, workers=2) for e in (0, 1)]
    assert both[0] != both[1]
    # a buffer mixes records across shards; deterministic, nothing lost
    buf = SA1BDataset(urls, transform=lambda r: r.image_id, shuffle=True, shuffle_buffer=6, seed=3)
    b0 = run(buf, 0)
    assert sorted(b0) == every and b0 != e0 and run(buf, 0) == b0
    assert any(abs(a // 10 - b // 10) > 0 for a, b in zip(b0[:3], b0[1:4]))
    fresh = SA1BDataset(urls, transform=lambda r: r.image_id, shuffle_buffer=6)
    it = iter(fresh)
    next(it)  # 7 records read: two shards whole, the third begun
    it.close()  # stopping early still closes the shard being read, with its report
    assert len(fresh.reports) == 3 and [r.complete for r in fresh.reports] == [True, True, False]
    with pytest.raises(ValueError, match="shuffle_buffer"):
        SA1BDataset(urls, shuffle_buffer=-1)


def test_dataset_gives_every_rank_the_same_count_for_ddp(tmp_path):
    """Shards of 2, 5, 9 and 3 images over 2 ranks: whole shards give the ranks 11 and 8
    images (DDP would hang on the shorter); samples_per_rank gives both exactly that
    many, a short rank rereading its shards, a long one stopping early, no shard on two
    readers; with 2 DataLoader workers per rank the share is split between them."""
    torch = pytest.importorskip("torch")
    from pipeline.sa1b_dataset import SA1BDataset
    from pipeline.synthetic import write_synthetic_shard

    urls, sizes = [], (2, 5, 9, 3)
    for s, n in enumerate(sizes):
        p = tmp_path / f"sa_00000{s}.tar"
        write_synthetic_shard(str(p), n, first_id=1 + 100 * s, seed=s, h=16, w=16, masks=1)
        urls.append(str(p))

    def ids(rank, workers=0, **kw):
        ds = SA1BDataset(urls, transform=lambda r: r.image_id, rank=rank, world_size=2, **kw)
        return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))

    # round-robin: rank 0 reads shards 0 and 2 (11 images), rank 1 shards 1 and 3 (8)
    assert [len(ids(r)) for r in (0, 1)] == [11, 8]
    for kw in ({}, {"shuffle": True, "seed": 1}, {"shuffle": True, "shuffle_buffer": 4}):
        got = [ids(r, samples_per_rank=6, **kw) for r in (0, 1)]
        assert [len(g) for g in got] == [6, 6], kw
        assert not {i // 100 for i in got[0]} & {i // 100 for i in got[1]}, kw
    short = ids(1, samples_per_rank=13)  # 8 images: one pass and 5 more
    assert len(short) == 13 and len(set(short)) == 8
    assert sorted(short[:8]) == sorted(set(short))  # a whole pass before any repeat
    # 2 ranks x 2 workers: rank 0's worker 0 reads shard 0 (2 images) for its 4, worker 1
    # shard 1 (5 images) for its 3
    split = ids(0, workers=2, samples_per_rank=7)
    assert len(split) == 7 and sorted(i // 100 for i in split) == [0] * 4 + [1] * 3
    # a share filled mid-shard still closes the shard, with its report
    ds = SA1BDataset(urls, transform=lambda r: r.image_id, rank=0, world_size=2, samples_per_rank=4)
    assert len(list(ds)) == 4
    assert [(r.complete, r.images) for r in ds.reports] == [(True, 2), (False, 2)]
    # too few shards: every rank refuses, not only the one left without a shard
    for rank in (0, 1):
        with pytest.raises(ValueError, match="samples_per_rank needs a shard for every reader"):
            list(SA1BDataset(urls[:1], samples_per_rank=4, rank=rank, world_size=2))
    for bad, msg in (
        ({"samples_per_rank": 0}, "samples_per_rank must be >= 1"),
        ({"rank": 1}, "rank and world_size together"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            SA1BDataset(urls, **bad)
