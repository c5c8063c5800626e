"""CLIP / SigLIP dual encoder: an image tower and a text tower meeting in one embedding space.

    pixels ─► VisionTransformer ─► image_proj ─┐
                                               ├─► normalise ─► scale·img@txtᵀ (+bias) ─► logits
    tokens ─► TextTransformer  ─► text_proj  ─┘

The towers are whatever the config's ``model_type`` names (``imagefm.models.towers``): our ViT or
EfficientNet-Lite for images, our text transformer or BERT for text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.checkpoint import save_model
from imagefm.config import ConfigError, DualEncoderConfig, ImageCard, TextConfig, default_card
from imagefm.models.class_prior import ClassPriorProjection
from imagefm.models.towers import build_text_tower, build_vision_tower


@dataclass
class DualEncoderOutput:
    image_embeds: torch.Tensor  # L2-normalised [B_img, D]
    text_embeds: torch.Tensor  # L2-normalised [B_txt, D]
    logits_per_image: torch.Tensor  # [B_img, B_txt]
    logits_per_text: torch.Tensor  # [B_txt, B_img]
    logit_scale: torch.Tensor  # exp(log scale), a scalar
    logit_bias: torch.Tensor | None


class MLPProjection(nn.Module):
    """``fc2(gelu(fc1(x)))`` without biases (open_clip's ``proj_type = "mlp"`` for HF text
    towers; its hidden size is the mean of the two widths)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        hidden = (width + embed_dim) // 2
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.fc1.weight, std=width**-0.5)
        nn.init.normal_(self.fc2.weight, std=hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _projection(kind: str, width: int, embed_dim: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "mlp":
        return MLPProjection(width, embed_dim)
    if kind == "imagenet_prior":
        return ClassPriorProjection(width, embed_dim)
    layer = nn.Linear(width, embed_dim, bias=kind == "linear_bias")
    nn.init.normal_(layer.weight, std=width**-0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _misread_eos(text: TextConfig, tokenizer: Any) -> int | None:
    """The tokenizer's EOS id when ``text`` would pool somewhere else, else None.

    CLIP's "argmax" pooling reads the output at the largest token id, which is the end-of-text
    token only when EOS is the last id of the vocabulary (as in CLIP's own BPE). With any other
    tokenizer it would pool at an arbitrary word and, under the causal mask, never see the rest
    of the caption: training still runs, but the model cannot learn what comes after that word.
    """
    # The largest id in the input is the tokenizer's largest id, whatever the embedding's size.
    eos = getattr(tokenizer, "eos_id", None)
    argmax = text.causal and text.pool == "argmax"
    return eos if argmax and eos is not None and eos != tokenizer.vocab_size - 1 else None


def check_text_pooling(text: TextConfig, tokenizer: Any) -> None:
    """Refuse a tokenizer the text tower would pool wrongly (see ``_misread_eos``)."""
    eos = _misread_eos(text, tokenizer)
    if eos is not None:
        raise ConfigError(
            f"text.pool = 'argmax' pools at the largest token id ({tokenizer.vocab_size - 1}), "
            f"but this tokenizer's end-of-text id is {eos}: set text.pool = 'eos' and "
            f"text.eos_token_id = {eos} (imagefm.models.dual_encoder.fit_text_to_tokenizer)")


def fit_text_to_tokenizer(config: DualEncoderConfig, tokenizer: Any) -> DualEncoderConfig:
    """``config`` with the text tower sized for ``tokenizer`` (vocabulary, context length) and,
    when argmax pooling would miss its end-of-text token, pooling at that token's id instead."""
    text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size,
                               context_length=tokenizer.context_length or
                               config.text.context_length)
    eos = _misread_eos(text, tokenizer)
    if eos is not None:
        text = dataclasses.replace(text, pool="eos", eos_token_id=eos)
    return dataclasses.replace(config, text=text)


class TextContrastive(nn.Module):
    """The text side every dual encoder shares, whatever its other input (images here, speech
    in models/clap.py, point clouds in models/point_encoder.py): a text tower and its
    projection, the temperature (and SigLIP's bias), the tokenizer the model travels with, and
    the logits. ``config`` has ``text``, ``text_projection``, ``embed_dim``,
    ``init_logit_scale`` and ``init_logit_bias``."""

    def _build_text_side(self, config: Any) -> None:
        # The tokenizer travels with the model so a checkpoint is self-contained; loaders set it.
        self._tokenizer: Any = None
        self.text = build_text_tower(config.text)
        self.text_proj = _projection(config.text_projection, config.text.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        if tokenizer is not None:
            check_text_pooling(self.config.text, tokenizer)
        self._tokenizer = tokenizer

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings [B, D], not normalised (as HF ``get_text_features``).

        ``input_ids`` may instead be the text tower's own pooled output [B, width] (floats): how
        a data source that caches a locked text tower's features feeds them (tower skipped)."""
        if input_ids.is_floating_point():
            width = self.config.text.width
            if input_ids.dim() != 2 or input_ids.shape[-1] != width:
                raise ValueError(f"precomputed text features must be [B, {width}], got "
                                 f"{tuple(input_ids.shape)}")
            return self.text_proj(input_ids.to(self.logit_scale.dtype))
        return self.text_proj(self.text(input_ids, attention_mask))

    def logits(self, media_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits [B_media, B_txt] from normalised embeddings."""
        logits = self.logit_scale.exp() * media_embeds @ text_embeds.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``imagefm.json`` (+ tokenizer files) to ``directory``."""
        return save_model(self, directory)


class DualEncoder(TextContrastive):
    """A CLIP or SigLIP model. ``card`` is the image preprocessing it expects."""

    architecture = "dual_encoder"  # the name imagefm.json records (imagefm.loading maps it back)

    def __init__(self, config: DualEncoderConfig, card: ImageCard | None = None) -> None:
        super().__init__()
        self.config = config
        self.card = card or default_card(config)
        self.vision = build_vision_tower(config.vision)
        self._build_text_side(config)
        self.image_proj = _projection(config.image_projection, config.vision.width,
                                      config.embed_dim)

    def encode_image(self, pixel_values: torch.Tensor,
                     pixel_attention_mask: torch.Tensor | None = None,
                     spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Projected image embeddings [B, D], not normalised (as HF ``get_image_features``).

        ``pixel_values`` [B, C, H, W], or the image tower's own pooled output [B, width]: how a
        data source that caches a locked tower's features feeds them (the tower is skipped).
        A NaFlex tower (SigLIP 2) takes its processor's patches [B, N, C*p*p] with
        ``pixel_attention_mask`` [B, N] and ``spatial_shapes`` [B, 2].
        """
        if pixel_values.dim() == 2:
            if pixel_values.shape[-1] != self.config.vision.width:
                raise ValueError(f"precomputed image features must be [B, "
                                 f"{self.config.vision.width}] (the image tower's width), got "
                                 f"{tuple(pixel_values.shape)}")
            return self.image_proj(pixel_values.to(self.logit_scale.dtype))
        if pixel_attention_mask is None and spatial_shapes is None:
            return self.image_proj(self.vision(pixel_values))
        return self.image_proj(self.vision(pixel_values, pixel_attention_mask=pixel_attention_mask,
                                           spatial_shapes=spatial_shapes))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None) -> DualEncoderOutput:
        image = F.normalize(self.encode_image(pixel_values, pixel_attention_mask, spatial_shapes),
                            dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits = self.logits(image, text)
        return DualEncoderOutput(image, text, logits, logits.t(), self.logit_scale.exp(),
                                 self.logit_bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for tower in (self.vision, self.text):
            # Our transformers keep the switch on their block stack, the other towers on
            # themselves.
            getattr(tower, "transformer", tower).gradient_checkpointing = enabled

