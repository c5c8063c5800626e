"""CLAP-style speech–text dual encoder: an audio tower and a text tower meeting in one space.

    waveform ─► log-mel ─► AudioEncoder ─► mean over real frames ─► audio_proj ─┐
                                                                               ├─► cosine logits
    tokens   ─────────────► text tower (ours / BERT, e.g. multilingual-e5) ─► text_proj ─┘

The text side is the dual encoder's (``imagefm.models.towers``, its projections and pooling
checks); the output is a ``DualEncoderOutput`` whose ``image_embeds`` are the audio embeddings,
so the CLIP/SigLIP losses, ``ContrastiveTask``, GradCache and the Trainer work unchanged.

Padding travels inside the features: ``ContrastiveTask`` passes only ``(input_features,
input_ids, attention_mask)``, so batches mark padded frames by filling every mel bin with
``FEATURE_PAD`` (-4, below anything log-mel produces: its floor is (log10(1e-10) + 4) / 4 = -1.5).
``encode_audio`` recovers the frame mask from it, puts the example's floor value (what silence
gives) back for the convolutions, masks attention and pools over real frames only.
``pad_features`` makes such batches from ``log_mel``'s output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from imagefm.config import (
    TEXT_CONFIGS,
    BertConfig,
    ConfigError,
    TextConfig,
    check_choice,
    tower_config,
)
from imagefm.config import from_dict as config_from_dict
from imagefm.models.audio_features import MelConfig, log_mel
from imagefm.models.dual_encoder import DualEncoderOutput, TextContrastive, _projection
from imagefm.models.whisper_encoder import AudioEncoder, AudioEncoderConfig, audio_preset

FEATURE_PAD = -4.0
PROJECTIONS = ("linear", "linear_bias", "mlp", "none")


@dataclass(frozen=True)
class ClapConfig:
    """A speech–text dual encoder. ``model_type`` (clip | siglip) decides the default loss."""

    model_type: str = "clip"
    audio: AudioEncoderConfig = field(default_factory=lambda: audio_preset("audio-tiny"))
    text: TextConfig | BertConfig = field(default_factory=BertConfig)
    embed_dim: int = 256
    audio_projection: str = "linear"
    text_projection: str = "linear"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # siglip: -10

    def __post_init__(self) -> None:
        check_choice("model.model_type", self.model_type, ("clip", "siglip"))
        check_choice("model.audio_projection", self.audio_projection, PROJECTIONS)
        check_choice("model.text_projection", self.text_projection, PROJECTIONS)
        if self.embed_dim <= 0:
            raise ConfigError(f"model.embed_dim must be > 0, got {self.embed_dim}")
        for side, width, kind in (("audio", self.audio.d_model, self.audio_projection),
                                  ("text", self.text.width, self.text_projection)):
            if kind == "none" and width != self.embed_dim:
                raise ConfigError(f"model.{side}_projection = 'none' needs the {side} width "
                                  f"({width}) == embed_dim ({self.embed_dim})")
        if self.model_type == "siglip" and self.init_logit_bias is None:
            raise ConfigError("model.model_type = siglip needs model.init_logit_bias (e.g. -10)")

    @property
    def mel(self) -> MelConfig:
        """The features the audio tower takes."""
        return self.audio.mel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClapConfig:
        data = dict(data)
        audio = data.pop("audio", {})
        audio = AudioEncoderConfig.from_dict(audio) if isinstance(audio, dict) else audio
        text = tower_config(TEXT_CONFIGS, data.pop("text", {}), "text")
        return config_from_dict(cls, {**data, "audio": audio, "text": text}, "model")


def frame_mask_of(input_features: torch.Tensor) -> torch.Tensor:
    """[B, n_mels, T] features -> [B, T] bool: frames not filled with ``FEATURE_PAD``."""
    return (input_features != FEATURE_PAD).any(dim=1)


def pad_features(features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """``log_mel`` output with its padded frames set to ``FEATURE_PAD`` (see the module doc)."""
    return features.masked_fill(~frame_mask.bool()[:, None, :], FEATURE_PAD)


def speech_features(waveforms: Any, mel: MelConfig, max_frames: int | None = None
                    ) -> torch.Tensor:
    """Waveforms (16 kHz float arrays of any lengths) -> a padded feature batch the model takes,
    cut to ``max_frames`` frames (the audio tower's limit)."""
    features, mask = log_mel(waveforms, mel)
    if max_frames is not None and features.shape[-1] > max_frames:
        features, mask = features[..., :max_frames], mask[:, :max_frames]
    return pad_features(features, mask)


class ClapModel(TextContrastive):
    """A CLAP dual encoder (speech ↔ text), trained with the dual encoders' contrastive task."""

    architecture = "clap"
    media_key = "input_features"

    def __init__(self, config: ClapConfig) -> None:
        super().__init__()
        self.config = config
        self.audio = AudioEncoder(config.audio)
        self.audio_proj = _projection(config.audio_projection, config.audio.d_model,
                                      config.embed_dim)
        self._build_text_side(config)

    def features(self, waveforms: Any) -> torch.Tensor:
        """The feature batch for raw 16 kHz waveforms (what batches hold as input_features)."""
        return speech_features(waveforms, self.config.mel, self.config.audio.max_frames)

    def encode_audio(self, input_features: torch.Tensor,
                     frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected audio embeddings [B, D], not normalised. ``frame_mask`` [B, T] (True = real)
        defaults to the frames not filled with ``FEATURE_PAD``."""
        if frame_mask is None:
            frame_mask = frame_mask_of(input_features)
        frame_mask = frame_mask.bool()
        if not bool(frame_mask.any(dim=1).all()):
            raise ValueError("an audio example has no real frames (empty clip)")
        # Padded frames get the example's floor back (what silence gives), as log_mel made them.
        real = frame_mask[:, None, :]
        floor = input_features.masked_fill(~real, float("inf")).amin(dim=(1, 2), keepdim=True)
        features = torch.where(real, input_features, floor)
        hidden = self.audio(features, frame_mask)
        keep = self.audio.output_mask(frame_mask).to(hidden.dtype)[..., None]
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1)
        return self.audio_proj(pooled)

    def forward(self, input_features: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> DualEncoderOutput:
        audio = F.normalize(self.encode_audio(input_features), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits = self.logits(audio, text)
        return DualEncoderOutput(audio, text, logits, logits.t(), self.logit_scale.exp(),
                                 self.logit_bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for tower in (self.audio, self.text):
            getattr(tower, "transformer", tower).gradient_checkpointing = enabled

