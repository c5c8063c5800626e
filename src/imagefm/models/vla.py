"""A vision-language-action model (RT-2 / OpenVLA style, small): ViT + Llama-family decoder,
actions as tokens.

    pixels ─► ViT patch tokens ─► projector ─┐
    instruction ─► token embeddings ─────────┼─► decoder (causal) ─► a_0, a_1, ..., a_{D-1}
    <act> a_0 ... a_{D-2} (teacher forced) ──┘

Each action dimension d has ``action_bins[d]`` tokens appended to the text vocabulary after
one ``<act>`` start token; a_d is predicted at the position before it (autoregressively: the
grip may depend on the move chosen). Logits of dimension d are read over its own bins only, so
the model can never emit a token of another dimension or a word.

With ``image_summary = "pointers"`` (what works; ``models.vla_pointers``) three pointer tokens
(gripper, the instruction's object, its zone: located by a conv branch with queries the decoder
writes from the instruction) sit between the instruction and ``<act>``, and the relation of
their positions is added to every action position; ``forward(..., positions=...)`` adds the
heat maps' loss against true positions (a simulator gives them for free).

``language = False`` is the language-blind control: the same model without the instruction
segment, trained and evaluated on the image alone (what is achievable without reading).

Layer: models (no file format, no data).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.checkpoint import save_model
from imagefm.config import ConfigError, ImageCard, VisionConfig, from_dict
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.projector import PROJECTORS, Projector
from imagefm.models.vit import VisionTransformer
from imagefm.models.vla_pointers import POINTERS, PointerHead, pointer_loss


@dataclass(frozen=True)
class VLAConfig:
    """The towers, the text vocabulary's size and the action bins; the LM's vocabulary is
    ``text_vocab_size + 1 + sum(action_bins)`` (text, ``<act>``, action tokens)."""

    vision: VisionConfig
    lm: DecoderConfig
    text_vocab_size: int
    action_bins: tuple[int, ...] = (5, 5, 2)
    max_text_tokens: int = 24
    language: bool = True
    projector: str = "mlp2x_gelu"
    # "max": the channel-wise max over the projected patch tokens is added to the <act> token's
    # embedding. Towers trained from scratch struggle to pick out a few-pixel feature (the
    # gripper, the target) while attention is still uniform over all tokens; the summary puts
    # it in the action positions' residual stream from the first step. "none": attention only.
    # "keypoints": a small full-resolution conv branch whose channels each end in a spatial
    # soft-argmax (Levine et al. 2016): ``keypoints`` tokens carrying an (x, y) position and a
    # peak activation as content, placed after the ViT's tokens. Acting needs positions to a
    # pixel or two (the move bins are 0.06 of the table apart); patch tokens hold them only in
    # their position embeddings, which attention has to learn to read out, and did not (first
    # attempt: moves at chance). With keypoints the decoder only selects and subtracts.
    # "pointers" (third attempt, ``models.vla_pointers``): a conv branch points at the gripper,
    # the instruction's object and its zone (queries from the decoder's reading of the
    # instruction); three pointer tokens follow the instruction and the positions' differences
    # are added to <act> and to each action token. ``pointer_weight`` scales the heat maps'
    # loss against the simulator's true positions when a batch carries them.
    image_summary: str = "max"
    keypoints: int = 32
    pointer_channels: int = 32
    pointer_weight: float = 1.0
    image_mean: float = 0.5  # pixels (0-1) are normalised as (x - mean) / std
    image_std: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "action_bins", tuple(int(b) for b in self.action_bins))
        if not self.action_bins or min(self.action_bins) < 2:
            raise ConfigError(f"vla.action_bins needs at least one dimension of >= 2 bins, got "
                              f"{list(self.action_bins)}")
        if self.image_summary not in ("max", "none", "keypoints", "pointers"):
            raise ConfigError(f"vla.image_summary = {self.image_summary!r}; choose max, none, "
                              f"keypoints or pointers")
        if self.image_summary == "pointers" and (self.pointer_channels < 1
                                                 or self.pointer_weight < 0):
            raise ConfigError("vla.pointer_channels must be >= 1 and vla.pointer_weight >= 0")
        if self.image_summary == "keypoints" and self.keypoints < 1:
            raise ConfigError(f"vla.keypoints = {self.keypoints}: needs >= 1 keypoint channel")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"vla.projector = {self.projector!r}; choose one of {PROJECTORS}")
        if self.lm.vocab_size != self.vocab_size:
            raise ConfigError(f"vla.lm.vocab_size must be {self.vocab_size} (text "
                              f"{self.text_vocab_size} + <act> + {sum(self.action_bins)} action "
                              f"tokens), got {self.lm.vocab_size}")
        if self.vision.pool == "cls" or self.vision.class_token:
            raise ConfigError("vla.vision: use patch tokens only (class_token = false, "
                              "pool = 'mean')")
        if self.image_positions + self.max_text_tokens + len(self.action_bins) + 1 \
                > self.lm.context_length:
            positions = self.image_positions + self.max_text_tokens + len(self.action_bins) + 1
            raise ConfigError(f"vla.lm.context_length ({self.lm.context_length}) must hold the "
                              f"{positions} positions of image, text and action tokens")

    @property
    def image_positions(self) -> int:
        """Patch tokens, plus keypoint or pointer tokens when the summary adds them."""
        extra = {"keypoints": self.keypoints, "pointers": len(POINTERS)}.get(self.image_summary, 0)
        return self.vision.grid_size**2 + extra

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + 1 + sum(self.action_bins)

    @property
    def start_token_id(self) -> int:
        return self.text_vocab_size

    @property
    def action_offsets(self) -> tuple[int, ...]:
        """The LM token id of bin 0 of each dimension."""
        offsets, first = [], self.text_vocab_size + 1
        for bins in self.action_bins:
            offsets.append(first)
            first += bins
        return tuple(offsets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        data = dict(data)
        vision = from_dict(VisionConfig, data.pop("vision"), "vla.vision")
        lm = DecoderConfig.from_dict(data.pop("lm"))
        return from_dict(cls, {**data, "vision": vision, "lm": lm}, "vla")


def vla_config(text_vocab_size: int, *, image_size: int = 48, patch_size: int = 8,
               width: int = 96, vision_layers: int = 3, lm_layers: int = 3,
               action_bins: tuple[int, ...] = (5, 5, 2), max_text_tokens: int = 24,
               language: bool = True, image_summary: str = "max",
               keypoints: int = 32, pointer_channels: int = 32,
               pointer_weight: float = 1.0) -> VLAConfig:
    """A small VLA for CPU training (the default is ~0.7 M parameters).

    The tower normalises its patch embeddings before the blocks (``pre_norm``): from scratch,
    the small convolutional stem's output is otherwise swamped by the blocks' attention, which
    averages a few-pixel gripper away (measured: a probe on its tokens stays at chance).
    """
    heads = max(1, width // 32)
    vision = VisionConfig(image_size=image_size, patch_size=patch_size, width=width,
                          layers=vision_layers, heads=heads, mlp_dim=4 * width, act="gelu",
                          class_token=False, pre_norm=True, pool="mean", stem="conv")
    extra = {"keypoints": keypoints, "pointers": len(POINTERS)}.get(image_summary, 0)
    positions = (image_size // patch_size) ** 2 + extra + max_text_tokens + len(action_bins) + 1
    lm = DecoderConfig(vocab_size=text_vocab_size + 1 + sum(action_bins), width=width,
                       layers=lm_layers, heads=heads, kv_heads=heads, mlp_dim=2 * width,
                       context_length=positions, tie_embeddings=True)
    return VLAConfig(vision, lm, text_vocab_size, action_bins, max_text_tokens, language,
                     image_summary=image_summary, keypoints=keypoints,
                     pointer_channels=pointer_channels, pointer_weight=pointer_weight)


class SpatialKeypoints(nn.Module):
    """Full-resolution convolutions → one spatial soft-argmax per channel → one token each.

    Token k = ``proj([x_k, y_k, peak_k])`` + a learned embedding of channel k, with (x_k, y_k)
    the softmax-weighted mean pixel position in [-1, 1] and peak_k the channel's max response.
    """

    def __init__(self, in_channels: int, channels: int, keypoints: int, width: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, keypoints, 1))
        # A sharp start (temperature 0.01): from a near-uniform softmax every keypoint sits at
        # the image centre and the gradient that would move it is tiny (measured, with the
        # target given: 47 % dx accuracy after 500 steps at temperature 1, 61 % at 0.01).
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.01)))
        self.proj = nn.Linear(3, width)
        self.channel = nn.Parameter(torch.randn(keypoints, width) * 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.convs(pixel_values)  # [B, K, H, W]
        height, width = maps.shape[-2:]
        weights = torch.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1)
        ys = torch.linspace(-1, 1, height, device=maps.device).repeat_interleave(width)
        xs = torch.linspace(-1, 1, width, device=maps.device).repeat(height)
        x, y = weights @ xs, weights @ ys  # [B, K]
        peak = maps.flatten(2).amax(-1)
        return self.proj(torch.stack([x, y, peak], dim=-1)) + self.channel


@dataclass
class VLAOutput:
    logits: torch.Tensor  # [B, D, max bins]; bins a dimension lacks are -inf
    loss: torch.Tensor | None = None  # mean cross-entropy over dimensions (+ pointer loss)
    action_loss: torch.Tensor | None = None  # the action tokens' cross-entropy alone
    pointer_loss: torch.Tensor | None = None  # heat maps vs true positions, when given
    positions: torch.Tensor | None = None  # pointed positions [B, 3, 2] (pointers summary)


class VLA(nn.Module):
    """See the module docstring. ``tokenizer`` (the instruction tokenizer) travels with it."""

    architecture = "vla"

    def __init__(self, config: VLAConfig, card: ImageCard | None = None) -> None:
        super().__init__()
        self.config = config
        # The preprocessing card (saved with the checkpoint, read by imagefm.load_processor):
        # a square observation of the tower's size, normalised as ``normalize`` does.
        self.card = card or ImageCard(
            image_size=config.vision.image_size, resize_mode="squash", interpolation="bilinear",
            mean=(config.image_mean,) * 3, std=(config.image_std,) * 3)
        self.vision = VisionTransformer(config.vision)
        self.projector = Projector(config.projector, config.vision.width, config.lm.width)
        self.lm = DecoderLM(config.lm)
        self.keypoints = (SpatialKeypoints(config.vision.in_channels, 16, config.keypoints,
                                           config.lm.width)
                          if config.image_summary == "keypoints" else None)
        self.pointers = (PointerHead(config.vision.in_channels, config.pointer_channels,
                                     config.lm.width)
                         if config.image_summary == "pointers" else None)
        self.tokenizer: Any = None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] → pixel_values [B, 3, H, W]."""
        x = images.to(self.lm.embed_tokens.weight.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.config.image_mean) / self.config.image_std

    def prefix(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None,
               attention_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Embeddings and key mask of image tokens, instruction (unless blind), pointer
        tokens (``pointers`` summary) and ``<act>``; and the pointer head's outputs."""
        image = self.projector(self.vision.forward_tokens(pixel_values))
        batch, device = image.shape[0], image.device
        if self.keypoints is not None:
            image = torch.cat([image, self.keypoints(pixel_values.to(image.dtype))], dim=1)
        parts = [image]
        masks = [torch.ones(image.shape[:2], dtype=torch.long, device=device)]
        if self.config.language:
            if input_ids is None:
                raise ValueError("this VLA reads instructions: pass input_ids")
            if input_ids.shape[1] > self.config.max_text_tokens:
                raise ValueError(f"instructions of {input_ids.shape[1]} tokens exceed "
                                 f"max_text_tokens = {self.config.max_text_tokens}")
            parts.append(self.lm.embed_tokens(input_ids))
            masks.append(attention_mask.long() if attention_mask is not None
                         else torch.ones_like(input_ids))
        start = torch.full((batch, 1), self.config.start_token_id, device=device)
        start = self.lm.embed_tokens(start)
        pointed = None
        if self.config.image_summary == "max":
            start = start + image.amax(dim=1, keepdim=True)
        elif self.pointers is not None:
            pointed = self.pointers(pixel_values.to(image.dtype),
                                    self._text_queries(parts[1], masks[1])
                                    if self.config.language else None)
            parts.append(pointed["tokens"])
            masks.append(torch.ones(pointed["tokens"].shape[:2], dtype=torch.long,
                                    device=device))
            start = start + pointed["relation"]
        parts.append(start)
        masks.append(torch.ones((batch, 1), dtype=torch.long, device=device))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1), pointed

    def _text_queries(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder reads the instruction followed by two query slots (object, zone); its
        states there [B, 2, width] become the pointer head's queries. Text only: what to look
        for is a function of the words, not of the scene."""
        slots = self.pointers.slots.expand(text.shape[0], -1, -1).to(text.dtype)
        mask = torch.cat([mask, torch.ones_like(mask[:, :2])], dim=1)
        out = self.lm(inputs_embeds=torch.cat([text, slots], dim=1), attention_mask=mask,
                      logits_to_keep=1, output_hidden_states=True)
        return out.hidden_states[:, -2:]

    def _dimension_logits(self, logits: torch.Tensor, dims: range) -> torch.Tensor:
        """[B, len(dims), vocab] → [B, len(dims), max bins], each over its own bins."""
        widest = max(self.config.action_bins)
        rows = []
        for column, d in enumerate(dims):
            first, bins = self.config.action_offsets[d], self.config.action_bins[d]
            row = logits[:, column, first:first + bins].float()
            rows.append(F.pad(row, (0, widest - bins), value=float("-inf")))
        return torch.stack(rows, dim=1)

    def _action_ids(self, actions: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor(self.config.action_offsets, device=actions.device)
        return actions + offsets[: actions.shape[1]]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                actions: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> VLAOutput:
        """Teacher-forced logits of every action dimension; with ``actions`` [B, D] (bin
        indices) also the loss. ``positions`` [B, 3, 2] (the true gripper, object and zone
        centres in table units) add ``pointer_weight`` × the pointer loss (pointers summary)."""
        embeds, mask, pointed = self.prefix(pixel_values, input_ids, attention_mask)
        dims = len(self.config.action_bins)
        if actions is None:
            raise ValueError("forward needs the actions to teacher-force; use predict() to act")
        if actions.shape[1] != dims:
            raise ValueError(f"actions must be [B, {dims}] bin indices, got {tuple(actions.shape)}")
        if dims > 1:
            given = self.lm.embed_tokens(self._action_ids(actions[:, :-1]))
            if pointed is not None:
                given = given + pointed["relation"]
            embeds = torch.cat([embeds, given], dim=1)
            mask = torch.cat([mask, torch.ones(given.shape[:2], dtype=mask.dtype,
                                               device=mask.device)], dim=1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=dims)
        logits = self._dimension_logits(out.logits, range(dims))
        action_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1))
        if pointed is None:
            return VLAOutput(logits, action_loss, action_loss)
        aux = None
        if positions is not None:
            grid = tuple(int(v) for v in pointed["grid"])
            aux = pointer_loss(pointed["scores"], grid, positions.to(pointed["scores"].device))
        loss = action_loss if aux is None else action_loss + self.config.pointer_weight * aux
        return VLAOutput(logits, loss, action_loss, aux, pointed["positions"])

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy action tokens [B, D] (bin indices), one dimension after another."""
        embeds, mask, pointed = self.prefix(pixel_values, input_ids, attention_mask)
        cache = self.lm.new_cache(embeds.shape[0], embeds.shape[1] + len(self.config.action_bins))
        chosen: list[torch.Tensor] = []
        step_input = embeds
        for d in range(len(self.config.action_bins)):
            out = self.lm(inputs_embeds=step_input, attention_mask=mask, cache=cache,
                          logits_to_keep=1)
            best = self._dimension_logits(out.logits, range(d, d + 1))[:, 0].argmax(-1)
            chosen.append(best)
            step_input = self.lm.embed_tokens(best[:, None] + self.config.action_offsets[d])
            if pointed is not None:  # every action position reads the positions' relation
                step_input = step_input + pointed["relation"]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(chosen, dim=1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write an imagefm checkpoint (weights, config, instruction tokenizer)."""
        return save_model(self, directory)
