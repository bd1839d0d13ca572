"""Run manifest, per-shard commit markers and run status.

Output layout of a generation run::

    OUT/_run/manifest.json           model, checkpoint sha256, generator settings, code
                                     version, output options, plan summary (written once)
    OUT/_run/plan.parquet            the shard plan (shard_id, image_id, uri)
    OUT/_run/last_run.json           summary of the latest driver run
    OUT/sa_000000.tar                SA-1B shard (layout "tar"), or
    OUT/sa_000000/sa_<id>.{jpg,json} loose per-image files (layout "files")
    OUT/index/images/sa_000000.parquet, OUT/index/annotations/sa_000000.parquet
    OUT/index/status/sa_000000.parquet   per-image status (ok / missing / corrupt / ...)
    OUT/_commits/sa_000000.json      commit marker, written LAST

A shard is done exactly when its marker exists. Everything before the marker is written
at its final name (a redone shard overwrites its own partial files); the marker is one
atomic write (a single PUT on S3, temp file + ``os.replace`` locally). Listings bypass
fsspec's listing cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.io import (
    basename,
    exists,
    is_client_error,
    join,
    list_dir,
    open_url,
    redact,
    write_bytes,
)

__all__ = [
    "MANIFEST_VERSION",
    "RunConflictError",
    "RunStatus",
    "check_compatible",
    "committed_shards",
    "format_status",
    "http_status",
    "is_transient",
    "load_manifest",
    "marker_url",
    "read_markers",
    "run_markers",
    "retry_io",
    "run_status",
    "write_json",
    "write_manifest",
    "write_marker",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST_VERSION = 1
RUN_DIR = "_run"
COMMITS_DIR = "_commits"
# Manifest sections that must be equal for a rerun to resume the same output.
IDENTITY_KEYS = ("model", "generator", "output", "plan")


class RunConflictError(ValueError):
    """The output belongs to a run with another plan, model or settings."""


# ----------------------------------------------------------------------------- retries


def http_status(e: BaseException) -> int | None:
    """The HTTP status of a failed request (aiohttp's ``ClientResponseError``), else None."""
    status = getattr(e, "status", None)
    return status if isinstance(status, int) and 100 <= status < 600 else None


def is_transient(e: BaseException) -> bool:
    """Whether an I/O error is worth retrying (network, throttling, 5xx), not a user error."""
    if isinstance(e, FileNotFoundError):
        # fsspec's HTTP filesystem reports any failed request for a file's size (refused
        # connection, 503, 403) as not found, with the real error as the cause
        cause = e.__cause__
        return cause is not None and not isinstance(cause, FileNotFoundError) and is_transient(cause)
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = http_status(e)
    if status is not None and status < 500:
        return status in (408, 425, 429)  # timeout, too early, too many requests
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    if is_client_error(e):
        return True
    return isinstance(e, OSError)


def retry_io(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 20.0,
) -> T:
    """``fn()``, retried with exponential backoff and jitter on transient I/O errors."""
    for n in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if n == attempts or not is_transient(e):
                raise
            delay = min(max_delay, base_delay * 2 ** (n - 1)) * (0.5 + random.random())
            log.warning(
                "%s: %s (attempt %d/%d), retrying in %.1fs",
                redact(what),
                type(e).__name__,
                n,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_json(url: str, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    retry_io(lambda: write_bytes(url, data), what=url)


def _read_json(url: str) -> Any:
    def read() -> Any:
        with open_url(url) as f:
            return json.loads(f.read())

    return retry_io(read, what=url)


# ----------------------------------------------------------------------------- manifest


def manifest_url(out: str) -> str:
    return join(out, RUN_DIR, "manifest.json")


def plan_url(out: str) -> str:
    return join(out, RUN_DIR, "plan.parquet")


def load_manifest(out: str) -> dict[str, Any] | None:
    """The run manifest of ``out``, or ``None`` when no run has started there."""
    url = manifest_url(out)
    if not retry_io(lambda: exists(url), what=url):
        return None
    try:
        manifest = _read_json(url)
    except ValueError as e:
        raise RunConflictError(
            f"output {redact(out)}: {RUN_DIR}/manifest.json is not valid JSON ({e})"
        ) from None
    if not isinstance(manifest, dict):
        raise RunConflictError(f"output {redact(out)}: {RUN_DIR}/manifest.json is not a JSON object")
    return manifest


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: recorded {old!r}, now {new!r}"]


def check_compatible(recorded: Mapping[str, Any], new: Mapping[str, Any], out: str) -> None:
    """Raise :class:`RunConflictError` when ``new`` would not resume ``recorded``."""
    if recorded.get("version") != MANIFEST_VERSION:
        raise RunConflictError(
            f"output {redact(out)}: manifest version {recorded.get('version')!r} is not "
            f"{MANIFEST_VERSION}; use a new output"
        )
    diffs = []
    for key in IDENTITY_KEYS:
        diffs += _diff(recorded.get(key), new.get(key), key)
    if diffs:
        shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
        raise RunConflictError(
            f"output {redact(out)} holds a run with a different plan, model or settings:\n  "
            f"{shown}\nRerun with the recorded input and options to resume, or use a new output."
        )
    old_code = recorded.get("code_version", {})
    new_code = new.get("code_version", {})
    if old_code != new_code:
        log.warning(
            "code version differs from the one that started this output (recorded %s, now %s)",
            old_code,
            new_code,
        )


def write_manifest(out: str, manifest: Mapping[str, Any], plan: Any | None = None) -> None:
    """Write the plan (if given) and then the manifest (the run's existence marker)."""
    if plan is not None:
        url = plan_url(out)
        retry_io(lambda: plan.save(url), what=url)
    write_json(manifest_url(out), dict(manifest))


# ----------------------------------------------------------------------------- markers


def marker_url(out: str, shard: str) -> str:
    return join(out, COMMITS_DIR, f"{shard}.json")


def write_marker(out: str, shard: str, marker: Mapping[str, Any]) -> None:
    """Commit ``shard``: call only after every other file of the shard is written."""
    write_json(marker_url(out, shard), dict(marker))


def committed_shards(out: str) -> set[str]:
    """Names (``sa_000000``) of the shards with a commit marker, from a fresh listing."""
    url = join(out, COMMITS_DIR)
    entries = retry_io(lambda: list_dir(url), what=url)
    names = set()
    for e in entries:
        b = basename(e)
        if b.endswith(".json") and not b.startswith("."):
            names.add(b[: -len(".json")])
    return names


INDEX_TABLES = ("images", "annotations", "status")


def read_index(out: str, table: str = "annotations", **kwargs: Any) -> Any:
    """One index table of a generation output as a pandas DataFrame, from the parts of
    committed shards only (a failed or killed attempt may have left parts of a shard
    it never committed, which ``pd.read_parquet(out + "/index/<table>")`` would read).
    ``kwargs`` go to ``pyarrow.parquet.read_table`` (``columns``, ``filters``)."""
    import pyarrow.parquet as pq

    from pipeline.io import url_to_fs

    if table not in INDEX_TABLES:
        raise ValueError(f"table must be one of {', '.join(INDEX_TABLES)}, got {table!r}")
    manifest = load_manifest(out)
    if manifest is None:  # a typo must not look like an empty result
        raise FileNotFoundError(f"{redact(out)}: no generation run here (no {RUN_DIR}/manifest.json)")
    shards = sorted(run_markers(out, manifest.get("run_id")))
    fs, root = url_to_fs(join(out, "index", table))
    paths = [f"{root.rstrip('/')}/{s}.parquet" for s in shards]
    if not paths:
        from pipeline.actors import STATUS_SCHEMA
        from schemas import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA

        schemas = {"images": IMAGES_SCHEMA, "annotations": ANNOTATIONS_SCHEMA, "status": STATUS_SCHEMA}
        return schemas[table].empty_table().to_pandas()
    return pq.read_table(paths, filesystem=fs, **kwargs).to_pandas()


def read_markers(out: str, shards: set[str] | None = None, threads: int = 16) -> dict[str, dict]:
    """The commit markers of ``out`` by shard name (read concurrently). A marker that is
    not a JSON object naming its shard (truncated, edited by hand) is left out with a
    warning: its shard counts as not committed and a rerun makes it again."""
    names = sorted(committed_shards(out) if shards is None else shards)
    if not names:
        return {}

    def read(name: str) -> tuple[str, dict | None]:
        url = marker_url(out, name)
        try:
            m = _read_json(url)
        except FileNotFoundError:
            return name, None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            log.warning("%s: not a commit marker (%s); the shard counts as not committed", redact(url), e)
            return name, None
        if not isinstance(m, dict) or m.get("shard", name) != name:
            log.warning("%s: not a commit marker of %s; the shard counts as not committed", redact(url), name)
            return name, None
        return name, m

    with ThreadPoolExecutor(min(threads, len(names))) as pool:
        return {n: m for n, m in pool.map(read, names) if m is not None}


def run_markers(out: str, run_id: str, shards: set[str] | None = None) -> dict[str, dict]:
    """The valid commit markers of run ``run_id`` in ``out`` (of ``shards`` only, when
    given): what is committed for that run. Markers of another run (left by a run whose
    ``_run`` folder was removed) are left out with a warning, so their shards are made
    again, not taken for this run's."""
    markers = read_markers(out, shards)
    foreign = sorted(k for k, m in markers.items() if m.get("run_id") != run_id)
    if foreign:
        log.warning(
            "%s: %d commit markers belong to another run than %s (first: %s); their shards "
            "count as not committed",
            redact(out), len(foreign), run_id, foreign[0],
        )  # fmt: skip
    return {k: m for k, m in markers.items() if m.get("run_id") == run_id}


# ----------------------------------------------------------------------------- status


@dataclass
class RunStatus:
    output: str
    started: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    shards_total: int = 0
    shards_committed: int = 0
    images_planned: int | None = None
    images_ok: int = 0
    images_failed: int = 0
    annotations: int = 0
    failures_by_status: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    input_errors: dict[str, str] = field(default_factory=dict)
    last_run: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.started and self.shards_committed == self.shards_total

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": redact(self.output),
            "started": self.started,
            "complete": self.complete,
            "shards_total": self.shards_total,
            "shards_committed": self.shards_committed,
            "images_planned": self.images_planned,
            "images_ok": self.images_ok,
            "images_failed": self.images_failed,
            "annotations": self.annotations,
            "failures_by_status": self.failures_by_status,
            "pending": self.pending,
            "input_errors": self.input_errors,
            "last_run": self.last_run,
        }


def run_status(out: str) -> RunStatus:
    """Progress of the run in ``out`` from its manifest and commit markers."""
    manifest = load_manifest(out)
    if manifest is None:
        return RunStatus(out, started=False)
    plan = manifest.get("plan", {})
    shard_names = manifest.get("shards") or []
    st = RunStatus(
        out,
        started=True,
        manifest=manifest,
        shards_total=int(plan.get("num_shards", len(shard_names))),
        images_planned=plan.get("num_images"),
    )
    markers = run_markers(out, manifest.get("run_id"))
    st.shards_committed = len(markers)
    for name, m in markers.items():
        st.images_ok += int(m.get("images_ok", 0))
        st.images_failed += int(m.get("images_failed", 0))
        st.annotations += int(m.get("annotations", 0))
        for f in m.get("failures", []):
            s = f.get("status", "error")
            st.failures_by_status[s] = st.failures_by_status.get(s, 0) + 1
        if m.get("input_error"):
            st.input_errors[name] = m["input_error"]
    st.pending = [n for n in shard_names if n not in markers]
    with contextlib.suppress(FileNotFoundError, ValueError):
        url = join(out, RUN_DIR, "last_run.json")
        if exists(url):
            st.last_run = _read_json(url)
    return st


def format_status(st: RunStatus) -> str:
    if not st.started:
        return (
            f"{redact(st.output)}: no generation run has started here (no {RUN_DIR}/manifest.json)"
        )
    m = st.manifest
    model = m.get("model", {})
    lines = [
        f"output      {redact(st.output)}",
        f"model       {model.get('name')} (checkpoint sha256 {str(model.get('checkpoint_sha256'))[:12]})",
        f"preset      {m.get('generator', {}).get('preset')}",
        f"shards      {st.shards_committed}/{st.shards_total} committed"
        + (" (complete)" if st.complete else ""),
    ]
    planned = f"/{st.images_planned}" if st.images_planned is not None else ""
    lines.append(
        f"images      {st.images_ok + st.images_failed}{planned} done: {st.images_ok} ok, "
        f"{st.images_failed} failed"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(st.failures_by_status.items())) + ")"
            if st.failures_by_status
            else ""
        )
    )
    lines.append(f"masks       {st.annotations}")
    if st.pending:
        shown = ", ".join(st.pending[:8]) + (" ..." if len(st.pending) > 8 else "")
        lines.append(f"pending     {len(st.pending)}: {shown}")
    for name, err in sorted(st.input_errors.items()):
        lines.append(f"input error {name}: {err}")
    lr = st.last_run
    if lr:
        state = lr.get("state", "?")
        lines.append(
            f"last run    {state}, {lr.get('shards_done', 0)} shards committed, "
            f"{len(lr.get('failed_shards', {}))} failed, finished {lr.get('finished_at', '?')}"
        )
        for name, reason in sorted(lr.get("failed_shards", {}).items()):
            lines.append(f"  failed    {name}: {reason}")
    return "\n".join(lines)
