"""Audio decoding: any common file (or its bytes) -> float32 mono waveform at one sampling rate.

``load_audio`` is the one way audio enters the toolkit. It decodes WAV/FLAC/OGG (Vorbis, Opus)/MP3
and the other formats libsndfile reads (``soundfile``, which bundles libsndfile in its wheel),
averages channels to mono, resamples with ``soxr`` (high quality), cuts to ``max_seconds`` and
clips samples into [-1, 1]. Whatever goes wrong (a missing, truncated or corrupt file, no samples,
NaNs) is raised as one ``AudioError`` with a one-line reason, so loops can skip and count it
(``load_audio_or_skip`` with a ``SkipCounter``) instead of stopping a long job.

``soundfile`` and ``soxr`` are the optional ``audio`` extra; they are imported when first needed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from imagefm.checkpoint import atomic_write
from imagefm.data.formats import SkipCounter

AudioSource = str | Path | bytes


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, corrupt, empty or not finite."""


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AudioError("reading audio needs soundfile: pip install 'imagefm[audio]'") from exc
    return soundfile


def _describe(source: AudioSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform (soxr, high quality); returned as is if rates agree."""
    if orig_rate == target_rate or len(waveform) == 0:
        return waveform
    try:
        import soxr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AudioError("resampling audio needs soxr: pip install 'imagefm[audio]'") from exc
    return soxr.resample(waveform, orig_rate, target_rate, quality="HQ").astype(np.float32)


def load_audio(source: AudioSource, sampling_rate: int = 16000, *,
               max_seconds: float | None = None) -> np.ndarray:
    """Decode ``source`` (a path or the file's bytes) to float32 mono in [-1, 1] at
    ``sampling_rate``, keeping at most the first ``max_seconds`` (None: all of it).

    Raises ``AudioError`` (a ``ValueError``) naming the source and the reason.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    sf = _soundfile()
    name = _describe(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError(f"{name}: no such file")
    file = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with sf.SoundFile(file) as f:
            orig_rate = int(f.samplerate)
            # Read only what is kept: decoding an hour of audio to keep 10 s is wasted work.
            # (frames=-1 reads to the end; MP3 frame counts are estimates, so never rely on them.)
            frames = -1 if max_seconds is None else math.ceil(max_seconds * orig_rate)
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError, OSError) as exc:
        # One line: libsndfile's messages can span several.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise AudioError(f"{name}: cannot decode audio ({reason})") from exc
    if data.size == 0:
        raise AudioError(f"{name}: no audio samples")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: audio has NaN or infinite samples")
    wave = resample(np.ascontiguousarray(wave, dtype=np.float32), orig_rate, sampling_rate)
    if max_seconds is not None:  # resampling may add a sample or two at the edge
        wave = wave[: math.ceil(max_seconds * sampling_rate)]
    # Resampling overshoots near full-scale transients; the contract is [-1, 1].
    return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)


def load_audio_or_skip(source: AudioSource, skips: SkipCounter, sampling_rate: int = 16000, *,
                       max_seconds: float | None = None) -> np.ndarray | None:
    """``load_audio``, or None after counting the failure in ``skips`` (reason "bad_audio").

    Successful loads are counted too (``skips.ok()``), so the summary says "3 of 1200 skipped".
    """
    try:
        wave = load_audio(source, sampling_rate, max_seconds=max_seconds)
    except AudioError as exc:
        skips.add("bad_audio", str(exc))
        return None
    skips.ok()
    return wave


def write_wav(path: str | Path, waveform: np.ndarray, sampling_rate: int) -> Path:
    """Write a mono (or [frames, channels]) float waveform as 16-bit PCM WAV, atomically."""
    sf = _soundfile()
    data = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    return atomic_write(path, lambda tmp: sf.write(str(tmp), data, int(sampling_rate),
                                                   format="WAV", subtype="PCM_16"))
