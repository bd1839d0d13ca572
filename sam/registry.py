"""`sam_model_registry`: builders for every model, loading checkpoints safely."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    display_url,
    read_state_dict,
    recognise_official,
)
from .config import model_config, model_names, validate_config
from .model import Sam, build_sam_from_config

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TINY_CHECKPOINT = WEIGHTS_DIR / "sam_tiny.pth"


def bundled_checkpoint(name: str) -> Path | None:
    """The checkpoint shipped inside the package for `name`, if any."""
    return TINY_CHECKPOINT if name == "tiny" else None


def bundled_metadata(name: str) -> dict:
    path = bundled_checkpoint(name)
    if path is None or not path.with_suffix(".json").exists():
        return {}
    return json.loads(path.with_suffix(".json").read_text())


def build_sam(
    model: str | dict = "default",
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
) -> Sam:
    """Build a SAM model by registry name or config dict and load `checkpoint`.

    Called the reference's way, ``build_sam("sam_vit_h_4b8939.pth")`` (the reference's
    ``build_sam`` is ``build_sam_vit_h``), a path or URL as the first argument builds
    ``vit_h`` from that checkpoint, or the model an official checkpoint is.

    `checkpoint` is a local path or any fsspec URL (``s3://...``, ``https://...``); it is
    read with ``torch.load(weights_only=True)`` and must fit the architecture exactly.
    Without a checkpoint the bundled weights are used where the package ships them
    (``tiny``); other models are left randomly initialised, as the reference does.
    Nothing is ever downloaded implicitly.
    """
    official, looked_up = None, False  # recognising reads an official file's md5: once
    if checkpoint is None and _is_checkpoint_path(model):
        # an official file names its model; anything else is vit_h, as for the reference
        official, looked_up = recognise_official(os.fspath(model)), True  # type: ignore[arg-type]
        model, checkpoint = (official.model if official else "vit_h"), model  # type: ignore[assignment]
    cfg = model_config(model) if isinstance(model, str) else validate_config(model)
    if checkpoint is None:
        checkpoint = bundled_checkpoint(cfg["name"])
        if checkpoint is not None and not Path(checkpoint).exists():
            raise CheckpointError(
                f"checkpoint {checkpoint}: the bundled {cfg['name']} weights are missing from "
                "this installation"
            )
    sd = None
    if checkpoint is not None:  # read and checked before the model is built: fails fast
        url = os.fspath(checkpoint)
        if not looked_up:
            official = recognise_official(url)
        if official is not None and official.model != cfg["name"]:
            raise CheckpointError(
                f"checkpoint {display_url(url)}: is the official {official.filename} ({official.model}), "
                f"not a {cfg['name']} checkpoint; pass model type {official.model!r}"
            )
        sd = read_state_dict(url)
        check_state_dict(sd, cfg, url)
    net = build_sam_from_config(cfg)
    if sd is not None:
        net.load_state_dict(sd, strict=True)
        log.info("loaded %s weights from %s", cfg["name"], display_url(url))
    if device is not None:
        net = net.to(device)
    return net.eval()


def _is_checkpoint_path(model: object) -> bool:
    """Whether ``model`` is a checkpoint's path or URL rather than a model name."""
    if isinstance(model, os.PathLike):
        return True
    if not isinstance(model, str) or model in model_names():
        return False
    # a folder, a URL, a file name with a suffix, or an existing file
    return any(c in model for c in "/\\.") or os.path.isfile(model)


def _builder(name: str) -> Callable[..., Sam]:
    def build(checkpoint: str | os.PathLike | None = None, **kwargs) -> Sam:
        return build_sam(name, checkpoint, **kwargs)

    build.__name__ = build.__qualname__ = f"build_sam_{name}"
    build.__doc__ = f"Build SAM {name}; `checkpoint` is a path or fsspec URL."
    return build


build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_tiny = _builder("tiny")

sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "tiny": build_sam_tiny,
}

__all__ = [
    "CheckpointError",
    "bundled_checkpoint",
    "build_sam",
    "sam_model_registry",
]
