"""Point cloud–text dual encoder (ULIP / OpenShape style) with a Point-BERT-style point tower.

    points [B, N, 3 or 6] ─► FPS centres ─► kNN groups ─► mini-PointNet tokens ─► transformer
                               ─► [cls ‖ max] ─► point_proj ─┐
    tokens ─► text tower (ours / BERT; may be locked) ─► text_proj ─┼─► normalise ─► logits
    frozen image-tower features of a rendering ─► image_proj ──────┘   (ULIP's third side)

The point tower: ``num_groups`` centres by farthest point sampling, each with its
``group_size`` nearest neighbours; a small shared MLP with max pooling (PointNet) turns each
neighbourhood, in coordinates relative to its centre, into one token; an MLP of the centre's
coordinates is the token's position embedding; a pre-LN transformer mixes the tokens; the output
is the class token concatenated with the max over tokens (as Point-BERT's classification head).

``PointTextModel`` follows the contract of dual encoders of other modalities: ``media_key =
"points"``, ``forward(points, input_ids, attention_mask)`` returns a ``DualEncoderOutput`` whose
``image_embeds`` are the point embeddings, so ``ContrastiveTask``, the CLIP/SigLIP losses and
the Trainer work unchanged. ULIP's point ↔ image term uses ``render_embeds`` (see
``imagefm.train.points.PointTripletTask``, ``task.name=ulip``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import (
    ACTIVATIONS,
    TEXT_CONFIGS,
    BertConfig,
    ConfigError,
    TextConfig,
    _check_positive,
    check_choice,
    from_dict,
    tower_config,
)
from imagefm.models.dual_encoder import DualEncoderOutput, TextContrastive, _projection
from imagefm.models.layers import Transformer, activation, init_transformer

POINT_PROJECTIONS = ("linear", "linear_bias", "none", "mlp")


@dataclass(frozen=True)
class PointEncoderConfig:
    """A Point-BERT-style patch transformer over ``in_channels`` per point (xyz or xyz+rgb)."""

    model_type: str = "point_bert"
    in_channels: int = 6  # 3: xyz; 6: xyz + rgb in [0, 1]
    num_points: int = 1024  # points a data source samples per shape (the tower takes any N)
    num_groups: int = 64  # patch centres (farthest point sampling)
    group_size: int = 32  # neighbours per patch (kNN)
    width: int = 192
    layers: int = 6
    heads: int = 6
    mlp_dim: int = 768
    act: str = "gelu"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_choice("point.model_type", self.model_type, ("point_bert",))
        check_choice("point.act", self.act, ACTIVATIONS)
        if self.in_channels not in (3, 6):
            raise ConfigError(f"point.in_channels = {self.in_channels!r} is not one of 3 (xyz), "
                              f"6 (xyz + rgb)")
        _check_positive("point", num_points=self.num_points, num_groups=self.num_groups,
                        group_size=self.group_size, width=self.width, layers=self.layers,
                        heads=self.heads, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        if self.width % self.heads:
            raise ConfigError(f"point.width ({self.width}) must be divisible by point.heads "
                              f"({self.heads})")

    @property
    def output_width(self) -> int:
        return 2 * self.width  # class token ‖ max over tokens


@dataclass(frozen=True)
class PointTextConfig:
    """A point cloud–text dual encoder. ``image_width``: the width of the frozen image-tower
    features it aligns points to as well (ULIP), None for point ↔ text only. ``lock_text``:
    the text tower is frozen (its projection still trains), so data sources may feed its
    pooled output [B, text.width] instead of token ids."""

    model_type: str = "clip"  # clip | siglip: the default loss
    point: PointEncoderConfig = field(default_factory=PointEncoderConfig)
    text: TextConfig | BertConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    point_projection: str = "linear"
    text_projection: str = "linear"
    image_width: int | None = None
    lock_text: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        check_choice("model.model_type", self.model_type, ("clip", "siglip"))
        check_choice("model.point_projection", self.point_projection, POINT_PROJECTIONS)
        check_choice("model.text_projection", self.text_projection, POINT_PROJECTIONS)
        _check_positive("model", embed_dim=self.embed_dim)
        if self.image_width is not None:
            _check_positive("model", image_width=self.image_width)
        for side, kind, width in (("point", self.point_projection, self.point.output_width),
                                  ("text", self.text_projection, self.text.width)):
            if kind == "none" and width != self.embed_dim:
                raise ConfigError(f"model.{side}_projection = 'none' needs the {side} tower's "
                                  f"output width ({width}) == embed_dim ({self.embed_dim})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointTextConfig:
        data = dict(data)
        point = data.pop("point", {})
        point = from_dict(PointEncoderConfig, point, "point") if isinstance(point, dict) else point
        text = tower_config(TEXT_CONFIGS, data.pop("text", {}), "text")
        return from_dict(cls, {**data, "point": point, "text": text}, "model")


# ---------------------------------------------------------------- grouping
def farthest_point_sample(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of ``count`` points spread over each cloud ``xyz [B, N, 3]``: start at
    point 0, then repeatedly take the point farthest from all chosen so far (deterministic)."""
    b, n, _ = xyz.shape
    count = min(count, n)
    chosen = torch.zeros(b, count, dtype=torch.long, device=xyz.device)
    distance = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(count):
        chosen[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)  # [B, 1, 3]
        distance = torch.minimum(distance, ((xyz - centre) ** 2).sum(-1))
        farthest = distance.argmax(-1)
    return chosen


