"""Whisper log-mel features, computed in torch: waveforms -> [B, n_mels, T] plus a frame mask.

The recipe is Whisper's (and transformers' ``WhisperFeatureExtractor``, which the tests compare
against on real speech):

1. pad (zeros) or cut each waveform to ``chunk_seconds`` (30 s for Whisper checkpoints);
2. STFT: periodic Hann window of ``n_fft`` samples, hop ``hop_length``, frames centred on
   ``t * hop`` with reflect padding at the ends; the last frame is dropped, so T = samples / hop;
3. power spectrum through a Slaney-scale, Slaney-normalised triangular mel filterbank (as librosa's
   default and Whisper's ``mel_filters.npz``), 0 Hz .. sampling_rate / 2;
4. log10 (floor 1e-10), clamp to (max over the example - 8), then (x + 4) / 4.

``chunk_seconds=None`` skips the padding to 30 s: an example gets ceil(samples / hop) frames (the
frames a 30 s chunk would mark real), batches are padded to the longest, and ``frame_mask`` says
which frames are real. Each example's real frames equal Whisper's values for the same audio (the
waveform is followed by zeros, as in a padded chunk) and do not depend on what else is in the
batch; padded frames hold what zeros get in a padded chunk (the example's floor). Training on a
CPU cannot afford 3000 frames for a one-second clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from imagefm.config import ConfigError, from_dict


@dataclass(frozen=True)
class MelConfig:
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    chunk_seconds: float | None = 30.0  # None: frames follow the audio length (see module doc)

    def __post_init__(self) -> None:
        if self.chunk_seconds is not None and self.chunk_seconds <= 0:
            raise ConfigError(f"MelConfig.chunk_seconds must be positive or None, "
                             f"got {self.chunk_seconds}")

    @property
    def chunk_frames(self) -> int | None:
        """Frames per padded chunk (3000 for Whisper), None for variable length."""
        if self.chunk_seconds is None:
            return None
        return round(self.chunk_seconds * self.sampling_rate) // self.hop_length

    def frames_for(self, num_samples: int) -> int:
        """How many frames are real for a waveform of ``num_samples`` (at least 1)."""
        frames = max(1, math.ceil(num_samples / self.hop_length))
        chunk = self.chunk_frames
        return frames if chunk is None else min(frames, chunk)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelConfig:
        return from_dict(cls, data, "MelConfig")


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    log_step = 27.0 / math.log(6.4)
    linear = 3.0 * hz / 200.0
    return torch.where(hz >= 1000.0, 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) * log_step,
                       linear)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel >= 15.0, 1000.0 * torch.exp(log_step * (mel - 15.0)), 200.0 * mel / 3.0)


@lru_cache(maxsize=8)
def mel_filterbank(sampling_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular filters [n_fft // 2 + 1, n_mels] (float64), each scaled to unit area
    (Slaney normalisation: 2 / bandwidth)."""
    fft_freqs = torch.linspace(0, sampling_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(float(_hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                               float(_hz_to_mel(torch.tensor(sampling_rate / 2,
                                                             dtype=torch.float64))),
                               n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mel_edges)
    widths = edges.diff()
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = torch.minimum(down, up).clamp(min=0.0)
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def _as_batch(waveforms: Sequence[np.ndarray] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(waveforms, torch.Tensor):
        rows = waveforms[None] if waveforms.dim() == 1 else waveforms
        if rows.dim() != 2:
            raise ValueError(f"waveforms must be [B, samples] or [samples], got "
                             f"{tuple(waveforms.shape)}")
        return [r.float() for r in rows]
    out = []
    for w in waveforms:
        t = torch.as_tensor(np.asarray(w, dtype=np.float32))
        if t.dim() != 1:
            raise ValueError(f"each waveform must be mono (1-D), got shape {tuple(t.shape)}")
        out.append(t)
    if not out:
        raise ValueError("log_mel needs at least one waveform")
    return out


def log_mel(waveforms: Sequence[np.ndarray] | torch.Tensor,
            config: MelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features [B, n_mels, T] (float32) and ``frame_mask`` [B, T] (True = real frame).

    ``waveforms``: float mono waveforms at ``config.sampling_rate`` (a list of arrays of any
    lengths, or a [B, samples] tensor). With ``chunk_seconds`` set, T is fixed (3000 for 30 s)
    and the values equal ``WhisperFeatureExtractor``'s.
    """
    rows = _as_batch(waveforms)
    hop = config.hop_length
    chunk = config.chunk_frames
    lengths = [len(r) for r in rows]
    frames = [config.frames_for(n) for n in lengths]
    if chunk is not None:
        num_frames = chunk
        total = chunk * hop
    else:
        num_frames = max(frames)
        # Zeros run at least half a window past the last real frame's centre, so no real frame
        # sees the reflect padding at the end: its values are those of a zero-padded chunk.
        total = num_frames * hop + config.n_fft // 2
    batch = torch.zeros(len(rows), total, dtype=torch.float32, device=rows[0].device)
    for i, row in enumerate(rows):
        n = min(len(row), total if chunk is None else chunk * hop)
        batch[i, :n] = row[:n]
    window = torch.hann_window(config.n_fft, device=batch.device)
    stft = torch.stft(batch, config.n_fft, hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = (stft[..., :num_frames].abs() ** 2).contiguous()  # [B, freqs, T]
    filters = mel_filterbank(config.sampling_rate, config.n_fft, config.n_mels)
    mel = filters.to(device=batch.device, dtype=torch.float32).T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    mask = torch.arange(num_frames, device=batch.device)[None, :] < torch.tensor(
        frames, device=batch.device)[:, None]
    if chunk is not None:  # Whisper: the maximum over the whole padded chunk
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
    else:  # only real frames, so padding for a batch never changes an example's values
        peak = log_spec.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=(1, 2),
                                                                           keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    if chunk is None:  # what zeros would give in a padded chunk: log10(1e-10), clamped
        log_spec = torch.where(mask[:, None, :], log_spec, peak.clamp(min=-2.0) - 8.0)
    return (log_spec + 4.0) / 4.0, mask
