"""Rotary position embeddings of the decoder family (``imagefm.models.decoder``): inverse
frequencies with the config's scaling rule (linear, Llama 3.1), cos/sin tables in float32 in
the rotate-half layout Hugging Face uses, and M-RoPE's three position rows (Qwen2-VL).

Kept apart from the decoder so that the file of the blocks stays short; the Qwen2-VL vision tower
and the GGUF exporter read the same functions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imagefm.models.decoder_config import DecoderConfig


def rope_inverse_frequencies(config: DecoderConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] in float32, with the config's scaling rule."""
    dim = config.attn_head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        factor, old = config.rope_factor, config.rope_original_context
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, rotate-half layout ([f0..f(d/2-1), f0..f(d/2-1)]).

    The tables are float32 and not buffers: ``model.to(bfloat16)`` must not round the
    frequencies, and they are recomputed from the config rather than stored in checkpoints.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self._cos = self._sin = torch.empty(0, device="cpu")

    def _ensure(self, positions: int, device: torch.device) -> None:
        if self._cos.shape[0] >= positions and self._cos.device == device:
            return
        size = max(positions, 2 * self._cos.shape[0], 256)
        inv_freq = rope_inverse_frequencies(self.config).to(device)
        t = torch.arange(size, device=device, dtype=torch.float32)
        angles = torch.outer(t, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos, self._sin = angles.cos(), angles.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, L, 1, head_dim] for ``position_ids`` [B, L]. ``bound``, when known,
        exceeds every position (saves reading the largest one back from the device).

        M-RoPE (``config.mrope_section``) also takes ``position_ids`` [3, B, L]: frequency pair
        j rotates by the temporal, height or width position, whichever section j falls in."""
        self._ensure(bound if bound is not None else int(position_ids.max()) + 1,
                     position_ids.device)
        cos, sin = self._cos[position_ids], self._sin[position_ids]
        if position_ids.dim() == 3:
            sections = self.config.mrope_section
            if not sections:
                raise ValueError("position_ids [3, B, L] need a config with mrope_section")
            row = torch.repeat_interleave(torch.arange(3, device=cos.device),
                                          torch.tensor(sections, device=cos.device)).repeat(2)
            pick = row.expand(1, *cos.shape[1:])  # [1, B, L, head_dim]: the row per column
            cos, sin = cos.gather(0, pick)[0], sin.gather(0, pick)[0]
        return cos.unsqueeze(2).to(dtype), sin.unsqueeze(2).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, heads, head_dim] by position (cos/sin [B, L, 1, head_dim])."""
    return x * cos + rotate_half(x) * sin
