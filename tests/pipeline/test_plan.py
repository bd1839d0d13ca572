"""Shard plans: stable ids from listings and list files, SA-1B re-annotation, clear errors."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.plan import InputError, ShardPlan, build_plan


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    for name in ["b.jpg", "a.png", "sub/c.JPEG", "sub/deeper/d.webp", "e.jpg"]:
        _touch(root / name)
    _touch(root / "notes.txt")
    _touch(root / ".hidden.jpg")
    _touch(root / ".cache" / "f.jpg")
    return root


def test_folder_plan_sorted_recursive_with_ids_from_one(folder):
    plan = build_plan(str(folder), shard_size=2)
    assert plan.kind == "images"
    expected = sorted(
        str(folder / n) for n in ["a.png", "b.jpg", "e.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    )
    got = [(s.name, it.image_id, it.uri) for s in plan.shards for it in s.items]
    assert got == [
        ("sa_000000", 1, expected[0]),
        ("sa_000000", 2, expected[1]),
        ("sa_000001", 3, expected[2]),
        ("sa_000001", 4, expected[3]),
        ("sa_000002", 5, expected[4]),
    ]
    assert plan.num_images == 5


def test_fingerprint_is_stable_and_tracks_content(folder):
    a = build_plan(str(folder), shard_size=2)
    b = build_plan(str(folder), shard_size=2)
    assert a.fingerprint() == b.fingerprint()
    assert build_plan(str(folder), shard_size=3).fingerprint() != a.fingerprint()
    assert build_plan(str(folder), shard_size=2, first_image_id=10).fingerprint() != a.fingerprint()
    _touch(folder / "f.jpg")  # a new image changes the plan (listing is not cached)
    assert build_plan(str(folder), shard_size=2).fingerprint() != a.fingerprint()


def test_signed_link_refresh_keeps_the_plan_and_secrets_are_not_stored(tmp_path):
    """SA-1B links expire: a refreshed links file (new signature) is the same input, and
    the recorded plan holds no signature."""
    from pipeline.plan import ImageItem, ShardSpec

    def plan(sig):
        url = f"https://cdn.example/sa_000020.tar?X-Amz-Signature={sig}&Expires=1"
        return ShardPlan("sa1b", [ShardSpec(20, source=url)])

    old, new = plan("SECRET1"), plan("SECRET2")
    assert old.fingerprint() == new.fingerprint()
    old.save(str(tmp_path / "plan.parquet"))
    assert b"SECRET" not in (tmp_path / "plan.parquet").read_bytes()
    assert ShardPlan.load(str(tmp_path / "plan.parquet")).shards[0].source == (
        "https://cdn.example/sa_000020.tar"
    )
    by_query = [
        ShardPlan("images", [ShardSpec(0, (ImageItem(1, f"https://h/img?id={i}&api_key=K{i}"),))])
        for i in (1, 2)
    ]  # a query that names the image stays; a key does not
    assert by_query[0].fingerprint() != by_query[1].fingerprint()
    assert by_query[0].to_table().column("uri").to_pylist() == ["https://h/img?id=1"]
    local = [ShardSpec(0, (ImageItem(1, "/d/a?1.jpg"),)), ShardSpec(1, (ImageItem(2, "/d/a?2.jpg"),))]
    other = [ShardSpec(0, (ImageItem(1, "/d/a?1.jpg"),)), ShardSpec(1, (ImageItem(2, "/d/a?3.jpg"),))]
    assert ShardPlan("images", local).fingerprint() != ShardPlan("images", other).fingerprint()


def test_plan_save_load_roundtrip(folder, tmp_path):
    plan = build_plan(str(folder), shard_size=2, first_shard_id=7)
    url = str(tmp_path / "plan.parquet")
    plan.save(url)
    back = ShardPlan.load(url)
    assert back.kind == "images" and back.shard_size == 2
    assert [s.shard_id for s in back.shards] == [7, 8, 9]
    assert back.fingerprint() == plan.fingerprint()
    assert back.shards == plan.shards


def test_txt_list_resolves_relative_entries(tmp_path):
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lst.write_text("# a comment\n../imgs/x.jpg\n\n/abs/y.jpg\ns3://bucket/z.jpg\n")
    plan = build_plan(str(lst), shard_size=10)
    uris = [it.uri for it in plan.shards[0].items]
    assert uris == [str(tmp_path / "imgs" / "x.jpg"), "/abs/y.jpg", "s3://bucket/z.jpg"]
    assert [it.image_id for it in plan.shards[0].items] == [1, 2, 3]


def test_csv_list_with_image_ids(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text("image_id,url,caption\n40,a.jpg,cat\n7,b.jpg,dog\n")
    plan = build_plan(str(lst), shard_size=1)
    got = [(s.name, it.image_id, os.path.basename(it.uri)) for s in plan.shards for it in s.items]
    assert got == [("sa_000000", 40, "a.jpg"), ("sa_000001", 7, "b.jpg")]


def test_tsv_list_with_commas_in_names(tmp_path):
    lst = tmp_path / "l.tsv"
    lst.write_text("uri\timage_id\nimgs/a,1.jpg\t5\nb.jpg\t3\n")
    plan = build_plan(str(lst), shard_size=10)
    got = [(it.image_id, os.path.relpath(it.uri, tmp_path)) for it in plan.shards[0].items]
    assert got == [(5, os.path.join("imgs", "a,1.jpg")), (3, "b.jpg")]


def test_parquet_list(tmp_path):
    lst = tmp_path / "l.parquet"
    pq.write_table(pa.table({"path": ["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"]}), lst)
    plan = build_plan(str(lst), shard_size=2)
    assert [len(s.items) for s in plan.shards] == [2, 1]
    assert plan.shards[1].items[0].uri == "s3://b/3.jpg"


def test_sa1b_shards_keep_their_ids(tmp_path):
    root = tmp_path / "shards"
    for sid in (20, 3, 11):
        _touch(root / f"sa_{sid:06d}.tar")
    plan = build_plan(str(root))
    assert plan.kind == "sa1b"
    assert [(s.shard_id, s.name) for s in plan.shards] == [
        (3, "sa_000003"),
        (11, "sa_000011"),
        (20, "sa_000020"),
    ]
    assert plan.shards[0].source == str(root / "sa_000003.tar")
    assert plan.num_images is None
    single = build_plan(str(root / "sa_000011.tar"))
    assert [s.shard_id for s in single.shards] == [11]


def test_sa1b_list_with_duplicate_shard_ids_is_refused(tmp_path):
    lst = tmp_path / "shards.txt"
    lst.write_text("a/sa_000001.tar\nb/sa_000001.tar\n")
    with pytest.raises(InputError, match="shard id 1 appears twice") as e:
        build_plan(str(lst))
    assert "a/sa_000001.tar" in str(e.value) and "b/sa_000001.tar" in str(e.value)


def _links_file(path, token, sig, extra=""):
    """An SA-1B links file: opaque signed CDN paths, rows unsorted, non-shard rows."""
    rows = [
        ("sa_000020.tar", f"https://cdn.example/m1/v/{token}A.tar?ccb=10-5&oh={sig}&oe=1&_nc_sid=0"),
        ("sa_images_ids.txt", f"https://cdn.example/m1/v/{token}I.txt?oh={sig}&oe=1"),
        ("sa_000003.tar", f"https://cdn.example/m1/v/{token}B.tar?ccb=10-5&oh={sig}&oe=1&_nc_sid=0"),
    ]
    text = "file_name\tcdn_link\n" + "".join(f"{n}\t{u}\n" for n, u in rows) + extra
    path.write_text(text)
    return str(path)


def test_sa1b_links_file_is_a_reannotation_plan_keyed_by_file_name(tmp_path):
    """A links file's paths are signed tokens that change when the links are refreshed:
    shard ids and the plan's identity come from file_name, the links are the sources."""
    old = build_plan(_links_file(tmp_path / "SA-1B_links.txt", "TOKEN1", "SIG1"))
    assert old.kind == "sa1b"
    assert [(s.name, s.source_name) for s in old.shards] == [
        ("sa_000003", "sa_000003.tar"),
        ("sa_000020", "sa_000020.tar"),
    ]
    assert old.shards[0].source.startswith("https://cdn.example/m1/v/TOKEN1B.tar?")
    assert "oh=SIG1" in old.shards[0].source  # the worker needs the signed link
    # refreshed links (new tokens, new signatures): the same run
    new = build_plan(_links_file(tmp_path / "refreshed.txt", "TOKEN2", "SIG2"))
    assert new.fingerprint() == old.fingerprint()
    assert new.shards[1].source.startswith("https://cdn.example/m1/v/TOKEN2A.tar?")
    # a different selection of shards is a different run
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join((tmp_path / "refreshed.txt").read_text().splitlines()[:2]) + "\n")
    assert [s.shard_id for s in build_plan(str(fewer)).shards] == [20]
    assert build_plan(str(fewer)).fingerprint() != old.fingerprint()
    # recorded without signatures; read back with the same identity
    url = str(tmp_path / "plan.parquet")
    old.save(url)
    assert b"SIG1" not in (tmp_path / "plan.parquet").read_bytes()
    back = ShardPlan.load(url)
    assert back.fingerprint() == old.fingerprint()
    assert [s.source_name for s in back.shards] == ["sa_000003.tar", "sa_000020.tar"]
    # --input-kind sa1b and list read it the same way
    for kind in ("sa1b", "list"):
        same = build_plan(str(tmp_path / "SA-1B_links.txt"), input_kind=kind)
        assert same.fingerprint() == old.fingerprint()


