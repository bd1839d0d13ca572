"""Architecture parameters of every model in the registry.

`model_config(name)` returns a plain dict so tests and tools can build the same
network elsewhere (for example with the reference package's classes).
"""

from __future__ import annotations

import copy

_COMMON = {
    "image_size": 1024,
    "patch_size": 16,
    "encoder_mlp_ratio": 4.0,
    "encoder_window_size": 14,
    "prompt_embed_dim": 256,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}

_CONFIGS: dict[str, dict] = {
    "vit_h": {
        **_COMMON,
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
    },
    "vit_l": {
        **_COMMON,
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_b": {
        **_COMMON,
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": [2, 5, 8, 11],
    },
    # Small enough that the automatic mask generator runs in seconds on a 2-core CPU.
    "tiny": {
        **_COMMON,
        "image_size": 512,
        "patch_size": 16,
        "encoder_embed_dim": 128,
        "encoder_depth": 6,
        "encoder_num_heads": 4,
        "encoder_window_size": 8,
        "encoder_global_attn_indexes": [2, 5],
        "prompt_embed_dim": 128,
        "decoder_mlp_dim": 512,
        "decoder_num_heads": 4,
        "iou_head_hidden_dim": 128,
    },
}

ALIASES = {"default": "vit_h"}

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def model_names() -> list[str]:
    return ["default", *_CONFIGS]


def model_config(name: str) -> dict:
    """Every architecture parameter of model `name` (``vit_h``, ``vit_l``, ``vit_b``,
    ``tiny`` or ``default``)."""
    key = ALIASES.get(name, name)
    if key not in _CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    cfg = copy.deepcopy(_CONFIGS[key])
    cfg["name"] = key
    return cfg


def validate_config(cfg: dict) -> dict:
    """Check a custom configuration; returns it with defaults filled in."""
    out = {**_COMMON, **cfg}
    required = [
        "encoder_embed_dim",
        "encoder_depth",
        "encoder_num_heads",
        "encoder_global_attn_indexes",
    ]
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    if out["image_size"] % out["patch_size"]:
        raise ValueError("image_size must be a multiple of patch_size")
    if out["encoder_embed_dim"] % out["encoder_num_heads"]:
        raise ValueError("encoder_embed_dim must be divisible by encoder_num_heads")
    if out["prompt_embed_dim"] % 8 or out["prompt_embed_dim"] % out["decoder_num_heads"]:
        raise ValueError("prompt_embed_dim must be divisible by 8 and by decoder_num_heads")
    if any(i >= out["encoder_depth"] for i in out["encoder_global_attn_indexes"]):
        raise ValueError("encoder_global_attn_indexes must be below encoder_depth")
    out.setdefault("name", "custom")
    return out
