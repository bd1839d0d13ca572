"""ViT image encoder: windowed and global attention with decomposed relative positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeedForward, LayerNorm2d


def _relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """Gather the (size, size, C) table of embeddings for offsets q - k.

    The learned table holds one row per offset in [-(size-1), size-1]; a table
    learned for another size is resampled linearly first.
    """
    rows = 2 * size - 1
    if table.shape[0] != rows:
        table = F.interpolate(
            table.t().unsqueeze(0), size=rows, mode="linear", align_corners=False
        )[0].t()
    idx = torch.arange(size, device=table.device)
    offsets = idx[:, None] - idx[None, :] + (size - 1)
    return table[offsets]


class WindowAttention(nn.Module):
    """Multi-head self attention over a (B, H, W, C) grid with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        nh, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(b, h * w, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, nh, hw, hd)
        # Decomposed relative position: bias[qy, qx, ky, kx] = q . Rh[qy, ky] + q . Rw[qx, kx]
        rh = _relative_table(h, self.rel_pos_h)
        rw = _relative_table(w, self.rel_pos_w)
        qg = q.reshape(b, nh, h, w, hd)
        # einsum may return permuted views; the broadcast sum follows its inputs' layout,
        # so make them contiguous and the (hw x hw) bias is built in place, with no copy
        bias_h = torch.einsum("bnyxc,ykc->bnyxk", qg, rh).contiguous()
        bias_w = torch.einsum("bnyxc,xkc->bnyxk", qg, rw).contiguous()
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).view(b, nh, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: int
    ) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention(dim, num_heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window > 0:
            b, h, w, c = y.shape
            ws = self.window
            ph, pw = (-h) % ws, (-w) % ws
            if ph or pw:
                y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws, ws, c)
            y = self.attn(y)
            y = y.view(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
            y = y[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B, H, W, C


class ImageEncoderViT(nn.Module):
    """Plain ViT backbone plus a convolutional neck, as in SAM."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] | list[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                0 if i in set(global_attn_indexes) else window_size,
                grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
