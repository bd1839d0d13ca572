"""Download SA-1B shards from an ``SA-1B_links.txt`` file.

* the links file is a TSV with header ``file_name\\tcdn_link`` (rows unsorted);
* the HTTP status is checked: an expired link answers 403 with an HTML page, which is
  never saved as a shard (and a 200 whose body does not start like a tar or gzip is
  refused too);
* downloads resume: bytes land in ``<name>.part`` and a re-run asks for the rest with a
  ``Range`` request (a server that ignores it answers 200 and we start over);
* the md5 is checked against a checklist (``md5sum`` format) before the ``.part`` file is
  renamed to its final name, so a file under its final name is always verified;
* files download in parallel threads. Signed URLs are never logged (query stripped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from pipeline.io import describe, open_url, redact
from pipeline.plan import links_rows

__all__ = [
    "DownloadError",
    "DownloadResult",
    "download_all",
    "download_file",
    "read_links",
    "read_md5_checklist",
]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed (HTTP error, wrong content, md5 mismatch)."""


def _read_text(url: str, what: str) -> str:
    with open_url(url) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")  # (a byte-order mark is dropped)
    except UnicodeDecodeError:
        raise ValueError(f"{redact(url)}: not a text file (expected {what})") from None


def read_links(url: str) -> dict[str, str]:
    """``{file_name: cdn_link}`` from an ``SA-1B_links.txt`` TSV (its header line may be
    missing: ``grep`` output of its rows); ``ValueError`` naming the file and line when it
    is not one."""
    rows = links_rows(_read_text(url, "an SA-1B links file"), url, every_row=True)
    if rows is None:
        raise ValueError(f"{redact(url)}: not an SA-1B links file (header file_name<TAB>cdn_link)")
    return dict(rows)


def read_md5_checklist(url: str) -> dict[str, str]:
    """``{file_name: md5}`` from an md5sum-format file (``<md5>  <name>`` per line; blank
    lines and ``#`` comments allowed). Any other line, or no entry at all, is a
    ``ValueError`` naming the file: a checklist that checks nothing must not pass."""
    text = _read_text(url, "an md5sum checklist")
    out = {}
    for i, ln in enumerate(text.splitlines(), start=1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        tagged = re.fullmatch(r"MD5 \((.+)\) = ([0-9a-fA-F]{32})\s*", ln)  # md5sum --tag
        if tagged:
            name, digest = tagged.group(1), tagged.group(2)
        else:
            parts = ln.split()
            digest = parts[0].removeprefix("\\") if parts else ""  # md5sum's escape mark
            if len(parts) < 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
                raise ValueError(f"{redact(url)}:{i}: not an md5sum line: {ln[:80]!r}")
            name = parts[-1].lstrip("*")
        out[name.removeprefix("./")] = digest.lower()
    if not out:
        raise ValueError(f"{redact(url)}: no md5 entries")
    return out


@dataclass
class DownloadResult:
    name: str
    path: str
    bytes: int
    md5: str
    status: str  # "downloaded" | "resumed" | "exists"


def _md5_of(path: str) -> hashlib._Hash:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(_CHUNK), b""):
            h.update(b)
    return h


def _looks_like_payload(name: str, first: bytes) -> bool:
    if name.endswith(".tar"):
        return first[:2] == b"\x1f\x8b" or (len(first) >= 262 and first[257:262] == b"ustar")
    return not first.lstrip()[:15].lower().startswith((b"<!doctype", b"<html"))


