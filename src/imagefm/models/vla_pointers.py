"""Language-conditioned pointing for the VLA: where are the gripper, the instruction's object and
the instruction's zone?

    pixels (+ x, y coordinate channels) ─► 4 convs (stride 2) ─► features F [B, C, h, w]
    queries q_k [B, 3, C]: a learned one for the gripper; the object's and the zone's from the
                            decoder's reading of the instruction (learned constants when blind)
    heat_k = softmax over cells of <q_k, F> / sqrt(C) ─► position p_k = Σ heat_k · cell centre
                                                      ─► content c_k = Σ heat_k · F
    pointer token k = W_c c_k + W_p p_k + kind_k
    relation = MLP(p_obj - p_grip, p_zone - p_obj, c_grip), added to <act> and to each action
               token's embedding (every action dimension reads it without attention)

A dot product of a query with the cell features scores colour and shape additively, so a query
built from "red" and "triangle" can select a red triangle although that pair never appeared in
training. Acting is then easy: the expert's move is the rounded difference of two positions,
which the relation MLP receives directly (an MLP on the true positions predicts the expert's move
bins at 93 %). The positions can be supervised with the simulator's state
(``pointer_loss``: cross-entropy of each heat map against a small Gaussian around the true
position), a dense signal that locates things far faster than the action loss alone.

Layer: models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POINTERS = ("gripper", "object", "zone")
# Differences of positions are scaled so that one move bin (0.06 of the table) is ~0.5.
RELATION_SCALE = 8.0


def _grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Cell centres in table units (0-1, x right, y down): [h * w, 2]."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return torch.stack([xs.repeat(height), ys.repeat_interleave(width)], dim=-1)


class PointerHead(nn.Module):
    """See the module docstring. ``forward(pixel_values, text_queries)`` → tokens, relation,
    scores (heat-map logits [B, 3, h*w]) and positions [B, 3, 2]."""

    def __init__(self, in_channels: int, channels: int, width: int) -> None:
        super().__init__()
        self.channels = channels
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + 2, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1))
        self.gripper_query = nn.Parameter(torch.randn(channels) * 0.5)
        self.blind_queries = nn.Parameter(torch.randn(2, channels) * 0.5)
        self.text_query = nn.Linear(width, channels)  # decoder state at a query slot → query
        self.slots = nn.Parameter(torch.randn(2, width) * 0.02)  # object / zone query slots
        self.content = nn.Linear(channels, width)
        self.where = nn.Linear(2, width)
        self.kind = nn.Parameter(torch.randn(len(POINTERS), width) * 0.02)
        self.relation = nn.Sequential(nn.Linear(4 + channels, width), nn.GELU(),
                                      nn.Linear(width, width))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        grid = _grid(height, width, pixel_values.device).T.reshape(1, 2, height, width)
        coords = grid.expand(batch, -1, -1, -1).to(pixel_values.dtype) * 2 - 1
        return self.convs(torch.cat([pixel_values, coords], dim=1))

    def forward(self, pixel_values: torch.Tensor, text_queries: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
        """``text_queries`` [B, 2, width]: the decoder's states at the object and zone query
        slots (None for the language-blind control: learned constants instead)."""
        maps = self.features(pixel_values)  # [B, C, h, w]
        batch = maps.shape[0]
        cells = maps.flatten(2).transpose(1, 2)  # [B, h*w, C]
        grip = self.gripper_query.expand(batch, 1, -1)
        other = (self.text_query(text_queries) if text_queries is not None
                 else self.blind_queries.expand(batch, -1, -1))
        queries = torch.cat([grip, other.to(cells.dtype)], dim=1)  # [B, 3, C]
        scores = queries @ cells.transpose(1, 2) / math.sqrt(self.channels)  # [B, 3, h*w]
        heat = scores.float().softmax(-1).to(cells.dtype)
        grid = _grid(*maps.shape[-2:], maps.device).to(cells.dtype)
        positions = heat @ grid  # [B, 3, 2]
        content = heat @ cells  # [B, 3, C]
        tokens = self.content(content) + self.where(positions * 2 - 1) + self.kind
        gripper, obj, zone = positions.unbind(1)
        relation = torch.cat([(obj - gripper) * RELATION_SCALE,
                              (zone - obj) * RELATION_SCALE, content[:, 0]], dim=-1)
        return {"tokens": tokens, "relation": self.relation(relation)[:, None],
                "scores": scores, "positions": positions,
                "grid": torch.tensor(maps.shape[-2:])}


def pointer_loss(scores: torch.Tensor, grid_shape: tuple[int, int], targets: torch.Tensor,
                 sigma: float = 0.6) -> torch.Tensor:
    """Cross-entropy of heat-map logits ``scores`` [B, K, h*w] against a Gaussian (``sigma``
    cells) around each true position ``targets`` [B, K, 2] (table units), normalised over the
    cells: minimal when the heat map puts its mass where the simulator says the thing is."""
    height, width = grid_shape
    grid = _grid(height, width, scores.device)  # [h*w, 2]
    cell = torch.tensor([1.0 / width, 1.0 / height], device=scores.device)
    offset = (grid[None, None] - targets[:, :, None].float()) / cell  # [B, K, h*w, 2] in cells
    target = torch.softmax(-(offset**2).sum(-1) / (2 * sigma**2), dim=-1)
    return -(target * scores.float().log_softmax(-1)).sum(-1).mean()
