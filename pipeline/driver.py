"""The Ray driver of a generation run.

1. Plan the input (:mod:`pipeline.plan`) and check it, with model and settings, against
   the run manifest of the output: a first run records them, a rerun must match.
2. Skip every shard that has a commit marker (fresh listing), and hand the rest to one
   actor per GPU (or CPU slot), keeping at most ``max_inflight_per_actor`` shards queued
   on each.
3. A shard whose actor dies goes back to the queue, preferably to another actor, and the
   dead actor is replaced; a shard that fails ``max_attempts`` times is reported failed.
4. Progress bars over shards and images, then a summary (also written to
   ``_run/last_run.json``). :func:`run_generation` returns it; exit status 0 only when
   every shard of the plan is committed and no input shard was damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.actors import (
    ANNOTATION_ID_STRIDE,
    ShardTask,
    WorkerConfig,
    progress_actor_class,
    worker_actor_class,
)
from pipeline.io import describe, is_local, join, open_url, redact, scrub
from pipeline.manifest import (
    MANIFEST_VERSION,
    RUN_DIR,
    RunConflictError,
    check_compatible,
    committed_shards,
    load_manifest,
    run_markers,
    write_json,
    write_manifest,
)
from pipeline.plan import ShardPlan, ShardSpec, build_plan

__all__ = [
    "ConfigError",
    "GenerateConfig",
    "RunSummary",
    "WorkerStartError",
    "resolve_generator_settings",
    "run_generation",
]

log = logging.getLogger(__name__)

LAYOUTS = ("tar", "files")
# Environment passed on to workers so that they reach the same stores as the driver.
# Credentials are not among them: on a cluster they come from the instance profile.
FORWARDED_ENV_PREFIXES = ("FSSPEC_", "AWS_ENDPOINT_URL")
FORWARDED_ENV_NAMES = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CA_BUNDLE")


class ConfigError(ValueError):
    """A bad option value or combination (names the option)."""


class WorkerStartError(RuntimeError):
    """Workers could not start (bad checkpoint on the workers, no node fits the request)."""


@dataclass
class GenerateConfig:
    """Everything a generation run needs; ``sa1b-generate`` maps its flags onto this."""

    input: str
    output: str
    # model
    model: str = "tiny"  # registry name, or a JSON file (any fsspec URL) with a config dict
    checkpoint: str | None = None  # local path or fsspec URL; None: the bundled weights
    # generator
    preset: str = "default"
    generator: dict[str, Any] = field(default_factory=dict)  # overrides of AMG arguments
    batch_images: int = 1
    # plan
    input_kind: str = "auto"
    shard_size: int = 1000
    first_image_id: int = 1
    first_shard_id: int = 0
    # output
    layout: str = "tar"
    copy_images: bool = True
    index_counts: bool = False
    jpeg_quality: int = 95
    max_image_pixels: int = 100_000_000
    max_image_bytes: int = 256 << 20
    # cluster
    address: str | None = None  # None: RAY_ADDRESS, else an embedded local Ray
    num_actors: int | None = None  # None: one per GPU (or per cpus_per_actor CPUs)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    max_inflight_per_actor: int = 2
    max_attempts: int = 3
    read_threads: int = 4
    actor_start_timeout: float = 600.0
    worker_env: dict[str, str] = field(default_factory=dict)
    progress: bool = True


@dataclass
class RunSummary:
    output: str
    run_id: str
    state: str  # "complete", "incomplete" (some shards failed)
    shards_total: int
    shards_skipped: int  # committed before this run
    shards_done: int  # committed by this run
    shards_failed: int
    failed_shards: dict[str, str]
    retries: int
    actors_replaced: int
    images_ok: int  # over the whole output
    images_failed: int
    annotations: int
    run_images: int  # processed by this run
    run_annotations: int
    seconds: float
    processing_seconds: float  # from workers ready to the last shard
    workers: list[dict[str, Any]] = field(default_factory=list)
    finished_at: str = ""
    # SA-1B input shards found damaged (truncated, corrupt, unpaired members): their
    # readable images are committed, the error is in their marker
    input_errors: dict[str, str] = field(default_factory=dict)
    # images the generator failed on in every attempt at their shard (of images_failed)
    generator_errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.shards_failed == 0
            and self.state == "complete"
            and not self.input_errors
            and not self.generator_errors
        )

    @property
    def images_per_second(self) -> float:
        return self.run_images / self.processing_seconds if self.processing_seconds else 0.0

    @property
    def masks_per_second(self) -> float:
        return self.run_annotations / self.processing_seconds if self.processing_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = redact(self.output)
        d["images_per_second"] = round(self.images_per_second, 3)
        d["masks_per_second"] = round(self.masks_per_second, 3)
        return d

    def format(self) -> str:
        lines = [
            f"run {self.state}: {redact(self.output)}",
            f"  shards   {self.shards_skipped + self.shards_done}/{self.shards_total} committed "
            f"({self.shards_skipped} before this run, {self.shards_done} now, "
            f"{self.shards_failed} failed, {self.retries} retried)",
            f"  images   {self.images_ok} ok, {self.images_failed} failed (status and reason in "
            f"index/status); masks {self.annotations}",
            f"  this run {self.run_images} images, {self.run_annotations} masks in "
            f"{self.processing_seconds:.1f}s: {self.images_per_second:.2f} images/s, "
            f"{self.masks_per_second:.1f} masks/s (wall {self.seconds:.1f}s)",
        ]
        if self.actors_replaced:
            lines.append(f"  workers  {self.actors_replaced} replaced after dying")
        for name, reason in sorted(self.failed_shards.items()):
            lines.append(f"  FAILED   {name}: {reason}")
        for name, reason in sorted(self.input_errors.items()):
            lines.append(f"  DAMAGED  {name}: input {reason}; its readable images are committed")
        for name, n in sorted(self.generator_errors.items()):
            lines.append(
                f"  ERRORS   {name}: the generator failed on {n} image(s) in every attempt "
                f"(reasons in index/status); delete _commits/{name}.json and rerun to retry"
            )
        if self.images_ok:
            lines.append(
                f"  see      sa1b-decode stats {redact(self.output)} --picture stats.png "
                "(distributions), sa1b-decode show SHARD --id ID (masks over an image)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- settings


# generator options that postdate recorded runs, with the value those runs implied
LATER_OPTIONS = {"resize": "pil"}


def _generator_defaults() -> dict[str, Any]:
    from sam.amg import generator_defaults

    skip = {"point_grids", "output_mode", "batch_size", "max_upsample_pixels"}
    return {k: v for k, v in generator_defaults().items() if k not in skip}


def resolve_generator_settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every result-affecting AMG argument: defaults, then the preset, then overrides."""
    from sam.amg import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; known: {', '.join(PRESETS)}")
    defaults = _generator_defaults()
    perf_only = {"batch_size", "max_upsample_pixels"}
    unknown = sorted(set(overrides) - set(defaults) - perf_only)
    if unknown:
        raise ConfigError(f"unknown generator option(s): {', '.join(unknown)}")
    settings = {**defaults, **PRESETS[preset], **overrides}
    from sam.amg import check_generator_args

    try:  # here, before anything is recorded or any worker starts
        check_generator_args(settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"generator settings: {e}") from None
    # options added after runs were recorded: kept only when they differ from the
    # behaviour those runs had, so an earlier run's manifest still matches on resume
    for k, v in LATER_OPTIONS.items():
        if settings.get(k) == v:
            del settings[k]
    return settings


