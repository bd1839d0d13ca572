"""Build the reference `segment-anything` model (the test oracle) from our configs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

segment_anything = pytest.importorskip(
    "segment_anything", reason="the reference segment-anything package is a test dependency"
)
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def build_reference_sam(cfg: dict, state_dict: dict | None = None) -> Sam:
    """The reference `Sam` with the architecture described by `cfg` (see `sam.model_config`)."""
    img, patch, dim = cfg["image_size"], cfg["patch_size"], cfg["prompt_embed_dim"]
    emb = img // patch
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["encoder_depth"],
            embed_dim=cfg["encoder_embed_dim"],
            img_size=img,
            mlp_ratio=cfg["encoder_mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg["encoder_num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg["encoder_global_attn_indexes"],
            window_size=cfg["encoder_window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(emb, emb),
            input_image_size=(img, img),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    model.eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model
