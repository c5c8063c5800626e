"""The projector: vision-tower tokens → language-model embeddings (one row per image token).

    [B, patches, vision_width] ─► (pixel shuffle) ─► fc1 ─► GELU ─► fc2 ─► [B, tokens, lm_width]

``mlp2x_gelu`` is LLaVA-1.5's two-layer MLP, one output token per patch. ``pixel_shuffle``
(Idefics3 / nanoVLM) first folds each ``factor × factor`` square of neighbouring patches into one
token of ``factor²`` times the width, cutting the image tokens the LM attends over by ``factor²``,
then applies a single linear layer (``fc1``; as in those models).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROJECTORS = ("mlp2x_gelu", "pixel_shuffle")


def pixel_shuffle(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, h·w, C] patch tokens (row-major square grid) → [B, (h/f)·(w/f), C·f²].

    Each output token concatenates the channels of one ``factor × factor`` square of patches,
    in row-major order within the square.
    """
    if factor == 1:
        return tokens
    batch, count, width = tokens.shape
    side = math.isqrt(count)
    if side * side != count or side % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid whose side is a "
                         f"multiple of {factor}; got {count} tokens")
    grid = tokens.reshape(batch, side // factor, factor, side // factor, factor, width)
    grid = grid.permute(0, 1, 3, 2, 4, 5)  # [B, h/f, w/f, f, f, C]
    return grid.reshape(batch, (side // factor) ** 2, factor * factor * width)


class Projector(nn.Module):
    """Maps vision tokens to LM input embeddings; see the module docstring for the kinds."""

    def __init__(self, kind: str, vision_width: int, lm_width: int, *, factor: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector {kind!r} is not one of {', '.join(PROJECTORS)}")
        if kind == "mlp2x_gelu" and factor != 1:
            raise ValueError("the mlp2x_gelu projector keeps one token per patch "
                             "(pixel_shuffle = 1); use projector = 'pixel_shuffle' to merge")
        self.kind, self.factor = kind, factor
        in_width = vision_width * factor * factor
        self.fc1 = nn.Linear(in_width, lm_width, bias=bias)
        self.act = nn.GELU() if kind == "mlp2x_gelu" else None
        self.fc2 = nn.Linear(lm_width, lm_width, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.fc1(pixel_shuffle(tokens, self.factor))
        if self.fc2 is not None:
            x = self.fc2(self.act(x))
        return x
