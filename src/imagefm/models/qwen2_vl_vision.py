"""The Qwen2-VL / Qwen2.5-VL vision tower: native-resolution patches, 2-D rotary attention, a 2x2
patch merger.

    pixel_values [N, C*T*P*P] ─► patch_embed ─► blocks × [x + attn(norm1(x)), x + mlp(norm2(x))]
                                                         attn: q/k/v ─► 2-D rotary ─► SDPA within
                                                               each image (attend_segments)
                                 ─► merger: norm ─► each 2x2 group of patches as one row ─► MLP
                                 ─► [N / 4, out_width] image tokens for the language model

An image of any size is cut into 14x14 patches (the processor resizes it to a multiple of 28 and
lays its patches out in this order); ``grid_thw`` [images, 3] says how many temporal, height and
width patches each image has. An image is two identical frames, so every patch spans
``temporal_patch_size`` = 2 frames: the reference's Conv3d with a kernel equal to its stride is one
matrix product per patch, which is what ``patch_embed`` is here (a ``Linear`` over the flattened
C, T, P, P values, in the Conv3d weight's order).

Positions: no learned table. Each patch's (row, column) rotates half of every attention head's
dimensions by its row and the other half by its column (rotate-half layout, float32), so a tower
sees any grid. The processor orders patches 2x2-block by 2x2-block, so the merger only reshapes
four consecutive rows into one. Attention is full within an image and absent across images:
``attend_segments`` attends within each run of consecutive rows given by a list of lengths (a
block-diagonal attention without an N x N mask: a large image has ~16k patches), the one primitive
for images, frames and windows.

Qwen2.5-VL (config as data: ``norm``, ``gated_mlp``, ``window_size``, ``full_attention_layers``):
RMSNorm instead of LayerNorm, a gated SiLU MLP, and window attention. For windows the patches
are reordered so that each window of ``window_size`` pixels (in 2x2 groups, so the merger still
sees whole groups) is contiguous; most blocks then attend within a window (the same
``attend_segments`` over window lengths), the ``full_attention_layers`` within the whole frame, and
the merged tokens are put back in the original order at the end.

Numerics follow transformers' ``Qwen2VisionTransformerPretrainedModel`` and
``Qwen2_5_VisionTransformerPretrainedModel`` (tests/test_qwen2_vl.py, tests/test_qwen2_5_vl.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import ACTIVATIONS, ConfigError, check_choice, from_dict
from imagefm.models.decoder import RMSNorm
from imagefm.models.layers import MLP, activation
from imagefm.models.rotary import rotate_half

VISION_MODEL_TYPES = ("qwen2_vl_vision", "qwen2_5_vl_vision")  # the HF tower to export to
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class QwenVisionConfig:
    """A Qwen2-VL / Qwen2.5-VL vision tower. ``out_width`` is the language model's width (the
    merger's output);
    ``mlp_dim`` is ``width * mlp_ratio`` of the reference config (Qwen2.5-VL: its
    ``intermediate_size``). ``window_size`` (pixels, 0 = none) turns on window attention in every
    block but ``full_attention_layers``."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    act: str = "quick_gelu"
    norm_eps: float = 1e-6
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    merge_size: int = 2
    out_width: int = 3584
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm (Qwen2-VL) | rmsnorm (Qwen2.5-VL), blocks and merger
    gated_mlp: bool = False  # Qwen2.5-VL: down(act(gate(x)) * up(x)), all with biases
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    model_type: str = "qwen2_vl_vision"

    def __post_init__(self) -> None:
        check_choice("vision.model_type", self.model_type, VISION_MODEL_TYPES)
        check_choice("vision.act", self.act, ACTIVATIONS)
        check_choice("vision.norm", self.norm, NORMS)
        object.__setattr__(self, "full_attention_layers",
                           tuple(int(i) for i in self.full_attention_layers))
        if any(not 0 <= i < self.layers for i in self.full_attention_layers):
            raise ConfigError(f"vision.full_attention_layers {list(self.full_attention_layers)} "
                              f"must be block indices below {self.layers}")
        for name in ("width", "layers", "heads", "mlp_dim", "patch_size", "temporal_patch_size",
                     "in_channels", "merge_size", "out_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vision.{name} must be > 0, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("vision.norm_eps and vision.rope_theta must be > 0")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ConfigError(f"vision.width ({self.width}) / vision.heads ({self.heads}) must be "
                              f"a multiple of 4: the 2-D rotary rotates pairs in two halves")
        unit = self.patch_size * self.merge_size
        if self.window_size < 0 or self.window_size % unit:
            raise ConfigError(f"vision.window_size ({self.window_size}) must be 0 or a multiple "
                              f"of patch_size * merge_size = {unit} pixels")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of ``pixel_values``: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenVisionConfig:
        return from_dict(cls, dict(data), "vision")


# --- positions and segments ----------------------------------------------------------------------

