"""Small building blocks shared by the encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def storage_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when running under autocast without autograd, else None.

    In inference under autocast the decoder keeps its largest tensors (per-prompt image
    tokens, upscaled features) in this dtype: autocast alone would return LayerNorm's
    output in fp32 and cast it back for every product, moving each tensor three times."""
    if torch.is_grad_enabled():
        return None
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
    if not on:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(dev)
    return torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    keep_autocast_dtype: bool = True,
) -> torch.Tensor:
    """LayerNorm over the last axis; with ``keep_autocast_dtype``, under autocast in
    inference the result stays in the autocast dtype (the kernel still accumulates in
    fp32), see `storage_dtype`. Otherwise exactly ``F.layer_norm``."""
    dt = storage_dtype(x) if keep_autocast_dtype else None
    if dt is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(dt), x.shape[-1:], weight.to(dt), bias.to(dt), eps)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor. ``keep_autocast_dtype``: see
    `layer_norm` (the decoder's upscaling sets it; the encoder keeps fp32 outputs)."""

    def __init__(
        self, num_channels: int, eps: float = 1e-6, keep_autocast_dtype: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.keep_autocast_dtype = keep_autocast_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused layer_norm kernel over a channels-last view: same maths, one pass
        y = layer_norm(
            x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps, self.keep_autocast_dtype
        )
        return y.permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """Two linear layers with an activation between them (`lin1`, `lin2`)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (`layers.N`)."""

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, depth: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
