"""Loading checkpoints safely: official SAM files, the bundled tiny model, any fsspec URL."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the requested model (names the file)."""


def display_url(url: str | os.PathLike) -> str:
    """`url` safe to print: no user:password@ and no query string (signed URLs)."""
    text = os.fspath(url)
    if "://" not in text:
        return text
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(text)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class OfficialCheckpoint:
    model: str
    filename: str
    size: int
    md5: str


# Meta's released SAM checkpoints (plain fp32 state dicts). The file names carry the md5 prefix.
OFFICIAL_CHECKPOINTS = (
    OfficialCheckpoint("vit_h", "sam_vit_h_4b8939.pth", 2564550879, "4b8939a88964f0f4ff5f5b2642c598a6"),
    OfficialCheckpoint("vit_l", "sam_vit_l_0b3195.pth", 1249524607, "0b3195507c641ddb6910d2bb5adee89c"),
    OfficialCheckpoint("vit_b", "sam_vit_b_01ec64.pth", 375042383, "01ec64d29a2fca3f0661936605ae66f8"),
)
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/segment_anything/{filename}"


def file_digest(url: str, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a local file or fsspec URL, streamed."""
    import fsspec

    h = hashlib.new(algorithm)
    with fsspec.open(url, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _size(url: str) -> int | None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {display_url(url)}: file not found") from None
    except Exception:  # some filesystems cannot tell the size cheaply
        return None


def recognise_official(url: str) -> OfficialCheckpoint | None:
    """The official checkpoint this file is, by size and md5; None for other files.

    A file with an official size whose md5 differs is refused as corrupt."""
    size = _size(url)
    candidates = [c for c in OFFICIAL_CHECKPOINTS if c.size == size]
    if not candidates:
        return None
    digest = file_digest(url, "md5")
    for c in candidates:
        if c.md5 == digest:
            return c
    name = os.path.basename(str(url))
    known = next((c for c in OFFICIAL_CHECKPOINTS if c.filename == name), None)
    if known is not None:
        raise CheckpointError(
            f"checkpoint {display_url(url)}: has the size of the official {known.filename} but its md5 is "
            f"{digest}, expected {known.md5}; the download is corrupt, fetch it again"
        )
    return None


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Read a state dict with `torch.load(weights_only=True)` from a path or fsspec URL."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    url = os.fspath(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError(url)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {display_url(url)}: file not found") from None
    except Exception as e:  # unknown protocol, missing fsspec backend, storage refusing access
        why = str(e).replace(url, display_url(url)) or "no details"
        raise CheckpointError(
            f"checkpoint {display_url(url)}: cannot open: {type(e).__name__}: {why}"
        ) from None
    try:
        if isinstance(fs, LocalFileSystem):
            try:  # memory-map: a 2.5 GB checkpoint is not held twice in RAM
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with fs.open(path, "rb") as f:
                obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {display_url(url)}: not a readable PyTorch state dict (truncated download or a "
            f"different kind of file?): {reason}"
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict) and not torch.is_tensor(obj[wrapper]):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {display_url(url)}: expected a state dict (a mapping of parameter names to "
            f"tensors), found {type(obj).__name__}"
        )
    return obj


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from .model import build_sam_from_config

    with torch.device("meta"):
        model = build_sam_from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """A short description of the architecture a state dict holds."""
    w = sd.get("image_encoder.patch_embed.proj.weight")
    blocks = {k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")}
    if w is None:
        return "not a SAM state dict (no image_encoder.patch_embed)"
    pos = sd.get("image_encoder.pos_embed")
    size = f", input {pos.shape[1] * w.shape[-1]} px" if pos is not None and pos.dim() == 4 else ""
    return f"encoder embed dim {w.shape[0]}, {len(blocks)} blocks{size}"


def identify(sd: dict[str, torch.Tensor]) -> str | None:
    """The registry name whose architecture matches this state dict exactly, if any."""
    from .config import _CONFIGS, model_config

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for name in _CONFIGS:
        if _expected_shapes(model_config(name)) == shapes:
            return name
    return None


def check_state_dict(sd: dict[str, torch.Tensor], cfg: dict, url: str) -> None:
    """Refuse, with one clear message, a state dict that does not fit `cfg` exactly."""
    expected = _expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got == expected:
        return
    want = cfg.get("name", "the requested model")
    actual = identify(sd)
    if actual is not None:
        raise CheckpointError(
            f"checkpoint {display_url(url)}: holds the weights of {actual} ({describe_state_dict(sd)}), "
            f"not {want}; pass model type {actual!r} or the {want} checkpoint"
        )
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: {got[k]} vs {expected[k]})")
    raise CheckpointError(
        f"checkpoint {display_url(url)}: does not fit {want} ({describe_state_dict(sd)}): " + "; ".join(parts)
    )