def check_grid(grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int, int]]:
    """``grid_thw`` [images, 3] as a list of (t, h, w), refusing grids the merger cannot group."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3], got {tuple(grid_thw.shape)}")
    grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    for t, h, w in grids:
        if t < 1 or h % merge_size or w % merge_size or h < 1 or w < 1:
            raise ValueError(f"image grid {(t, h, w)}: height and width must be positive "
                             f"multiples of {merge_size} patches (use the model's processor)")
    return grids  # type: ignore[return-value]


def patch_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, column) of every patch [N, 2], in the processor's order: image by image, frame by
    frame, 2x2 block by block (row-major over blocks, and within each block)."""
    out = []
    for t, h, w in check_grid(grid_thw, merge_size):
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    lengths: list[int]) -> torch.Tensor:
    """Attention [heads, N, head_dim] of every row to the rows of its own segment only, the
    segments being consecutive runs of ``lengths`` rows (a block-diagonal mask, never built).
    Consecutive segments of equal length (the windows along a row of an image) run as one
    batched SDPA call; memory grows with the sum of the squared lengths, not N²."""
    out, start = [], 0
    for length, run in itertools.groupby(lengths):
        count = len(list(run))
        span = slice(start, start + count * length)
        qs, ks, vs = (t[:, span].unflatten(1, (count, length)).transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).flatten(1, 2))
        start += count * length
    return torch.cat(out, dim=1)


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per attention segment: each frame of each image attends within itself."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def window_order(grid_thw: torch.Tensor, merge_size: int, window: int
                 ) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the order of the merged groups (of merge_size² patches) that makes
    each window of ``window`` x ``window`` groups contiguous (frame by frame, windows row-major,
    groups row-major within a window; windows at the right and bottom edges may be smaller),
    and each window's length in patches."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // merge_size, w // merge_size
        groups = torch.arange(t * h * w).reshape(t, h, w) + offset
        for frame in groups:
            for top in range(0, h, window):
                for left in range(0, w, window):
                    ids = frame[top:top + window, left:left + window].flatten()
                    order.append(ids)
                    lengths.append(len(ids) * merge_size**2)
        offset += t * h * w
    return torch.cat(order).to(grid_thw.device), lengths


def _norm(config: QwenVisionConfig, width: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(width, config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps)


class VisionRotary(nn.Module):
    """cos/sin [N, head_dim] of the 2-D rotary: the first half of the frequencies by row, the
    second by column, repeated for the rotate-half layout. Computed in float32, never stored."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.half = config.head_dim // 2
        self.theta = config.rope_theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.half, 2, dtype=torch.float32,
                                 device=positions.device) / self.half
        inv_freq = 1.0 / (self.theta ** exponents)
        angles = positions[..., None].float() * inv_freq  # [N, 2, head_dim / 4]
        angles = angles.flatten(1)  # rows' angles, then columns'
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


# --- layers --------------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    """Multi-head self-attention with the 2-D rotary on q and k; q/k/v/o named as elsewhere
    (the reference's fused ``qkv`` is split by the converter)."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        width = config.width
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # The rotation in float32 (as the reference), then back to the weights' dtype.
        cos, sin = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = attend_segments(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with biases (Qwen2.5-VL's vision MLP)."""

    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config, config.width)
        self.attn = VisionAttention(config)
        self.norm2 = _norm(config, config.width)
        mlp = GatedMLP if config.gated_mlp else MLP
        self.mlp = mlp(config.width, config.mlp_dim, config.act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm, then each ``merge_size``² consecutive patches as one row, then a two-layer GELU MLP
    to the language model's width."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.group = config.width * config.merge_size**2
        self.norm = _norm(config, config.width)
        self.fc1 = nn.Linear(self.group, self.group)
        self.fc2 = nn.Linear(self.group, config.out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.group)
        return self.fc2(F.gelu(self.fc1(x)))


class QwenVisionTower(nn.Module):
    """``tower(pixel_values, grid_thw)`` -> image tokens [sum(t*h*w) / merge², out_width]."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.width, bias=False)
        self.rotary = VisionRotary(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.layers))
        self.merger = PatchMerger(config)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        config = self.config
        positions = patch_positions(grid_thw, config.merge_size)
        if pixel_values.dim() != 2 or pixel_values.shape != (len(positions), config.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; image_grid_thw "
                             f"describes {len(positions)} patches of {config.patch_dim} values "
                             f"(build both with the model's processor)")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        cos, sin = self.rotary(positions)
        full = windows = frame_lengths(grid_thw)
        order = None
        if config.window_size:  # Qwen2.5-VL: make each window's patches contiguous
            groups = config.window_size // (config.patch_size * config.merge_size)
            order, windows = window_order(grid_thw, config.merge_size, groups)
            x, cos, sin = (self._regroup(t, order) for t in (x, cos, sin))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            lengths = full if index in config.full_attention_layers else windows
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, lengths,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, lengths)
        tokens = self.merger(x)
        return tokens if order is None else tokens[torch.argsort(order)]

    def _regroup(self, rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Rows [N, D] reordered by merged group (merge_size² consecutive rows move together)."""
        unit = self.config.merge_size**2
        return rows.reshape(-1, unit, rows.shape[-1])[order].reshape(rows.shape)
