"""Speech into a VLM: an audio tower and projector that turn a spoken clip into LM tokens.

    waveform ─► log-mel [n_mels, T] ─► AudioEncoder (Whisper-style) ─► [T/2, d] ─► stack k frames
             ─► [T/2k, k·d] ─► Projector (mlp2x_gelu) ─► [audio_tokens, lm_width] ─► the LM rows
                                                                         of the ``<audio>`` slots

Audio tokens by contract, as images: every clip is padded (or cut) to ``seconds``, so it always
gives ``config.tokens`` LM positions; the processor expands each ``<audio>`` into exactly that many
placeholder ids, and :func:`splice` fills them in order and refuses a count that does not match.
Stacking ``stack`` neighbouring encoder frames into one token (as pixel shuffle merges patches)
keeps the LM's sequence short: 4 s at Whisper's 20 ms per encoder frame and ``stack=8`` is 25
tokens. A fixed length wastes a little compute on silence but keeps batches, counts and the
training data simple (the questions it is made for last 1-3 s).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError, from_dict
from imagefm.models.audio_features import MelConfig
from imagefm.models.projector import Projector
from imagefm.models.whisper_encoder import AudioEncoder, AudioEncoderConfig

AUDIO_TOKEN = "<audio>"


@dataclass(frozen=True)
class AudioInputConfig:
    """The audio side of a VLM; saved in the VLM's config (``audio``), absent when it has none."""

    encoder: AudioEncoderConfig
    token_id: int
    token: str = AUDIO_TOKEN
    seconds: float = 4.0  # every clip padded or cut to this length: a fixed token count
    stack: int = 8  # encoder frames merged into one LM token

    def __post_init__(self) -> None:
        if self.stack < 1 or self.seconds <= 0:
            raise ConfigError(f"audio.stack ({self.stack}) must be >= 1 and audio.seconds "
                              f"({self.seconds}) > 0")
        if self.encoder_frames > self.encoder.max_source_positions:
            raise ConfigError(f"audio.seconds = {self.seconds} gives {self.encoder_frames} "
                              f"encoder frames, more than the encoder's "
                              f"max_source_positions ({self.encoder.max_source_positions}); "
                              f"use shorter clips")
        if self.tokens < 1:
            raise ConfigError(f"audio.seconds = {self.seconds} with audio.stack = {self.stack} "
                              f"leaves no audio token")

    @property
    def mel(self) -> MelConfig:
        """The encoder's log-mel features, every clip padded or cut to ``seconds``."""
        return dataclasses.replace(self.encoder.mel, chunk_seconds=self.seconds)

    @property
    def sampling_rate(self) -> int:
        return self.encoder.mel.sampling_rate

    @property
    def mel_frames(self) -> int:
        """Log-mel frames of one clip (Whisper's: samples // hop)."""
        return int(self.mel.chunk_frames)

    @property
    def encoder_frames(self) -> int:
        """The encoder's output frames (its second convolution has stride 2)."""
        return math.ceil(self.mel_frames / 2)

    @property
    def tokens(self) -> int:
        """LM positions one clip occupies."""
        return self.encoder_frames // self.stack

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioInputConfig:
        data = dict(data)
        encoder = AudioEncoderConfig.from_dict(data.pop("encoder"))
        return from_dict(cls, {**data, "encoder": encoder}, "audio")


class AudioInput(nn.Module):
    """``encoder`` (Whisper-style) + ``projector``: log-mel features → LM tokens."""

    def __init__(self, config: AudioInputConfig, lm_width: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config.encoder)
        self.projector = Projector("mlp2x_gelu", config.encoder.d_model * config.stack, lm_width)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """[clips, n_mels, mel_frames] → [clips, tokens, lm_width]."""
        hidden = self.encoder(input_features)  # [B, T', d]
        batch, _, width = hidden.shape
        count = self.config.tokens
        stacked = hidden[:, :count * self.config.stack].reshape(batch, count,
                                                                self.config.stack * width)
        return self.projector(stacked)


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
           features: torch.Tensor | None, what: str = "audio") -> torch.Tensor:
    """``embeds`` with the rows of ``token_id`` replaced by ``features`` [clips, tokens, width],
    in order; a count that does not match is refused (placeholders by contract)."""
    slots = input_ids == token_id
    found = int(slots.sum())
    if features is None:
        if found:
            raise ValueError(f"input_ids hold {found} {what} placeholder tokens but no "
                             f"{what} input was given")
        return embeds
    expected = features.shape[0] * features.shape[1]
    if found != expected:
        raise ValueError(f"input_ids hold {found} {what} placeholder tokens but "
                         f"{features.shape[0]} clip(s) need {expected} ({features.shape[1]} "
                         f"each): build the inputs with the model's processor")
    rows = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(slots[..., None], rows)
