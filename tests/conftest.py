from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_dir(sub: str) -> Path:
    """A folder of ../shared, or skip the test when it is absent (a user's clone)."""
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path.name}/ of the shared data folder is not beside the repo (only CI has it)")
    return path


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 protocol server (moto) on 127.0.0.1 for the whole session."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// tests")
    server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


SMALL_CONFIG = {
    "name": "small",
    "image_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 64,
    "encoder_depth": 3,
    "encoder_num_heads": 2,
    "encoder_mlp_ratio": 4.0,
    "encoder_window_size": 6,  # 16x16 grid, not a multiple of 6: exercises window padding
    "encoder_global_attn_indexes": [1],
    "prompt_embed_dim": 64,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 128,
    "decoder_num_heads": 2,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 64,
}


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for every parameter, including those the model initialises
    to zero (relative and absolute positions), so parity covers them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            if k.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm4.weight")) or (
                "norm" in k and k.endswith("weight")
            ):
                sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
            elif "positional_encoding_gaussian_matrix" in k:
                sd[k] = torch.randn(v.shape, generator=g)
            else:
                fan_in = v[0].numel() if v.dim() > 1 else 1
                std = 0.02 if v.dim() == 1 else (1.0 / fan_in) ** 0.5
                sd[k] = std * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v.clone()
    return sd