def download_file(
    name: str,
    link: str,
    out_dir: str,
    *,
    md5: str | None = None,
    session: Any = None,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> DownloadResult:
    """Download ``link`` to ``out_dir/name`` (resumable, status- and md5-checked)."""
    import requests

    if os.sep in name or "/" in name or name in ("", ".", ".."):
        raise DownloadError(f"refusing unsafe file name {name!r} from the links file")
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, name)
    part = final + ".part"
    if os.path.exists(final):
        if md5 is None or _md5_of(final).hexdigest() == md5:
            return DownloadResult(name, final, os.path.getsize(final), md5 or "", "exists")
        log.warning("%s exists but its md5 differs; downloading again", name)
        os.remove(final)
    sess = session or requests.Session()
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = sess.get(link, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as e:
        raise DownloadError(f"{name}: request to {redact(link)} failed: {type(e).__name__}") from e
    with resp:
        expected = None  # the file's full size, where the server says it
        if resp.status_code == 416 and have:  # we may already have every byte
            cr = resp.headers.get("Content-Range", "")
            total = _range_total(cr)
            if total is None and md5 is not None and _md5_of(part).hexdigest() == md5:
                total = have  # no size given, but the checklist vouches for the bytes
            if total != have:
                os.remove(part)
                raise DownloadError(
                    f"{name}: the server refused to resume ({cr or 'no Content-Range'}) and the "
                    f"partial file's {have} bytes are not the whole file; removed it, rerun to "
                    "download again"
                )
            status = "resumed"
            h = _md5_of(part)
        elif resp.status_code in (200, 206):
            if resp.status_code == 206:
                expected = _range_total(resp.headers.get("Content-Range", ""))
            elif resp.headers.get("Content-Encoding", "identity") == "identity":
                length = resp.headers.get("Content-Length", "")
                expected = int(length) if length.isdigit() else None
            resumed = resp.status_code == 206 and have > 0
            if resumed:
                cr = resp.headers.get("Content-Range", "")
                if not cr.startswith(f"bytes {have}-"):
                    raise DownloadError(f"{name}: server answered an unexpected range {cr!r}")
                h = _md5_of(part)
                mode = "ab"
            else:
                h = hashlib.md5()
                mode = "wb"
            status = "resumed" if resumed else "downloaded"
            it = resp.iter_content(_CHUNK)
            first = b""
            for chunk in it:
                first = chunk
                break
            if not resumed and not _looks_like_payload(name, first):
                raise DownloadError(
                    f"{name}: {redact(link)} answered {resp.status_code} with "
                    f"{resp.headers.get('Content-Type', 'unknown content')} that is not a "
                    "shard (expired link?); nothing saved"
                )
            with open(part, mode) as f:
                for chunk in _chain(first, it):
                    f.write(chunk)
                    h.update(chunk)
                    if progress:
                        progress(len(chunk))
        else:
            hint = " (the signed link has probably expired: fetch a new links file)"
            raise DownloadError(
                f"{name}: {redact(link)} answered HTTP {resp.status_code}"
                + (hint if resp.status_code in (401, 403, 410) else "")
                + "; nothing saved"
            )
    size = os.path.getsize(part)
    if expected is not None and size != expected:  # the connection ended early
        raise DownloadError(
            f"{name}: got {size} of {expected} bytes (connection ended early); rerun to resume"
        )
    digest = h.hexdigest()
    if md5 is not None and digest != md5:
        os.remove(part)
        raise DownloadError(f"{name}: md5 {digest} does not match the checklist's {md5}")
    os.replace(part, final)
    return DownloadResult(name, final, os.path.getsize(final), digest, status)


def _range_total(content_range: str) -> int | None:
    """The full size in a ``Content-Range`` (``bytes 0-9/10`` or ``bytes */10``)."""
    m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", content_range.strip())
    return int(m.group(1)) if m else None


def _chain(first: bytes, rest: Iterable[bytes]) -> Iterable[bytes]:
    if first:
        yield first
    yield from rest


def download_all(
    links: dict[str, str],
    out_dir: str,
    *,
    md5s: dict[str, str] | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[DownloadResult], list[tuple[str, str]]]:
    """Download every link in parallel; returns ``(results, [(name, error), ...])``."""
    import requests

    md5s = md5s or {}
    results: list[DownloadResult] = []
    errors: list[tuple[str, str]] = []
    with requests.Session() as sess, ThreadPoolExecutor(max(1, workers)) as pool:
        futs = {
            pool.submit(
                download_file, n, u, out_dir, md5=md5s.get(n), session=sess, progress=progress
            ): n
            for n, u in sorted(links.items())
        }
        for fut in as_completed(futs):
            try:
                results.append(fut.result())
            except DownloadError as e:
                errors.append((futs[fut], str(e)))
            except OSError as e:
                errors.append((futs[fut], describe(e)))
    return sorted(results, key=lambda r: r.name), sorted(errors)
