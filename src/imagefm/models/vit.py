"""Vision transformer: patches → (class token) + positions → pre-LN blocks → norm → pooled vector.

Covers CLIP (class token, ln_pre, cls pooling, QuickGELU) and SigLIP (no class token, no ln_pre,
attention-pool "map" head, tanh-GELU) by configuration alone.

SigLIP 2 NaFlex (``config.naflex``) is the SigLIP tower fed differently: every image keeps its
aspect ratio and its own patch grid (h, w), so a batch arrives already cut into patches,
padded to a common length N::

    pixel_values [B, N, C*p*p] ─► Linear ─┐
    spatial_shapes [B, 2] ─► position grid resized to each (h, w) ─┴─► + ─► blocks ─► norm ─► head
    pixel_attention_mask [B, N] (1 = real patch) ─► masks keys in every block and in the head
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import VisionConfig
from imagefm.models.layers import (
    MLP,
    Attention,
    Transformer,
    init_transformer,
    interpolate_grid,
    make_attention_mask,
)


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP"): one learned probe attends over all tokens."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, norm_eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = Attention(width, heads)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``padding`` [B, N] (1 = real token) keeps the probe off padding tokens (NaFlex)."""
        mask = make_attention_mask(1, padding)
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), mask, context=tokens)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


def resize_positions(grid: torch.Tensor, spatial_shapes: torch.Tensor,
                     length: int) -> torch.Tensor:
    """NaFlex position embeddings [B, length, D] from a square grid [S, S, D].

    Each image gets the grid resized to its own patch grid (h, w) (bilinear with antialiasing,
    half-pixel centres, computed in float32, as SigLIP 2 in big_vision and transformers),
    flattened row by row; the padding positions after h*w repeat the first embedding (they are
    masked out; transformers fills them the same way).
    """
    source = grid.permute(2, 0, 1)[None].float()  # [1, D, S, S]
    resized: dict[tuple[int, int], torch.Tensor] = {}  # images of one shape share the work
    rows = []
    for h, w in spatial_shapes.tolist():
        if not (0 < h * w <= length):
            raise ValueError(f"spatial shape ({h}, {w}) does not fit {length} patches")
        if (h, w) not in resized:
            image = F.interpolate(source, size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=True)
            resized[h, w] = image[0].flatten(1).t()  # [h*w, D]
        positions = resized[h, w]
        rows.append(torch.cat([positions, positions[:1].expand(length - h * w, -1)]))
    return torch.stack(rows).to(grid.dtype)


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions from pixels to the patch grid, then a 1x1 to the width.

    log2(patch_size) stages, channels doubling up to ``width``; a drop-in for the patch embedding.
    """

    def __init__(self, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        channels = [in_channels] + [max(width >> (stages - i), 16) for i in range(1, stages + 1)]
        layers: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(channels[-1], width, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:  # the dtype/device probe VisionTransformer uses
        return self.layers[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        if c.naflex:  # the processor cuts the patches; each is flattened (row, column, channel)
            self.patch_embed = nn.Linear(c.in_channels * c.patch_size**2, c.width,
                                         bias=c.patch_bias)
        elif c.stem == "conv":
            self.patch_embed = ConvStem(c.in_channels, c.width, c.patch_size)
        else:
            self.patch_embed = nn.Conv2d(c.in_channels, c.width, c.patch_size, c.patch_size,
                                         bias=c.patch_bias)
        self.class_token = (nn.Parameter(torch.randn(c.width) * c.width**-0.5)
                            if c.class_token else None)
        self.pos_embed = nn.Parameter(torch.randn(c.num_positions, c.width) * 0.02)
        self.norm_pre = nn.LayerNorm(c.width, eps=c.norm_eps) if c.pre_norm else None
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.norm_eps)
        self.norm_post = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.head = (AttentionPoolHead(c.width, c.heads, c.mlp_dim, c.act, c.norm_eps)
                     if c.pool == "map" else None)
        init_transformer(self.transformer, c.width, c.layers)

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a patch grid, interpolated when it differs from training's."""
        if not self.config.class_token:
            return interpolate_grid(self.pos_embed, grid)
        patches = interpolate_grid(self.pos_embed[1:], grid)
        return torch.cat([self.pos_embed[:1], patches])

    def forward_tokens(self, pixel_values: torch.Tensor,
                       pixel_attention_mask: torch.Tensor | None = None,
                       spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: [B, (1 +) patches, width]."""
        return self.norm_post(self.hidden_states(
            pixel_values, pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes))

    def hidden_states(self, pixel_values: torch.Tensor, blocks: int | None = None, *,
                      pixel_attention_mask: torch.Tensor | None = None,
                      spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the first ``blocks`` blocks (all when None), before the final norm.

        A VLM reads its image features here: LLaVA takes the second-to-last block's output
        (HF ``hidden_states[-2]``) without the post-norm. ``pixel_attention_mask`` and
        ``spatial_shapes`` are a NaFlex tower's inputs (see the module docstring).
        """
        if self.config.naflex:
            x = self._embed_patches(pixel_values, spatial_shapes)
        else:
            if pixel_attention_mask is not None or spatial_shapes is not None:
                raise ValueError("this vision tower takes images [B, C, H, W]; "
                                 "pixel_attention_mask and spatial_shapes are for NaFlex towers")
            x = self._embed_image(pixel_values)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        mask = make_attention_mask(x.shape[1], pixel_attention_mask)
        return self.transformer(x, mask, blocks=blocks)

    def _embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embeddings(grid).to(x.dtype)

    def _embed_patches(self, patches: torch.Tensor,
                       spatial_shapes: torch.Tensor | None) -> torch.Tensor:
        if patches.dim() != 3 or spatial_shapes is None:
            raise ValueError("a NaFlex vision tower takes pixel_values [B, N, C*p*p] with "
                             "spatial_shapes [B, 2] (and pixel_attention_mask [B, N]), as its "
                             "processor gives them")
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        side = self.config.grid_size
        grid = self.pos_embed.reshape(side, side, -1)
        return x + resize_positions(grid, spatial_shapes, x.shape[1]).to(x.dtype)

    def pool(self, tokens: torch.Tensor,
             pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per image; ``pixel_attention_mask`` leaves padding patches out."""
        pool = self.config.pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "map":
            return self.head(tokens, pixel_attention_mask)
        patches = tokens[:, 1:] if self.config.class_token else tokens
        if pixel_attention_mask is None:
            return patches.mean(dim=1)
        weights = pixel_attention_mask.to(patches.dtype)[..., None]
        return (patches * weights).sum(dim=1) / weights.sum(dim=1)

    def forward(self, pixel_values: torch.Tensor,
                pixel_attention_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled image features [B, width] (before the dual encoder's projection)."""
        tokens = self.forward_tokens(pixel_values, pixel_attention_mask, spatial_shapes)
        return self.pool(tokens, pixel_attention_mask)
