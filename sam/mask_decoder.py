"""Two-way transformer mask decoder with an IoU prediction head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, FeedForward, LayerNorm2d, layer_norm, storage_dtype


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched product in the lower of the two dtypes (as autocast would)."""
    if a.dtype != b.dtype:
        low = a.dtype if a.element_size() < b.element_size() else b.dtype
        a, b = a.to(low), b.to(low)
    return torch.bmm(a, b)


def _add_bmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inplace: bool = False):
    """``acc + a @ b``, fused when the dtypes agree or, in inference under autocast,
    when ``acc`` is in the autocast dtype (see `storage_dtype`); otherwise the sum is
    promoted, as ``acc + attention`` is in the direct evaluation under autocast."""
    if acc.dtype == storage_dtype(acc):  # inference under autocast: see storage_dtype
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    if acc.dtype == a.dtype == b.dtype:
        return acc.baddbmm_(a, b) if inplace else torch.baddbmm(acc, a, b)
    return acc + _bmm(a, b)


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of the internal width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over projected q, k, v of shape (B or 1, N, internal_dim).

        An input with batch 1 is broadcast: the image side shared by many prompts is
        projected once instead of once per prompt."""
        qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
        b = max(qh.shape[0], kh.shape[0], vh.shape[0])
        qh, kh, vh = (t.expand(b, -1, -1, -1) if t.shape[0] != b else t for t in (qh, kh, vh))
        out = F.scaled_dot_product_attention(qh, kh, vh)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    # Few prompt tokens (T) meet many image tokens (N) in the decoder. Projecting the N
    # image tokens of every prompt costs N*C*D per projection; moving the projection to
    # the token side (associativity) costs N*C*H*T instead, less whenever H*T < D. The
    # two methods below are the same functions as forward(), evaluated in that order.

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """forward(q, k, v) for tokens q (B, T, C) attending image tokens k, v (B, N, C)."""
        b, t, c = q.shape
        h, dh = self.num_heads, self.internal_dim // self.num_heads
        qh = self._heads(self.q_proj(q)) * dh**-0.5  # (B, H, T, dh)
        # q . (W_k x + b_k) = (W_k^T q) . x + q . b_k; the last term is the same for every
        # image token, and softmax ignores it
        qw = (qh @ self.k_proj.weight.view(h, dh, c)).reshape(b, h * t, c)
        probs = _bmm(qw, k.transpose(1, 2)).softmax(-1)  # (B, H*T, N)
        # softmax rows sum to 1: P (W_v x + b_v) = W_v (P x) + b_v
        px = _bmm(probs, v).view(b, h, t, c)
        wv = self.v_proj.weight.view(h, dh, c).transpose(1, 2)  # (H, C, dh)
        out = px @ wv + self.v_proj.bias.view(h, 1, dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.internal_dim))

    def image_to_tokens(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward(q, k, v) (plus ``residual``) for image tokens q (1 or B, N, C) attending
        tokens k, v (B, T, C). Without autograd a per-prompt ``residual`` is updated in place.

        With a shared image (batch 1) its projection is computed once; otherwise the
        query projection moves to the token side. The output projection always does."""
        b, t, c = k.shape
        n = q.shape[1]
        h, dh = self.num_heads, self.internal_dim // self.num_heads
        kh = self._heads(self.k_proj(k)) * dh**-0.5  # (B, H, T, dh)
        vh = self._heads(self.v_proj(v))  # (B, H, T, dh)
        # scores laid out (B, H, T, N): the softmax over T then runs along contiguous rows
        if q.shape[0] == 1:
            qh = self._heads(self.q_proj(q))[0]  # (H, N, dh), once for all prompts
            scores = _bmm(kh.transpose(0, 1).reshape(h, b * t, dh), qh.transpose(1, 2))
            scores = scores.view(h, b, t, n).transpose(0, 1)
        else:
            # (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
            kw = (kh @ self.q_proj.weight.view(h, dh, c)).reshape(b, h * t, c)
            bias = (kh @ self.q_proj.bias.view(h, dh, 1)).reshape(b, h * t, 1)
            scores = _add_bmm(bias, kw, q.transpose(1, 2)).view(b, h, t, n)
        probs = scores.softmax(2).reshape(b, h * t, n).transpose(1, 2)  # (B, N, H*T)
        wo = self.out_proj.weight.view(c, h, dh).permute(1, 2, 0)  # (H, dh, C)
        # each token's value through the output projection; every head's probabilities
        # sum to 1 over the tokens, so the output bias is spread as b / H over the heads
        z = (vh @ wo + self.out_proj.bias / h).reshape(b, h * t, c)
        if residual is None:
            return _bmm(probs, z)
        if residual.shape[0] == b and residual.is_contiguous() and not torch.is_grad_enabled():
            # inference: accumulate into the per-prompt image tokens (the caller replaces them)
            return _add_bmm(residual, probs, z, inplace=True)
        return _add_bmm(residual.expand(b, n, c), probs, z)

    def cheaper_on_token_side(self, n_tokens: int) -> bool:
        return self.num_heads * n_tokens < self.internal_dim

    def token_to_image(self, q, k, v, token_side: bool) -> torch.Tensor:
        """forward(q, k, v) for tokens attending image tokens, on the token side when
        allowed and cheaper; a shared image (batch 1) is instead projected once and
        broadcast over the prompts."""
        if token_side and k.shape[0] > 1 and self.cheaper_on_token_side(q.shape[1]):
            return self.tokens_to_image(q, k, v)
        return self(q, k, v)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, token MLP, image->token."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = FeedForward(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe
        self.token_side = True  # see Attention.tokens_to_image

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        attn = self.cross_attn_token_to_image.token_to_image(q, k, keys, self.token_side)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        # In the first block `keys` may still be one image shared by every prompt (batch 1);
        # the attention broadcasts it and the sum below gives each prompt its own copy.
        i2t = self.cross_attn_image_to_token
        if self.token_side and i2t.cheaper_on_token_side(q.shape[1]):
            keys = i2t.image_to_tokens(k, q, queries, residual=keys)
        else:
            keys = keys + i2t(k, q, queries)
        n4 = self.norm4
        return queries, layer_norm(keys, n4.weight, n4.bias, n4.eps)


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self._token_side = True

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (Bi, C, H, W) with Bi = 1 or B; point_embedding (B, N, C).

        Returns the updated tokens (B, N, C) and image tokens (B, HW, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        dt = storage_dtype(keys)
        if dt is not None:  # inference under autocast: image tokens in its dtype
            keys, key_pe = keys.to(dt), key_pe.to(dt)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        attn = self.final_attn_token_to_image.token_to_image(q, k, keys, self.token_side)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys

    @property
    def token_side(self) -> bool:
        """Whether the cross-attentions project on the token side where that is cheaper
        (the default; exact up to float rounding). Set False for the direct evaluation."""
        return self._token_side

    @token_side.setter
    def token_side(self, value: bool) -> None:
        self._token_side = bool(value)
        for layer in self.layers:
            layer.token_side = bool(value)


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4, keep_autocast_dtype=True),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, 3 or 1, 4h, 4w) and predicted IoUs (B, 3 or 1).

        `image_embeddings` has batch 1 (one image for every prompt) or batch B."""
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, sl
        )
        return masks, iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_slice: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask logits (or only those of `mask_slice`: the others are not computed)
        and the IoU predictions of every mask token."""
        tokens_out, src = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        wanted = list(range(self.num_mask_tokens)[mask_slice or slice(None)])
        masks = self.upscale_masks(src, tokens_out, wanted)
        return masks, self.predict_iou(tokens_out)

    def predict_iou(self, tokens_out: torch.Tensor) -> torch.Tensor:
        """The IoU head on the IoU token, in fp32 also under autocast: a tiny MLP whose
        scores bf16 would round to steps of 1/256, moving the IoU threshold and tying
        NMS ranks."""
        dtype = next(self.iou_prediction_head.parameters()).dtype  # fp32 (or a float64 model's)
        with torch.autocast(tokens_out.device.type, enabled=False):
            return self.iou_prediction_head(tokens_out[:, 0].to(dtype))

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: output tokens (B, T, C) (IoU token first, then the mask
        tokens) and image tokens (B, C, h, w). IoU predictions need only the tokens, so a
        caller can filter before paying for the mask upscaling."""
        b = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], 1)

        dense = dense_prompt_embeddings
        if image_embeddings.shape[0] == 1 and dense.shape[0] > 1 and dense.stride(0) == 0:
            # "no mask" embedding broadcast over the batch: the image side is the same for
            # every prompt, keep it at batch 1 so the first block projects it once.
            dense = dense[:1]
        elif image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or {b}"
            )
        src = image_embeddings + dense
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        # a view: callers often upscale only a few of the prompts (see upscale_masks)
        return hs, src.transpose(1, 2).unflatten(2, (h, w))

    def upscale_masks(
        self, src: torch.Tensor, tokens_out: torch.Tensor, wanted: list[int]
    ) -> torch.Tensor:
        """Mask logits (B, len(wanted), 4h, 4w) of the mask tokens `wanted`."""
        b = src.shape[0]
        upscaled = self.output_upscaling(src.contiguous())
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in wanted], dim=1
        )
        _, c2, h2, w2 = upscaled.shape
        return (hyper_in @ upscaled.view(b, c2, h2 * w2)).view(b, len(wanted), h2, w2)
