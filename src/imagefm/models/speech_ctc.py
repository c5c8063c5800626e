"""A speech recogniser for pre-training an audio tower: Whisper-style encoder + a CTC head.

    waveform ─► log-mel [n_mels, T] (clip padded to ``seconds``) ─► AudioEncoder ─► [T/2, d]
             ─► Linear ─► logits [T/2, 1 + len(alphabet)]       (index 0 is the CTC blank)

Why: an audio tower trained from scratch only through a frozen LM learns next to nothing per clip
(a one-token answer is the whole signal). Connectionist temporal classification (CTC) asks every
20 ms frame for a character, with no LM in the loop, so thousands of clips a minute teach the tower
words; the tower then goes into a VLM (``imagefm vlm-add-audio MODEL --encoder THIS``) and only
its projector has to learn to speak to the LM.

Characters are the targets, with Hangul decomposed into its conjoining jamo (Unicode NFD): about
40 letters cover every Korean syllable, where whole syllables would be hundreds of rare classes.
:func:`transcript_ids` maps text to targets (lower case, NFD, characters outside ``alphabet``
dropped), :func:`greedy_decode` collapses the frame-wise argmax back to text (NFC, so jamo
recombine into syllables). The features are the VLM's: ``log_mel`` with every clip padded or cut
to ``seconds`` (Whisper's fixed chunk, no frame mask), so the tower sees in pre-training exactly
what the VLM will feed it.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.checkpoint import save_model
from imagefm.config import ConfigError, from_dict
from imagefm.models.audio_features import MelConfig
from imagefm.models.whisper_encoder import AudioEncoder, AudioEncoderConfig

BLANK = 0


def normalize_transcript(text: str) -> str:
    """Lower case, Hangul split into jamo (NFD), runs of white space made one space."""
    return " ".join(unicodedata.normalize("NFD", text.lower()).split())


# English letters, digits, the apostrophe and space, then every modern Hangul jamo (leading
# consonants U+1100-1112, vowels U+1161-1175, trailing consonants U+11A8-11C2): any English or
# Korean sentence, 105 characters.
DEFAULT_ALPHABET = (" '0123456789abcdefghijklmnopqrstuvwxyz"
                    + "".join(chr(c) for c in (*range(0x1100, 0x1113), *range(0x1161, 0x1176),
                                               *range(0x11A8, 0x11C3))))


@dataclass(frozen=True)
class SpeechCTCConfig:
    """An audio encoder, the characters its CTC head predicts, and the clip length."""

    encoder: AudioEncoderConfig
    alphabet: str = DEFAULT_ALPHABET  # output k >= 1 is alphabet[k - 1]; output 0 the blank
    seconds: float = 4.0  # every clip padded or cut to this (as the VLM's audio.seconds)

    def __post_init__(self) -> None:
        if not self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
            raise ConfigError("model.alphabet must be a non-empty string without repeats")
        if self.seconds <= 0:
            raise ConfigError(f"model.seconds must be > 0, got {self.seconds}")
        frames = dataclasses.replace(self.encoder.mel, chunk_seconds=self.seconds).chunk_frames
        if frames > self.encoder.max_frames:
            raise ConfigError(f"model.seconds = {self.seconds} gives {frames} mel frames, more "
                              f"than the encoder takes ({self.encoder.max_frames})")

    @property
    def mel(self) -> MelConfig:
        """The features: the encoder's log-mel, every clip padded or cut to ``seconds``."""
        return dataclasses.replace(self.encoder.mel, chunk_seconds=self.seconds)

    @property
    def classes(self) -> int:
        return len(self.alphabet) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechCTCConfig:
        data = dict(data)
        encoder = AudioEncoderConfig.from_dict(data.pop("encoder"))
        return from_dict(cls, {**data, "encoder": encoder}, "model")


class SpeechCTC(nn.Module):
    """``encoder`` (Whisper-style, what a VLM takes over) + ``head`` (per-frame characters)."""

    architecture = "speech_ctc"  # the name imagefm.json records
    media_key = "input_features"

    def __init__(self, config: SpeechCTCConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config.encoder)
        self.head = nn.Linear(config.encoder.d_model, config.classes)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, T] log-mel → logits [B, ceil(T / 2), 1 + len(alphabet)]."""
        return self.head(self.encoder(input_features))

    def transcript_ids(self, text: str) -> list[int]:
        return transcript_ids(text, self.config.alphabet)

    @torch.no_grad()
    def transcribe(self, input_features: torch.Tensor) -> list[str]:
        """Greedy CTC transcripts (NFC text) of a batch of features."""
        return [ids_to_text(ids, self.config.alphabet)
                for ids in greedy_decode(self(input_features))]

    def save_pretrained(self, directory: str | Path) -> None:
        """Save in imagefm format (``imagefm.load(directory)`` reads it back)."""
        save_model(self, directory)


def transcript_ids(text: str, alphabet: str) -> list[int]:
    """CTC targets of ``text``: 1 + the alphabet index of each kept character."""
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    return [index[c] for c in normalize_transcript(text) if c in index]


def ids_to_text(ids: Sequence[int], alphabet: str) -> str:
    """Targets back to text, jamo recombined into syllables (NFC)."""
    return unicodedata.normalize("NFC", "".join(alphabet[i - 1] for i in ids if i != BLANK))


def greedy_decode(logits: torch.Tensor, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Best path per row of [B, T, classes]: frame argmax, repeats merged, blanks dropped
    (a blank between two equal characters keeps both, as CTC defines)."""
    best = logits.argmax(dim=-1).tolist()
    out = []
    for row, frames in enumerate(best):
        frames = frames[: lengths[row]] if lengths is not None else frames
        ids, previous = [], BLANK
        for k in frames:
            if k != BLANK and k != previous:
                ids.append(k)
            previous = k
        out.append(ids)
    return out
