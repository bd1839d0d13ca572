"""Fixtures for the pipeline tests: small synthetic shards, a local HTTP server with
Range support, and a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import os
import re
import tarfile
import threading
from pathlib import Path

import pytest

from pipeline.sa1b_writer import ShardWriter, write_image_json
from pipeline.synthetic import iter_synthetic


def members_of(n: int, *, seed: int = 0, h: int = 40, w: int = 56, masks: int = 4):
    """``[(name, bytes), ...]`` of a synthetic shard, jpg then json per image, plus the
    records by id."""
    members, records = [], {}
    for image_id, jpeg, rec in iter_synthetic(n, h=h, w=w, masks=masks, seed=seed):
        members.append((f"./sa_{image_id}.jpg", jpeg))
        members.append((f"./sa_{image_id}.json", write_image_json(rec)))
        records[image_id] = (jpeg, rec)
    return members, records


def write_members(path: Path, members, *, gzip: bool = True) -> Path:
    with ShardWriter(str(path), gzip=gzip, member_prefix="") as w:
        for name, data in members:
            w.add_member(name, data)
    return path


def write_raw_tar(path: Path, entries, *, gz: bool = True) -> Path:
    """A tar with arbitrary TarInfo entries ``(TarInfo, bytes|None)`` (links, ..)."""
    mode = "w:gz" if gz else "w"
    with tarfile.open(path, mode) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture
def small_shard(tmp_path):
    members, records = members_of(6)
    return write_members(tmp_path / "sa_000001.tar", members), records


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory with single-range support; ``/expired/*`` answers 403 HTML."""

    def log_message(self, *a):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _html(self, status: int, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool):
        path = self.path.split("?", 1)[0]
        if path.startswith("/expired/"):
            return self._html(403, b"<!DOCTYPE html><html><body>URL signature expired</body></html>", head)
        if path.startswith("/down/"):  # a server error for any file there
            return self._html(503, b"<html><body>Service Unavailable</body></html>", head)
        if path.startswith("/fake200/"):  # a 200 with an HTML page instead of the file
            return self._html(200, b"<html><body>Please log in</body></html>", head)
        file = Path(self.server.root) / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        size = len(data)
        if getattr(self.server, "short", False) and not head:  # the connection drops early
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(data[: size // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d*)-(\d*)$", rng or "")
        if m:
            start = int(m.group(1)) if m.group(1) else size - int(m.group(2))
            end = int(m.group(2)) if m.group(1) and m.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(end, size - 1)
            self.server.ranges.append((start, end))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            body = data[start : end + 1]
        else:
            self.send_response(200)
            body = data
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path):
    """``(base_url, root_dir, server)``: files under root_dir at base_url."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.root = str(root)
    srv.ranges = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root, srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server; fsspec's s3 config points at it."""
    import fsspec.config
    import s3fs

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": moto_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": moto_endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    name = f"test-{os.urandom(4).hex()}"
    fs.mkdir(name)
    yield name, fs
    s3fs.S3FileSystem.clear_instance_cache()
