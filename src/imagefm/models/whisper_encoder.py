"""A Whisper-compatible audio encoder: log-mel frames -> hidden states, half the frame rate.

    features, frame_mask = log_mel(waves, encoder.config.mel)   # imagefm.models.audio_features
    hidden = encoder(features, frame_mask)                       # [B, ceil(T / 2), d_model]
    keep = encoder.output_mask(frame_mask)                       # [B, ceil(T / 2)] bool

The layout is Whisper's encoder (and transformers' ``WhisperEncoder``): conv1 (k=3) + GELU,
conv2 (k=3, stride 2) + GELU, plus sinusoidal position embeddings (stored, frozen), pre-LN
transformer blocks (the shared ``models.layers`` blocks), a final LayerNorm. Whisper's key
projection has no bias; here it is a zero buffer, so the state dict matches the checkpoint's keys
while the fused q/k/v matmul of ``layers.Attention`` still applies (a key bias would change no
attention weight anyway: it adds the same number to every score of a query).

Differences from transformers, on purpose: inputs shorter than ``2 * max_source_positions``
frames are accepted (position embeddings sliced, as the original openai code does not allow but
short clips need), and ``frame_mask`` keeps padded frames out of the model: zeroed before each
conv (as the convs pad an unpadded clip) and masked out of attention, so a clip's real outputs are
the same alone or padded in a batch. Whisper attends to its 30 s of padding; with 30 s chunks and
no mask the outputs are the checkpoint's (as tested).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.checkpoint import save_model
from imagefm.config import ConfigError, check_choice, from_dict
from imagefm.models.audio_features import MelConfig
from imagefm.models.layers import Transformer, init_transformer, make_attention_mask


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Shapes use transformers' WhisperConfig names, so a converter copies them one to one."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # positions after the stride-2 conv: 1500 = 30 s
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    # The features this encoder was trained on (n_mels must equal num_mel_bins).
    mel: MelConfig = field(default_factory=MelConfig)

    def __post_init__(self) -> None:
        for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                     "encoder_ffn_dim", "max_source_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"audio.{name} must be > 0, got {getattr(self, name)!r}")
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"audio.d_model ({self.d_model}) must be divisible by "
                              f"audio.encoder_attention_heads ({self.encoder_attention_heads})")
        check_choice("audio.activation", self.activation,
                     ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu"))
        if self.mel.n_mels != self.num_mel_bins:
            raise ConfigError(f"audio.mel.n_mels ({self.mel.n_mels}) must equal "
                              f"audio.num_mel_bins ({self.num_mel_bins})")

    @property
    def max_frames(self) -> int:
        """The longest input in mel frames (3000 = 30 s for Whisper)."""
        return 2 * self.max_source_positions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioEncoderConfig:
        data = dict(data)
        if isinstance(data.get("mel"), dict):
            data["mel"] = MelConfig.from_dict(data["mel"])
        return from_dict(cls, data, "audio")


_WHISPER_TINY = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                     encoder_ffn_dim=1536)
AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    # Shapes of the published checkpoints (weights come through imagefm.load(hub id or folder)).
    "whisper-tiny": _WHISPER_TINY,
    "whisper-base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8,
                         encoder_ffn_dim=2048),
    "whisper-small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12,
                          encoder_ffn_dim=3072),
    # For training from scratch on a CPU: clips up to 10 s, features not padded to 30 s.
    "audio-tiny": dict(d_model=192, encoder_layers=4, encoder_attention_heads=3,
                       encoder_ffn_dim=768, max_source_positions=500,
                       mel=MelConfig(chunk_seconds=None)),
}


def audio_preset(name: str, **overrides: Any) -> AudioEncoderConfig:
    """A named encoder shape (``AUDIO_PRESETS``), with fields overridden by keyword."""
    check_choice("audio preset", name, tuple(AUDIO_PRESETS))
    return AudioEncoderConfig(**{**AUDIO_PRESETS[name], **overrides})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table [length, channels]: sines then cosines, geometric timescales."""
    if channels % 2:
        raise ConfigError(f"audio.d_model must be even for sinusoidal positions, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1) if channels > 2 else 0.0
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def _zero_key_bias(attn: nn.Module, width: int) -> None:
    """Whisper's k_proj has no bias: replace the parameter by a zero, unsaved buffer (see the
    module docstring for why not ``bias=None``)."""
    del attn.k_proj.bias
    attn.k_proj.register_buffer("bias", torch.zeros(width), persistent=False)


class AudioEncoder(nn.Module):
    """Whisper's encoder: [B, num_mel_bins, T] log-mel features -> [B, ceil(T / 2), d_model]."""

    architecture = "audio_encoder"  # the name imagefm.json records
    media_key = "input_features"

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        width = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, width)
        self.embed_positions.weight.requires_grad_(False)  # fixed sinusoids, as Whisper
        self.transformer = Transformer(width, config.encoder_layers,
                                       config.encoder_attention_heads, config.encoder_ffn_dim,
                                       config.activation, config.layer_norm_eps)
        for block in self.transformer.blocks:
            _zero_key_bias(block.attn, width)
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        if not self.embed_positions.weight.is_meta:  # not while a checkpoint is being loaded
            init_transformer(self.transformer, width, config.encoder_layers)
            with torch.no_grad():
                self.embed_positions.weight.copy_(sinusoids(config.max_source_positions, width))

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @staticmethod
    def output_mask(frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] frame mask -> [B, ceil(T / 2)]: output j is real if input frame 2j is."""
        return frame_mask[:, ::2].bool()

    def forward(self, input_features: torch.Tensor,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, ceil(T / 2), d_model]. ``frame_mask`` [B, T] (True = real frame)
        keeps padded frames out of attention; None attends to every frame, as Whisper."""
        config = self.config
        if input_features.dim() != 3 or input_features.shape[1] != config.num_mel_bins:
            raise ValueError(f"input_features must be [batch, {config.num_mel_bins} mel bins, "
                             f"frames], got {tuple(input_features.shape)}")
        frames = input_features.shape[2]
        if frames > config.max_frames:
            raise ValueError(f"{frames} mel frames is longer than this encoder takes "
                             f"({config.max_frames} = 2 x max_source_positions); cut the audio")
        dtype = self.conv1.weight.dtype
        x = input_features.to(dtype)
        mask = real = None
        if frame_mask is not None:
            if tuple(frame_mask.shape) != (input_features.shape[0], frames):
                raise ValueError(f"frame_mask must be [batch, frames] = "
                                 f"{(input_features.shape[0], frames)}, got "
                                 f"{tuple(frame_mask.shape)}")
            keep = self.output_mask(frame_mask)
            if not bool(keep.all()):  # no mask at all is the faster path
                mask = make_attention_mask(keep.shape[1], keep)
                real = frame_mask[:, None, :].to(dtype)
        # With a mask, padded frames are zeroed before each conv: the zeros the conv pads an
        # unpadded clip with, so a clip's outputs do not depend on the batch it is padded in.
        x = F.gelu(self.conv1(x if real is None else x * real))
        x = F.gelu(self.conv2(x if real is None else x * real)).transpose(1, 2)  # [B, T', width]
        x = x + self.embed_positions.weight[: x.shape[1]]
        x = self.transformer(x, mask)
        return self.layer_norm(x)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save in imagefm format (``imagefm.load(directory)`` reads it back)."""
        save_model(self, directory)
