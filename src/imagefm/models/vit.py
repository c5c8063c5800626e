"""Vision transformer: patches → (class token) + positions → pre-LN blocks → norm → pooled vector.

Covers CLIP (class token, ln_pre, cls pooling, QuickGELU) and SigLIP (no class token, no ln_pre,
attention-pool "map" head, tanh-GELU) by configuration alone.
"""

from __future__ import annotations

import torch
from torch import nn

from imagefm.config import VisionConfig
from imagefm.models.layers import MLP, Attention, Transformer, init_transformer, interpolate_grid


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP"): one learned probe attends over all tokens."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, norm_eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = Attention(width, heads)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), context=tokens)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


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
        if c.stem == "conv":
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

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: [B, (1 +) patches, width]."""
        return self.norm_post(self.hidden_states(pixel_values))

    def hidden_states(self, pixel_values: torch.Tensor, blocks: int | None = None
                      ) -> torch.Tensor:
        """Tokens after the first ``blocks`` blocks (all when None), before the final norm.

        A VLM reads its image features here: LLaVA takes the second-to-last block's output
        (HF ``hidden_states[-2]``) without the post-norm.
        """
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embeddings(grid).to(x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return self.transformer(x, blocks=blocks)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = self.config.pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "map":
            return self.head(tokens)
        patches = tokens[:, 1:] if self.config.class_token else tokens
        return patches.mean(dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image features [B, width] (before the dual encoder's projection)."""
        return self.pool(self.forward_tokens(pixel_values))