def group_points(points: torch.Tensor, num_groups: int, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres [B, G, 3], groups [B, G, K, C])``: FPS centres and each one's ``K`` nearest
    points, their xyz made relative to the centre (other channels, colours, kept as they are)."""
    xyz = points[..., :3]
    with torch.no_grad():  # indices only: no gradient flows through the choice
        centre_index = farthest_point_sample(xyz.float(), num_groups)
        centres_f = torch.gather(xyz.float(), 1, centre_index.unsqueeze(-1).expand(-1, -1, 3))
        k = min(group_size, points.shape[1])
        neighbours = torch.cdist(centres_f, xyz.float()).topk(k, dim=-1, largest=False).indices
    centres = torch.gather(xyz, 1, centre_index.unsqueeze(-1).expand(-1, -1, 3))
    b, g, k = neighbours.shape
    flat = neighbours.reshape(b, g * k, 1).expand(-1, -1, points.shape[-1])
    groups = torch.gather(points, 1, flat).reshape(b, g, k, points.shape[-1])
    relative = groups[..., :3] - centres.unsqueeze(2)
    return centres, torch.cat([relative, groups[..., 3:]], dim=-1)


class MiniPointNet(nn.Module):
    """One token per neighbourhood: shared MLP → max → concat with each point → MLP → max
    (Point-BERT's patch encoder, its widths scaled to the token width: 1/2, 1, 2 → 1, 1)."""

    def __init__(self, in_channels: int, width: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, width // 2)
        self.norm1 = nn.LayerNorm(width // 2)
        self.fc2 = nn.Linear(width // 2, width)
        self.fc3 = nn.Linear(2 * width, width)
        self.norm3 = nn.LayerNorm(width)
        self.fc4 = nn.Linear(width, width)
        self.act = activation(act)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:  # [B, G, K, C] -> [B, G, width]
        x = self.fc2(self.act(self.norm1(self.fc1(groups))))
        pooled = x.max(dim=2, keepdim=True).values.expand_as(x)
        x = self.fc4(self.act(self.norm3(self.fc3(torch.cat([pooled, x], dim=-1)))))
        return x.max(dim=2).values


class PointEncoder(nn.Module):
    """``forward(points [B, N, in_channels]) -> [B, 2 * width]``."""

    def __init__(self, config: PointEncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.patch_embed = MiniPointNet(c.in_channels, c.width, c.act)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), activation(c.act),
                                       nn.Linear(128, c.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, c.width))
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.norm_eps)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        init_transformer(self.transformer, c.width, c.layers)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.cls_pos, std=0.02)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != self.config.in_channels:
            raise ValueError(f"points must be [B, N, {self.config.in_channels}], got "
                             f"{tuple(points.shape)}")
        centres, groups = group_points(points, self.config.num_groups, self.config.group_size)
        tokens = self.patch_embed(groups) + self.pos_embed(centres)
        b = tokens.shape[0]
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)
        x = self.norm(self.transformer(torch.cat([cls, tokens], dim=1)))
        return torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)


# ---------------------------------------------------------------- the dual encoder
@dataclass
class PointTextOutput(DualEncoderOutput):
    """``DualEncoderOutput`` (image_embeds = point embeddings) plus the embeddings of the
    renderings' image features when they were given (ULIP's point ↔ image side)."""

    render_embeds: torch.Tensor | None = None


class PointTextModel(TextContrastive):
    """A point cloud–text CLIP/SigLIP model (``architecture = "point_clip"``)."""

    architecture = "point_clip"
    media_key = "points"

    def __init__(self, config: PointTextConfig) -> None:
        super().__init__()
        self.config = config
        self.points = PointEncoder(config.point)
        self.point_proj = _projection(config.point_projection, config.point.output_width,
                                      config.embed_dim)
        self.image_proj = (_projection("linear", config.image_width, config.embed_dim)
                           if config.image_width is not None else None)
        self._build_text_side(config)
        if config.lock_text:
            self.text.requires_grad_(False)

    def train(self, mode: bool = True) -> PointTextModel:
        super().train(mode)
        if self.config.lock_text:
            self.text.eval()  # a locked tower has no dropout / statistics to update
        return self

    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        """Projected point embeddings [B, D], not normalised."""
        return self.point_proj(self.points(points.to(self.logit_scale.dtype)))

    def text_features(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The text tower's pooled output [B, text.width] (what a locked tower's cache holds)."""
        if self.config.lock_text:
            with torch.no_grad():
                return self.text(input_ids, attention_mask)
        return self.text(input_ids, attention_mask)

    def encode_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen image-tower features of renderings [B, image_width] → [B, D]."""
        if self.image_proj is None:
            raise ValueError("this model has no image side: set model.image_width (the image "
                             "tower's feature width) to align points with renderings")
        return self.image_proj(features.to(self.logit_scale.dtype))

    def forward(self, points: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> PointTextOutput:
        point = F.normalize(self.encode_points(points), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        render = (F.normalize(self.encode_image_features(image_features), dim=-1)
                  if image_features is not None else None)
        logits = self.logits(point, text)
        return PointTextOutput(point, text, logits, logits.t(), self.logit_scale.exp(),
                               self.logit_bias, render)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.points.transformer.gradient_checkpointing = enabled
        getattr(self.text, "transformer", self.text).gradient_checkpointing = enabled