def _model_spec(cfg: GenerateConfig) -> tuple[str | dict, dict]:
    """``(what build_sam takes, full architecture config)``."""
    from sam.config import model_config, validate_config

    m = cfg.model
    if m.lower().endswith(".json"):
        try:
            with open_url(m) as f:
                d = json.loads(f.read())
            return d, validate_config(d)
        except FileNotFoundError:
            raise ConfigError(f"--model {redact(m)}: file not found") from None
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"--model {redact(m)}: not a valid model config ({e})") from None
    try:
        return m, model_config(m)
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]}") from None


def _checkpoint(cfg: GenerateConfig, arch: dict) -> tuple[str | None, str, str]:
    """``(checkpoint for workers, its description, sha256)``; checks it is usable."""
    from sam.checkpoint import CheckpointError, check_state_dict, file_digest, read_state_dict
    from sam.registry import bundled_checkpoint

    if cfg.checkpoint is None:
        b = bundled_checkpoint(arch["name"])
        if b is None:
            raise CheckpointError(
                f"model {arch['name']}: no bundled weights; pass --checkpoint (a local path or URL)"
            )
        if not Path(b).exists():
            raise CheckpointError(
                f"checkpoint {b.name}: the bundled {arch['name']} weights are missing from this "
                "installation"
            )
        return None, f"bundled:{b.name}", file_digest(str(b), "sha256")
    url = cfg.checkpoint
    try:
        digest = file_digest(url, "sha256")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {redact(url)}: file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {redact(url)}: unreadable ({describe(e)})"
        ) from None
    if "://" not in url or url.startswith("file://"):  # cheap to check here (memory-mapped)
        check_state_dict(read_state_dict(url), arch, url)
    return url, redact(url), digest


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, its commit."""
    out: dict[str, Any] = {}
    try:
        from importlib.metadata import version

        out["package"] = version("sa1b-engine")
    except Exception:
        import sam

        out["package"] = getattr(sam, "__version__", None)
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in ("sam", "pipeline", "schemas"):
        for f in sorted((root / pkg).glob("*.py")):
            h.update(f"{pkg}/{f.name}\n".encode())
            h.update(f.read_bytes())
    out["source_sha256"] = h.hexdigest()[:16]  # catches uncommitted edits too
    if (root / ".git").exists():
        with contextlib.suppress(Exception):
            head = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            out["git_commit"] = head + ("-dirty" if dirty else "")
    return out


def _absolute_if_local(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _location(url: str) -> str:
    """``url`` comparable with another: local paths absolute, no query, no trailing /."""
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://"))
    return redact(url).rstrip("/")


def _validate(cfg: GenerateConfig) -> None:
    if cfg.layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    for name in (
        "shard_size",
        "max_attempts",
        "max_inflight_per_actor",
        "batch_images",
        "read_threads",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.num_actors is not None and cfg.num_actors < 1:
        raise ConfigError("--num-actors must be at least 1")
    if cfg.gpus_per_actor is not None and cfg.gpus_per_actor < 0:
        raise ConfigError("--gpus-per-actor must be >= 0")
    if cfg.cpus_per_actor <= 0:
        raise ConfigError("--cpus-per-actor must be > 0")
    if not cfg.actor_start_timeout > 0:
        raise ConfigError("--actor-start-timeout must be > 0 seconds")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError("--jpeg-quality must be within 1..100")
    out, inp = _location(cfg.output), _location(cfg.input)
    if out == inp or out.startswith(inp.rstrip("/") + "/"):
        # the input listing is recursive: the job's own sa_<id>.jpg would become input
        raise ConfigError(f"OUTPUT {redact(cfg.output)} must not be INPUT or inside it")


def prepare_run(
    cfg: GenerateConfig, *, record: bool = True
) -> tuple[dict[str, Any], ShardPlan, WorkerConfig]:
    """Plan, manifest check/record and worker config; raises user errors before Ray starts.
    ``record=False`` checks against a recorded run but writes nothing (a dry run)."""
    # local paths made absolute here: Ray workers do not share the driver's working folder
    cfg.output = _absolute_if_local(cfg.output)
    cfg.input = _absolute_if_local(cfg.input)
    if cfg.checkpoint is not None:
        cfg.checkpoint = _absolute_if_local(cfg.checkpoint)
    _validate(cfg)
    settings = resolve_generator_settings(cfg.preset, cfg.generator)
    model_arg, arch = _model_spec(cfg)
    plan = build_plan(
        cfg.input,
        shard_size=cfg.shard_size,
        input_kind=cfg.input_kind,
        first_image_id=cfg.first_image_id,
        first_shard_id=cfg.first_shard_id,
    )
    ckpt, ckpt_desc, ckpt_sha = _checkpoint(cfg, arch)
    identity = {
        "model": {"name": arch["name"], "config": arch, "checkpoint_sha256": ckpt_sha},
        "generator": {"preset": cfg.preset, "settings": settings, "output_mode": "coco_rle"},
        "output": {
            "layout": cfg.layout,
            "copy_images": cfg.copy_images,
            "index_counts": cfg.index_counts,
            "jpeg_quality": cfg.jpeg_quality,
            "max_image_pixels": cfg.max_image_pixels,
            "max_image_bytes": cfg.max_image_bytes,
            "annotation_id": f"image_id * {ANNOTATION_ID_STRIDE} + index of the mask",
        },
        "plan": plan.summary(),
    }
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    run_id = hashlib.sha256(canon).hexdigest()[:16]
    manifest = {
        "version": MANIFEST_VERSION,
        "run_id": run_id,
        **identity,
        "checkpoint": ckpt_desc,
        "input": redact(cfg.input),
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shards": [s.name for s in plan.shards],
    }
    manifest["model"]["checkpoint"] = ckpt_desc
    try:
        recorded = load_manifest(cfg.output)
        if recorded is None and record:
            write_manifest(cfg.output, manifest, plan)
    except RunConflictError:
        raise
    except Exception as e:  # unreachable bucket, denied, read-only folder ...
        raise ConfigError(
            f"output {redact(cfg.output)}: cannot read or write ({describe(e)})"
        ) from None
    if recorded is None:
        if record:
            log.info("new run %s: %d shards recorded in %s", run_id, len(plan.shards), RUN_DIR)
    else:
        recorded_cmp = json.loads(json.dumps(recorded))
        recorded_cmp.get("model", {}).pop("checkpoint", None)  # where it lies may change
        new_cmp = json.loads(json.dumps(manifest))
        new_cmp["model"].pop("checkpoint", None)
        check_compatible(recorded_cmp, new_cmp, cfg.output)
        manifest = recorded
        log.info("resuming run %s in %s", recorded.get("run_id"), redact(cfg.output))
    wcfg = WorkerConfig(
        output=cfg.output,
        run_id=manifest["run_id"],
        model=model_arg,
        checkpoint=ckpt,
        checkpoint_sha256=ckpt_sha,
        generator=settings,
        layout=cfg.layout,
        copy_images=cfg.copy_images,
        index_counts=cfg.index_counts,
        jpeg_quality=cfg.jpeg_quality,
        max_image_pixels=cfg.max_image_pixels,
        max_image_bytes=cfg.max_image_bytes,
        read_threads=cfg.read_threads,
        batch_images=cfg.batch_images,
        torch_threads=max(1, int(cfg.cpus_per_actor)),
        input_folder=_local_input_folder(plan),
    )
    return manifest, plan, wcfg


def _local_input_folder(plan: ShardPlan) -> str | None:
    """The folder of the plan's first input when that is a local file (what a worker
    checks it can see), else ``None``."""
    for s in plan.shards:
        uri = s.source if s.source is not None else (s.items[0].uri if s.items else None)
        if uri is not None:
            local = is_local(uri)
            return os.path.dirname(os.path.abspath(uri.removeprefix("file://"))) if local else None
    return None


# ----------------------------------------------------------------------------- Ray


def worker_env(cfg: GenerateConfig) -> dict[str, str]:
    """Store settings of this process for the workers; never secrets (a runtime_env is
    visible in the dashboard): those come from the nodes' own credential chain."""
    env = {}
    for k, v in os.environ.items():
        if not (k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_NAMES):
            continue
        if _secret_name(k):
            continue
        if k.startswith("FSSPEC_"):
            # fsspec reads JSON in FSSPEC_<PROTOCOL> (the filesystem's options) and in
            # FSSPEC_<PROTOCOL>_<OPTION> (e.g. client_kwargs); an object there may carry
            # credentials ({"key": ..., "secret": ...}): forward the rest of it only
            try:
                value = json.loads(v)
            except ValueError:
                value = None
            if isinstance(value, dict):
                v = json.dumps(_without_secrets(value))
        env[k] = scrub(v)  # URL credentials anywhere in the value, JSON included
    env.update(cfg.worker_env)
    return env