def test_plans_without_source_names_keep_their_fingerprint(tmp_path):
    """Outputs of earlier versions resume: a plan without source names hashes its URIs
    exactly as before (expected value computed here independently)."""
    import hashlib

    root = tmp_path / "shards"
    _touch(root / "sa_000007.tar")
    plan = build_plan(str(root))
    text = f"sa1b-engine plan v1\nsa1b\n7\t\t{root / 'sa_000007.tar'}\n"
    assert plan.fingerprint() == hashlib.sha256(text.encode()).hexdigest()
    table = plan.to_table().drop(["source_name"])  # a plan.parquet of an earlier version
    assert ShardPlan.from_table(table).fingerprint() == plan.fingerprint()


def test_links_rows_without_the_header_are_a_links_file_and_tabs_are_never_a_uri(tmp_path):
    """``grep`` output of a links file (no header) plans the same shards; any other line
    with a TAB in a one-URI-per-line list is refused, so a signed link is never taken for
    an image URI (and recorded with its signature)."""
    full = _links_file(tmp_path / "SA-1B_links.txt", "T", "SECRET")
    rows = [ln for ln in open(full).read().splitlines() if ln.startswith("sa_0")]
    grepped = tmp_path / "few.txt"
    grepped.write_text("\r\n".join(rows) + "\r\n")  # (CRLF too)
    assert build_plan(str(grepped)).fingerprint() == build_plan(full).fingerprint()
    odd = tmp_path / "odd.txt"
    odd.write_text("a.jpg\nsa_1.tar\thttps://cdn.example/x.tar?oh=SECRET\n")
    with pytest.raises(InputError, match="line 2: a TAB in a one-URI-per-line list") as e:
        build_plan(str(odd))
    assert "SECRET" not in str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("sa_000021.tar\n", "line 5: expected file_name<TAB>cdn_link"),
        ("sa_000021.tar\tnot-a-link\n", "line 5: expected file_name<TAB>cdn_link"),
        ("sa_000020.tar\thttps://cdn.example/again.tar\n", r"shard id 20 appears twice \(sa_000020.tar\)"),
    ],
)
def test_malformed_links_files_name_the_line(tmp_path, extra, message):
    url = _links_file(tmp_path / "SA-1B_links.txt", "T", "S", extra)
    with pytest.raises(InputError, match=message) as e:
        build_plan(url)
    assert "SA-1B_links.txt" in str(e.value) and "oh=S" not in str(e.value)


