"""Run manifest, commit markers, status and I/O retries."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pipeline.manifest import (
    MANIFEST_VERSION,
    RunConflictError,
    check_compatible,
    committed_shards,
    format_status,
    is_transient,
    load_manifest,
    read_markers,
    retry_io,
    run_markers,
    run_status,
    write_manifest,
    write_marker,
)


def _manifest(**over):
    m = {
        "version": MANIFEST_VERSION,
        "run_id": "r1",
        "model": {"name": "tiny", "checkpoint_sha256": "ab" * 32},
        "generator": {"preset": "default", "settings": {"points_per_side": 32}},
        "output": {"layout": "tar"},
        "plan": {"kind": "images", "num_shards": 3, "num_images": 5, "sha256": "p1"},
        "shards": ["sa_000000", "sa_000001", "sa_000002"],
        "code_version": {"package": "0.1.0"},
    }
    m.update(over)
    return m


def test_manifest_roundtrip_and_absent(tmp_path):
    out = str(tmp_path / "out")
    assert load_manifest(out) is None
    write_manifest(out, _manifest())
    assert load_manifest(out) == _manifest()
    assert not [p for p in os.listdir(tmp_path / "out" / "_run") if p.startswith(".")]


def test_compatible_rerun_passes_and_code_change_only_warns(caplog):
    check_compatible(_manifest(), _manifest(), "out")
    with caplog.at_level(logging.WARNING):
        check_compatible(_manifest(), _manifest(code_version={"package": "0.2.0"}), "out")
    assert "code version differs" in caplog.text


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"generator": {"preset": "default", "settings": {"points_per_side": 16}}},
            "generator.settings.points_per_side: recorded 32, now 16",
        ),
        ({"model": {"name": "tiny", "checkpoint_sha256": "cd" * 32}}, "model.checkpoint_sha256"),
        (
            {"plan": {"kind": "images", "num_shards": 4, "num_images": 7, "sha256": "p2"}},
            "plan.num_images: recorded 5, now 7",
        ),
        ({"output": {"layout": "files"}}, "output.layout"),
    ],
)
def test_conflicting_rerun_is_refused_with_the_difference(change, expected):
    with pytest.raises(RunConflictError) as e:
        check_compatible(_manifest(), _manifest(**change), "s3://bucket/out")
    assert expected in str(e.value)
    assert "s3://bucket/out" in str(e.value)


def test_markers_and_status(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_manifest(out, _manifest())
    assert committed_shards(out) == set()
    write_marker(
        out, "sa_000000", {"run_id": "r1", "images_ok": 2, "images_failed": 0, "annotations": 9}
    )
    write_marker(
        out,
        "sa_000002",
        {
            "run_id": "r1",
            "images_ok": 0,
            "images_failed": 1,
            "annotations": 0,
            "failures": [{"image_id": 5, "status": "corrupt", "reason": "bad"}],
        },
    )
    # a marker from another run id (should never happen, but must not count)
    write_marker(out, "sa_000009", {"run_id": "other", "images_ok": 100})
    assert committed_shards(out) == {"sa_000000", "sa_000002", "sa_000009"}
    assert set(read_markers(out)) == {"sa_000000", "sa_000002", "sa_000009"}
    st = run_status(out)
    assert (st.shards_total, st.shards_committed, st.complete) == (3, 2, False)
    assert (st.images_ok, st.images_failed, st.annotations) == (2, 1, 9)
    assert st.failures_by_status == {"corrupt": 1}
    assert st.pending == ["sa_000001"]
    text = format_status(st)
    assert "2/3 committed" in text and "pending     1: sa_000001" in text
    assert json.loads(json.dumps(st.as_dict()))["pending"] == ["sa_000001"]
    from jobs.generate import main as generate_main

    assert generate_main(["status", out, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pending"] == ["sa_000001"] and shown["images_failed"] == 1
    assert shown["failures_by_status"] == {"corrupt": 1}


def test_status_of_an_empty_output(tmp_path):
    st = run_status(str(tmp_path))
    assert not st.started
    assert "no generation run" in format_status(st)


def test_marker_listing_bypasses_the_listing_cache(s3_bucket):
    import boto3

    bucket, _ = s3_bucket
    out = f"s3://{bucket}/run"
    write_marker(out, "sa_000000", {"run_id": "r"})
    assert committed_shards(out) == {"sa_000000"}
    # another process (a worker) commits a shard: the driver must see it
    boto3.client(
        "s3", endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1"
    ).put_object(Bucket=bucket, Key="run/_commits/sa_000001.json", Body=b'{"run_id": "r"}')
    assert committed_shards(out) == {"sa_000000", "sa_000001"}


def test_retry_io_retries_transient_errors_only(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry_io(flaky, what="s3://b/k") == "ok" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(FileNotFoundError):
        retry_io(missing, what="s3://b/k")
    assert len(calls) == 1

    calls.clear()

    def down():
        calls.append(1)
        raise TimeoutError("slow down")

    with pytest.raises(TimeoutError):
        retry_io(down, what="s3://b/k", attempts=4)
    assert len(calls) == 4


def test_read_index_reads_committed_shards_only(tmp_path):
    """Parts of a shard whose attempt died before its marker are not results."""
    import pandas as pd

    from pipeline import read_index
    from pipeline.manifest import write_marker

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no generation run here"):
        read_index(str(out), "images")
    write_manifest(str(out), _manifest())
    assert read_index(str(out), "images").empty
    for shard, ids in (("sa_000000", [1, 2]), ("sa_000001", [3])):
        d = out / "index" / "annotations"
        d.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"image_id": ids, "area": [10 * i for i in ids]}).to_parquet(
            d / f"{shard}.parquet"
        )
    write_marker(str(out), "sa_000000", {"shard": "sa_000000", "run_id": "r1"})
    assert sorted(read_index(str(out)).image_id) == [1, 2]
    assert list(read_index(str(out), filters=[("area", ">", 10)]).image_id) == [2]
    write_marker(str(out), "sa_000001", {"shard": "sa_000001", "run_id": "another run"})
    assert sorted(read_index(str(out)).image_id) == [1, 2]  # not this run's results
    write_marker(str(out), "sa_000001", {"shard": "sa_000001", "run_id": "r1"})
    assert sorted(read_index(str(out), columns=["image_id"]).image_id) == [1, 2, 3]
    with pytest.raises(ValueError, match="table must be one of"):
        read_index(str(out), "masks")


def test_malformed_and_foreign_markers_count_as_not_committed(tmp_path, caplog):
    """A truncated marker, one that is no object or names another shard, and one of
    another run: status shows those shards pending instead of failing or counting them."""
    out = str(tmp_path / "out")
    write_manifest(out, _manifest())
    write_marker(out, "sa_000000", {"shard": "sa_000000", "run_id": "r1", "images_ok": 2})
    commits = tmp_path / "out" / "_commits"
    (commits / "sa_000001.json").write_text('{"shard": "sa_000001", "run_id": "r1", "images_ok"')
    (commits / "sa_000002.json").write_text('["sa_000002"]')
    (commits / "sa_000003.json").write_text('{"shard": "sa_000000", "run_id": "r1"}')
    write_marker(out, "sa_000004", {"shard": "sa_000004", "run_id": "old"})
    with caplog.at_level(logging.WARNING, logger="pipeline.manifest"):
        assert set(read_markers(out)) == {"sa_000000", "sa_000004"}
        assert set(run_markers(out, "r1")) == {"sa_000000"}
    text = caplog.text
    assert "sa_000001.json: not a commit marker (" in text
    assert "sa_000002.json: not a commit marker of sa_000002" in text
    assert "sa_000003.json: not a commit marker of sa_000003" in text
    assert "1 commit markers belong to another run than r1 (first: sa_000004)" in text
    st = run_status(out)
    assert (st.shards_committed, st.images_ok, st.pending) == (1, 2, ["sa_000001", "sa_000002"])


def test_a_manifest_that_is_no_object_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "_run").mkdir(parents=True)
    (out / "_run" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RunConflictError, match="manifest.json is not a JSON object"):
        load_manifest(str(out))


def test_http_errors_behind_not_found_are_told_apart(http_server):
    """fsspec reports any failed request for an HTTP file's size as FileNotFoundError:
    a 404 or a 403 is final, a 503 or a refused connection is worth retrying."""
    import socket

    from pipeline.io import open_url

    base, www, _ = http_server
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/a.jpg"
    expected = {f"{base}/gone.jpg": False, f"{base}/expired/a.jpg": False,
                f"{base}/down/a.jpg": True, closed: True}  # fmt: skip
    for url, transient in expected.items():
        with pytest.raises(FileNotFoundError) as e:
            open_url(url).close()
        assert is_transient(e.value) is transient, url