# (not "SIGNATURE": s3fs's config_kwargs.signature_version is a setting; signed URLs
# lose their query string through scrub)
_SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "AUTH", "COOKIE")


def _secret_name(name: str) -> bool:
    return any(w in name.upper() for w in _SECRET_WORDS)


def _without_secrets(options: dict) -> dict:
    """``options`` (nested dicts) without the entries whose name looks like a secret."""
    return {
        k: _without_secrets(v) if isinstance(v, dict) else v
        for k, v in options.items()
        if not _secret_name(str(k))
    }


def _connect(cfg: GenerateConfig) -> bool:
    """Join the cluster (``--address`` / ``RAY_ADDRESS``) or start a local Ray; returns
    whether this call started the connection (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        where = f"Ray cluster at {redact(address)} (--address / RAY_ADDRESS)" if address else (
            "a local Ray"
        )
        raise ConfigError(f"cannot connect to {where}: {describe(e)}") from None
    return True


@dataclass
class _Slot:
    index: int
    handle: Any
    inflight: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    # a replacement actor until it has answered: (its info() call, when it was started)
    starting: tuple[Any, float] | None = None


class _Pool:
    """The worker actors; a dead one is replaced by a fresh one (bounded)."""

    def __init__(self, cfg: GenerateConfig, wcfg: WorkerConfig, n: int, gpus: float):
        self.cfg, self.wcfg, self.gpus = cfg, wcfg, gpus
        self.env = worker_env(cfg)
        self.tag = uuid.uuid4().hex[:6]
        self.replaced = 0
        self.max_replacements = max(4, 2 * n + cfg.max_attempts)
        self.slots = [_Slot(i, self._spawn(i)) for i in range(n)]

    def _spawn(self, i: int) -> Any:
        opts: dict[str, Any] = {
            "num_cpus": self.cfg.cpus_per_actor,
            "num_gpus": self.gpus,
            "name": f"sa1b-worker-{self.tag}-{i}-{self.replaced}",
        }
        if self.env:
            opts["runtime_env"] = {"env_vars": self.env}
        return (
            worker_actor_class()
            .options(**opts)
            .remote(self.wcfg, logging.getLogger().level or logging.INFO)
        )

    def wait_ready(self, slots: list[_Slot] | None = None) -> None:
        import ray

        slots = self.slots if slots is None else slots
        refs = {s.handle.info.remote(): s for s in slots}
        ready, pending = ray.wait(
            list(refs), num_returns=len(refs), timeout=self.cfg.actor_start_timeout
        )
        for r in ready:
            try:
                refs[r].info = ray.get(r)
            except ray.exceptions.RayError as e:
                raise WorkerStartError(f"a worker could not start: {_cause(e)}") from None
        if pending:
            res = ray.cluster_resources()
            raise WorkerStartError(
                f"{len(pending)} of {len(refs)} workers did not start within "
                f"{self.cfg.actor_start_timeout:.0f}s; each asks for {self.cfg.cpus_per_actor} CPU "
                f"and {self.gpus} GPU, the cluster has {res.get('CPU', 0)} CPU and "
                f"{res.get('GPU', 0)} GPU"
            )

    def replace(self, slot: _Slot) -> bool:
        import ray

        if self.replaced >= self.max_replacements:
            return False
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        self.replaced += 1
        slot.handle = self._spawn(slot.index)
        slot.info = {}
        slot.starting = (slot.handle.info.remote(), time.monotonic())
        return True

    def drop(self, slot: _Slot, why: str) -> None:
        """Give up on ``slot`` (its shards must be requeued by the caller)."""
        import ray

        log.warning("worker %d dropped: %s; %d left", slot.index, why, len(self.slots) - 1)
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        self.slots.remove(slot)

    def check_starting(self) -> list[tuple[_Slot, str]]:
        """Mark replacements that answered as ready; returns ``(slot, why)`` for those that
        failed or did not start within the start timeout (the caller drops them)."""
        import ray

        bad = []
        for slot in [s for s in self.slots if s.starting is not None]:
            ref, t0 = slot.starting
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    slot.info = ray.get(ref)
                    slot.starting = None
                except ray.exceptions.RayError as e:
                    bad.append((slot, f"its replacement could not start: {_cause(e)}"))
            elif time.monotonic() - t0 > self.cfg.actor_start_timeout:
                bad.append(
                    (slot, f"its replacement did not start within {self.cfg.actor_start_timeout:.0f}s")
                )
        return bad

    def shutdown(self) -> None:
        import ray

        for s in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(s.handle, no_restart=True)


def _cause(e: BaseException) -> str:
    """A one-line reason from a Ray error (the user's exception where there is one)."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return describe(cause).splitlines()[0]
    text = str(e).strip().splitlines()
    for line in reversed(text):  # the last line of a remote traceback names the error
        if line.strip():
            return scrub(line.strip())[:500]
    return type(e).__name__


def _default_actors(cfg: GenerateConfig) -> tuple[int, float]:
    import ray

    res = ray.cluster_resources()
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
        if not gpus and cfg.model != "tiny":
            log.warning(
                "the cluster has no GPU now, so %s runs on CPU-only actors; on a cluster "
                "whose GPU workers scale from zero pass --gpus-per-actor 1 --num-actors N "
                "and Ray launches them",
                cfg.model,
            )
    if cfg.num_actors is not None:
        n = cfg.num_actors
    elif gpus > 0:
        n = max(1, int(res.get("GPU", 0) // gpus))
    else:
        n = max(1, int(res.get("CPU", 1) // cfg.cpus_per_actor))
    return n, gpus


def _bars(cfg: GenerateConfig, shards: int, images: int | None):
    from tqdm import tqdm

    disable = not cfg.progress
    sb = tqdm(
        total=shards, desc="shards", unit="shard", position=0, disable=disable, dynamic_ncols=True
    )
    ib = tqdm(
        total=images, desc="images", unit="img", position=1, disable=disable, dynamic_ncols=True
    )
    return sb, ib


class _AttemptProgress:
    """The image bar and mask count, per shard attempt: an attempt that fails takes back
    what it showed, a committed one shows exactly its marker's counts, and late notes of a
    finished attempt are ignored; so the bar never passes its total on retries."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.masks = 0
        self.shown: dict[tuple[str, int], list[int]] = {}
        self.finished: set[tuple[str, int]] = set()

    def start(self, key: tuple[str, int]) -> None:
        """A submission: an attempt that never started is resubmitted under its number."""
        self.finished.discard(key)

    def add(self, key: tuple[str, int], images: int, masks: int) -> None:
        if key in self.finished:
            return
        c = self.shown.setdefault(key, [0, 0])
        c[0] += images
        c[1] += masks
        self.masks += masks
        self.bar.update(images)

    def _close(self, key: tuple[str, int], images: int, masks: int) -> None:
        self.finished.add(key)
        was_images, was_masks = self.shown.pop(key, (0, 0))
        self.masks += masks - was_masks
        if images != was_images:
            self.bar.update(images - was_images)

    def failed(self, key: tuple[str, int]) -> None:
        self._close(key, 0, 0)

    def committed(self, key: tuple[str, int], images: int, masks: int) -> None:
        self._close(key, images, masks)


def _forget_run(out: str) -> None:
    """Remove the manifest and plan this run recorded when its workers could not start
    (a wrong checkpoint, a cluster without the resources): nothing was committed, so the
    corrected command starts afresh instead of being refused as a different run."""
    from pipeline.io import remove
    from pipeline.manifest import manifest_url, plan_url

    if committed_shards(out):
        return
    with contextlib.suppress(Exception):
        remove(manifest_url(out))
        remove(plan_url(out))
        log.info("no worker started: the run recorded in %s is removed", redact(out))


def dry_run(cfg: GenerateConfig) -> dict[str, Any]:
    """What ``run_generation(cfg)`` would do, with every check it makes before Ray starts
    (input plan, settings, checkpoint, the output's recorded run); starts and writes
    nothing."""
    try:
        recorded = load_manifest(_absolute_if_local(cfg.output))
    except Exception:  # prepare_run reports an unreachable output
        recorded = None
    manifest, plan, _ = prepare_run(cfg, record=False)
    done = set(run_markers(cfg.output, manifest["run_id"])) if recorded is not None else set()
    planned = [s.name for s in plan.shards]
    return {
        "input": redact(cfg.input),
        "output": redact(cfg.output),
        "run": "resume" if recorded is not None else "new",
        "run_id": manifest["run_id"],
        "plan": plan.summary(),
        "shards_committed": sum(n in done for n in planned),
        "shards_to_do": sum(n not in done for n in planned),
        "model": manifest["model"]["name"],
        "checkpoint": manifest["model"]["checkpoint"],
        "checkpoint_sha256": manifest["model"]["checkpoint_sha256"],
        "generator": manifest["generator"],
    }


def format_dry_run(d: dict[str, Any]) -> str:
    p = d["plan"]
    images = "images counted when the shards are read" if p["num_images"] is None else (
        f"{p['num_images']} images"
    )
    lines = [
        "dry run: nothing started, nothing written",
        f"  input    {d['input']}: {p['kind']} plan, {p['num_shards']} shards, {images}",
        f"  output   {d['output']}: "
        + ("a new run" if d["run"] == "new" else f"resumes run {d['run_id']}")
        + f"; {d['shards_committed']} shards committed, {d['shards_to_do']} to do",
        f"  model    {d['model']} ({d['checkpoint']}, sha256 {str(d['checkpoint_sha256'])[:12]})",
        f"  settings preset {d['generator']['preset']}: "
        + ", ".join(f"{k}={v}" for k, v in sorted(d["generator"]["settings"].items())),
    ]
    return "\n".join(lines)


def run_generation(cfg: GenerateConfig) -> RunSummary:
    """Run (or resume) a generation job; see the module docstring."""
    t_start = time.perf_counter()
    try:
        new_run = load_manifest(_absolute_if_local(cfg.output)) is None
    except Exception:  # prepare_run reports an unreachable output
        new_run = False
    manifest, plan, wcfg = prepare_run(cfg)
    run_id = manifest["run_id"]
    # valid markers of this run only: a malformed one, or one of another run, is redone
    done_before = set(run_markers(cfg.output, run_id))
    todo = [s for s in plan.shards if s.name not in done_before]
    log.info(
        "%d shards planned, %d already committed, %d to do",
        len(plan.shards),
        len(plan.shards) - len(todo),
        len(todo),
    )
    failed: dict[str, str] = {}
    retries = 0
    replaced = 0
    run_images = run_annotations = 0
    workers: list[dict[str, Any]] = []
    t_ready = time.perf_counter()
    t_end = t_ready
    if todo:
        started_here = _connect(cfg)
        pool = None
        try:
            n, gpus = _default_actors(cfg)
            n = min(n, len(todo))
            log.info("starting %d workers (%s GPU, %s CPU each)", n, gpus, cfg.cpus_per_actor)
            pool = _Pool(cfg, wcfg, n, gpus)
            try:
                pool.wait_ready()
            except WorkerStartError:
                if new_run:
                    _forget_run(cfg.output)
                raise
            workers = [s.info for s in pool.slots]
            t_ready = time.perf_counter()
            out = _dispatch(cfg, plan, todo, pool)
            failed, retries, run_images, run_annotations = out
            replaced = pool.replaced
            t_end = time.perf_counter()
        finally:
            if pool is not None:
                pool.shutdown()
            if started_here:
                import ray

                ray.shutdown()
    markers = run_markers(cfg.output, run_id)
    planned = {s.name for s in plan.shards}
    committed = planned & set(markers)
    summary = RunSummary(
        output=cfg.output,
        run_id=run_id,
        state="complete" if committed == planned else "incomplete",
        shards_total=len(plan.shards),
        shards_skipped=len(planned & done_before),
        shards_done=len(committed - done_before),
        shards_failed=len(failed),
        failed_shards=failed,
        retries=retries,
        actors_replaced=replaced,
        images_ok=sum(int(markers[k].get("images_ok", 0)) for k in committed),
        images_failed=sum(int(markers[k].get("images_failed", 0)) for k in committed),
        annotations=sum(int(markers[k].get("annotations", 0)) for k in committed),
        run_images=run_images,
        run_annotations=run_annotations,
        seconds=time.perf_counter() - t_start,
        processing_seconds=max(0.0, t_end - t_ready),
        workers=workers,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        input_errors={
            k: str(markers[k]["input_error"]) for k in sorted(committed) if markers[k].get("input_error")
        },
        generator_errors={
            k: int(markers[k]["generator_errors"])
            for k in sorted(committed)
            if markers[k].get("generator_errors")
        },
    )
    with contextlib.suppress(Exception):  # informative only; markers are the truth
        write_json(join(cfg.output, RUN_DIR, "last_run.json"), summary.as_dict())
    return summary


def _committed_by(out: str, run_id: str, shards: list[str]) -> dict[str, dict[str, Any]]:
    """The markers of run ``run_id`` among ``shards`` (those committed), by name; none
    when the markers cannot be read (the shards are then redone, as before)."""
    try:
        return run_markers(out, run_id, set(shards))  # a shard without a marker is left out
    except Exception as e:
        log.warning("could not check for commit markers of %s: %s", ", ".join(shards), describe(e))
        return {}


def _dispatch(
    cfg: GenerateConfig, plan: ShardPlan, todo: list[ShardSpec], pool: _Pool
) -> tuple[dict[str, str], int, int, int]:
    """Keep every actor busy until each shard is committed or out of attempts."""
    import ray

    counter = progress_actor_class().remote()
    queue_: deque[ShardSpec] = deque(todo)
    attempts: dict[str, int] = {}
    last_actor: dict[str, int] = {}
    inflight: dict[Any, tuple[_Slot, ShardSpec, int]] = {}  # in submission order
    failed: dict[str, str] = {}
    retries = 0
    images = annotations = 0
    total_images = None if plan.kind == "sa1b" else sum(len(s.items) for s in todo)
    sbar, ibar = _bars(cfg, len(todo), total_images)
    t0 = time.perf_counter()
    started: set[tuple[str, int]] = set()
    order: dict[tuple[str, int], int] = {}
    shown = _AttemptProgress(ibar)

    def submit(slot: _Slot, shard: ShardSpec) -> None:
        attempts[shard.name] = attempts.get(shard.name, 0) + 1
        task = ShardTask(
            shard_id=shard.shard_id,
            name=shard.name,
            items=tuple((it.image_id, it.uri) for it in shard.items),
            source=shard.source,
            source_name=shard.source_name,
            attempt=attempts[shard.name],
            final=attempts[shard.name] >= cfg.max_attempts,
        )
        shown.start((shard.name, attempts[shard.name]))
        ref = slot.handle.process_shard.remote(task, counter)
        inflight[ref] = (slot, shard, attempts[shard.name])
        order[(shard.name, attempts[shard.name])] = len(order)
        slot.inflight += 1
        last_actor[shard.name] = slot.index

    def next_for(slot: _Slot) -> ShardSpec | None:
        for i, s in enumerate(queue_):  # a retried shard prefers another actor
            if last_actor.get(s.name) != slot.index or len(pool.slots) == 1:
                del queue_[i]
                return s
        return queue_.popleft() if queue_ else None

    def give_up_or_requeue(shard: ShardSpec, attempt: int, reason: str, counted: bool) -> None:
        nonlocal retries
        shown.failed((shard.name, attempt))
        if not counted:  # it never started: this attempt does not count
            attempts[shard.name] -= 1
        if attempts[shard.name] >= cfg.max_attempts:
            failed[shard.name] = f"{reason} (after {attempts[shard.name]} attempts)"
            log.error("%s failed: %s", shard.name, failed[shard.name])
            return
        retries += 1
        log.warning("%s attempt %d failed (%s); requeued", shard.name, attempt, reason)
        queue_.appendleft(shard)

    def take_progress() -> None:
        """Images and masks reported by the workers since the last call, and the
        attempts that started."""
        with contextlib.suppress(Exception):
            counts, keys = ray.get(counter.take.remote(), timeout=10)
            started.update(keys)
            for key, (di, dm) in counts.items():
                shown.add(tuple(key), di, dm)

    def record(shard: ShardSpec, attempt: int, marker: dict[str, Any]) -> None:
        """A committed shard: its counts and progress."""
        nonlocal images, annotations
        done = int(marker.get("images_ok", 0)) + int(marker.get("images_failed", 0))
        masks = int(marker.get("annotations", 0))
        images += done
        annotations += masks
        shown.committed((shard.name, attempt), done, masks)
        sbar.update(1)
        dt = max(1e-9, time.perf_counter() - t0)
        sbar.set_postfix_str(f"{images / dt:.2f} img/s, {annotations / dt:.1f} masks/s")
        ibar.set_postfix_str(f"{shown.masks} masks")

    def fail_remaining(reason: str) -> None:
        while queue_:
            s = queue_.popleft()
            failed[s.name] = reason
            log.error("%s failed: %s", s.name, reason)

    try:
        while queue_ or inflight:
            for slot, why in pool.check_starting():
                pool.drop(slot, why)  # nothing was submitted to it while it started
            if not pool.slots:
                fail_remaining("no worker left: they kept dying or could not be started")
                break
            for slot in pool.slots:
                if slot.starting is not None:
                    continue
                while slot.inflight < cfg.max_inflight_per_actor and queue_:
                    shard = next_for(slot)
                    if shard is None:
                        break
                    submit(slot, shard)
            if not inflight:
                if not queue_:
                    break
                time.sleep(1.0)  # every worker is a replacement still starting
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            take_progress()
            for ref in ready:
                slot, shard, attempt = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    marker = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    reason = f"worker died: {_cause(e)}"
                    # every shard queued on that actor is lost with it; the one it was
                    # running (it said so, or else the oldest) spends an attempt
                    lost = [(shard, attempt)] + [
                        (v[1], v[2]) for r, v in list(inflight.items()) if v[0] is slot
                    ]
                    for r in [r for r, v in inflight.items() if v[0] is slot]:
                        inflight.pop(r)
                    slot.inflight = 0
                    take_progress()
                    lost.sort(key=lambda sa: order[(sa[0].name, sa[1])])
                    running = [sa for sa in lost if (sa[0].name, sa[1]) in started] or lost[:1]
                    if pool.replace(slot):
                        log.warning(
                            "worker %d died while on %s; replaced", slot.index, running[0][0].name
                        )
                    else:
                        pool.drop(slot, f"it died while on {running[0][0].name}, and workers "
                                  f"were replaced {pool.replaced} times already")  # fmt: skip
                    # a shard may have committed just before its worker died: redoing it
                    # would rewrite a committed shard file by file
                    committed = _committed_by(cfg.output, pool.wcfg.run_id, [s2.name for s2, _ in lost])
                    for s2, a2 in lost:
                        if s2.name in committed:
                            record(s2, a2, committed[s2.name])
                        else:
                            give_up_or_requeue(s2, a2, reason, (s2, a2) in running)
                    continue
                except ray.exceptions.RayError as e:
                    give_up_or_requeue(shard, attempt, _cause(e), True)
                    continue
                record(shard, attempt, marker)
    finally:
        sbar.close()
        ibar.close()
        with contextlib.suppress(Exception):
            ray.kill(counter)
    if failed:
        for name, reason in failed.items():
            log.error("shard %s failed: %s", name, reason)
    return failed, retries, images, annotations