def test_links_file_without_shards_is_refused(tmp_path):
    lst = tmp_path / "SA-1B_links.txt"
    lst.write_text("file_name\tcdn_link\nsa_images_ids.txt\thttps://cdn.example/x.txt?oh=S\n")
    with pytest.raises(InputError, match="without sa_NNNNNN.tar rows"):
        build_plan(str(lst))


def test_sa1b_kind_reads_a_list_of_shards_with_other_names(tmp_path):
    lst = tmp_path / "shards.txt"
    lst.write_text("a/sa_000001.tar\n")
    assert [s.shard_id for s in build_plan(str(lst), input_kind="sa1b").shards] == [1]
    lst.write_text("a/sa_000001.tar\nb/renamed.tar\n")
    with pytest.raises(InputError, match="renamed.tar is not named sa_NNNNNN.tar"):
        build_plan(str(lst), input_kind="sa1b")


def _parquet(path, uris, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": uris, "image_id": ids}), path)
    return str(path)


def test_parquet_list_with_numeric_string_ids(tmp_path):
    plan = build_plan(_parquet(tmp_path / "l.parquet", ["a.jpg", "b.jpg"], ["7", "9"]))
    assert [it.image_id for s in plan.shards for it in s.items] == [7, 9]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "not found"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no images found"),
        (lambda p: _touch(p / "l.csv", b"a,b\n1,2\n"), "no URI column"),
        (lambda p: _touch(p / "l.txt", b"\n# only comments\n"), "the list is empty"),
        (lambda p: _touch(p / "l.csv", b"uri,image_id\nx.jpg,1\ny.jpg,1\n"), "duplicate image ids"),
        (lambda p: _touch(p / "data.bin"), "not a folder, image, SA-1B shard or list file"),
        (lambda p: _touch(p / "l.txt", "café.jpg\n".encode("latin-1")), r"not UTF-8 text \(byte 3"),
        (lambda p: _touch(p / "l.csv", "uri\ncafé.jpg\n".encode("cp1252")), "not UTF-8 text"),
        (lambda p: _parquet(p / "l.parquet", ["a.jpg", "b.jpg"], ["1", "x"]), "row 1: image_id 'x'"),
    ],
)
def test_input_errors_name_the_input(tmp_path, make, message):
    url = make(tmp_path)
    with pytest.raises(InputError, match=message) as e:
        build_plan(url)
    assert os.path.basename(url) in str(e.value)


def test_plan_on_s3_prefix_sees_new_objects(s3_bucket):
    bucket, fs = s3_bucket
    for n in ("b.jpg", "a.jpg", "x/c.png"):
        fs.pipe(f"{bucket}/imgs/{n}", b"x")
    plan = build_plan(f"s3://{bucket}/imgs/", shard_size=2)
    assert [it.uri for s in plan.shards for it in s.items] == [
        f"s3://{bucket}/imgs/a.jpg",
        f"s3://{bucket}/imgs/b.jpg",
        f"s3://{bucket}/imgs/x/c.png",
    ]
    # an object added by someone else shows up: the listing bypasses fsspec's cache
    import boto3

    boto3.client(
        "s3", endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1"
    ).put_object(Bucket=bucket, Key="imgs/d.jpg", Body=b"x")
    assert build_plan(f"s3://{bucket}/imgs/", shard_size=2).num_images == 4
    with pytest.raises(InputError, match="not found"):
        build_plan(f"s3://{bucket}/nothing-here/")


def test_the_real_links_file_head_plans_its_shards():
    from tests.sa1b_samples import sa1b_path

    plan = build_plan(str(sa1b_path("SA-1B_links_head_truncated.txt")))
    assert [(s.shard_id, s.source_name) for s in plan.shards] == [
        (20, "sa_000020.tar"),
        (21, "sa_000021.tar"),
        (22, "sa_000022.tar"),
    ]
    assert all(s.source.startswith("https://scontent.xx.fbcdn.net/m1/v/t6/") for s in plan.shards)
