"""Speech synthesis with espeak-ng (Debian ``espeak-ng``), and noise / reverberation augmentation.

    wave = synthesize("a red star", Voice("en", "en-us+f3", rate=160, pitch=60))   # 16 kHz
    wave = reverberate(add_noise(wave, snr_db=20, rng=rng), rng)

espeak-ng is a formant synthesiser: robotic, but it speaks English and Korean (Hangul) with
many speaker variants (``+f3``, ``+m4``...), rates and pitches, runs in milliseconds and ships with
Debian, so a speech–text dataset can be made from any caption text on the spot. The augmentation
(additive noise at a given SNR, a synthetic room impulse response) makes the clean synthetic
voices less trivially separable from real recordings.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from imagefm.data.audio import AudioError, load_audio

ESPEAK = "espeak-ng"
INSTALL = "install it with: sudo apt-get install -y espeak-ng"
LANGS = ("en", "ko")


class SpeechError(RuntimeError):
    """espeak-ng is missing or produced no audio for a text; the message says which."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: language, voice name (``en-us``, ``en-gb+m3``, ``ko+f2``), speaking rate
    in words per minute and pitch (0-99, espeak's default 50)."""

    lang: str
    name: str
    rate: int = 160
    pitch: int = 50

    def __post_init__(self) -> None:
        if not 80 <= self.rate <= 450:
            raise ValueError(f"Voice.rate must be in [80, 450] words per minute, got {self.rate}")
        if not 0 <= self.pitch <= 99:
            raise ValueError(f"Voice.pitch must be in [0, 99], got {self.pitch}")

    def with_prosody(self, rate: int, pitch: int) -> Voice:
        return Voice(self.lang, self.name, rate, pitch)


# Speaker variants per language (espeak-ng --voices=variant). The LAST voice of each list is kept
# for held-out (test) speech by the dataset builder (imagefm.data.speech_sets): the test split
# then has a speaker never heard in training.
_VOICES: dict[str, tuple[str, ...]] = {
    "en": ("en-us", "en-us+f3", "en-gb+m3", "en-gb-x-rp+f2", "en-us+m5", "en-gb-scotland+f4"),
    "ko": ("ko", "ko+f3", "ko+m3", "ko+f2", "ko+m5", "ko+f4"),
}


def voices(lang: str) -> list[Voice]:
    """The espeak-ng voices of ``lang`` ("en" or "ko") at default rate and pitch."""
    if lang not in _VOICES:
        raise ValueError(f"no voices for language {lang!r}; choose one of {', '.join(_VOICES)}")
    return [Voice(lang, name) for name in _VOICES[lang]]


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def synthesize(text: str, voice: Voice, sampling_rate: int = 16000) -> np.ndarray:
    """``text`` spoken by ``voice``: float32 mono in [-1, 1] at ``sampling_rate``.

    The text goes through stdin (a text starting with ``-`` is never read as an option); espeak's
    own WAV (22.05 kHz) is decoded and resampled by :func:`imagefm.data.audio.load_audio`.
    """
    if not espeak_available():
        raise SpeechError(f"{ESPEAK} is not installed: {INSTALL}")
    if not text.strip():
        raise SpeechError("cannot synthesize an empty text")
    command = [ESPEAK, "-v", voice.name, "-s", str(voice.rate), "-p", str(voice.pitch),
               "--stdout", "--stdin"]
    try:
        done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise SpeechError(f"{ESPEAK} failed for voice {voice.name}: {err}") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SpeechError(f"{ESPEAK} -v {voice.name} exited with {done.returncode}: "
                          f"{message[0] if message else 'no message'}")
    try:
        wave = load_audio(done.stdout, sampling_rate)
    except AudioError as err:
        raise SpeechError(f"{ESPEAK} -v {voice.name} produced no usable audio for "
                          f"{text[:40]!r}: {err}") from None
    if not np.any(np.abs(wave) > 1e-4):
        raise SpeechError(f"{ESPEAK} -v {voice.name} produced silence for {text[:40]!r}")
    return wave


# --- augmentation --------------------------------------------------------------------------------

def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator,
              colour: str = "white") -> np.ndarray:
    """``wave`` plus Gaussian noise at ``snr_db`` dB signal-to-noise ratio (signal power over
    noise power). ``colour="pink"`` shapes the noise as 1/f (more like room and fan noise)."""
    wave = np.asarray(wave, dtype=np.float32)
    noise = rng.standard_normal(len(wave)).astype(np.float32)
    if colour == "pink":
        spectrum = np.fft.rfft(noise)
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1.0))
        noise = np.fft.irfft(spectrum, n=len(wave)).astype(np.float32)
    elif colour != "white":
        raise ValueError(f"noise colour must be 'white' or 'pink', got {colour!r}")
    signal_power = float(np.mean(wave**2))
    noise_power = float(np.mean(noise**2)) or 1.0
    scale = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return np.clip(wave + scale * noise, -1.0, 1.0).astype(np.float32)


def room_impulse_response(rng: np.random.Generator, sampling_rate: int = 16000,
                          rt60: float | None = None, drr_db: float | None = None) -> np.ndarray:
    """A synthetic room impulse response: the direct sound, then exponentially decaying noise
    whose energy falls by 60 dB after ``rt60`` seconds (random in [0.15, 0.7] when None), at a
    direct-to-reverberant energy ratio of ``drr_db`` (random in [-3, 10] dB when None)."""
    rt60 = float(rng.uniform(0.15, 0.7)) if rt60 is None else rt60
    drr_db = float(rng.uniform(-3, 10)) if drr_db is None else drr_db
    length = max(int(rt60 * sampling_rate), 2)
    t = np.arange(length) / sampling_rate
    tail = rng.standard_normal(length) * np.exp(-6.9078 * t / rt60)  # ln(1000): -60 dB at rt60
    tail[0] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    response = tail
    response[0] = 1.0  # the direct path
    return (response / np.sqrt(np.sum(response**2))).astype(np.float32)


def reverberate(wave: np.ndarray, rng: np.random.Generator, sampling_rate: int = 16000,
                rt60: float | None = None, drr_db: float | None = None) -> np.ndarray:
    """``wave`` as heard in a reverberant room (convolved with :func:`room_impulse_response`),
    cut to its own length and peak-normalised to the input's peak."""
    wave = np.asarray(wave, dtype=np.float32)
    response = room_impulse_response(rng, sampling_rate, rt60, drr_db)
    n = len(wave) + len(response) - 1
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(response, size), size)[:len(wave)]
    peak, wet_peak = float(np.max(np.abs(wave))), float(np.max(np.abs(wet)))
    if wet_peak > 0:
        wet = wet * (peak / wet_peak)
    return wet.astype(np.float32)


def augment(wave: np.ndarray, rng: np.random.Generator, sampling_rate: int = 16000,
            p_reverb: float = 0.5, p_noise: float = 0.7, snr_db: tuple[float, float] = (5, 30)
            ) -> np.ndarray:
    """Random reverberation (probability ``p_reverb``), then random white or pink noise
    (``p_noise``) at an SNR drawn from ``snr_db``."""
    if rng.random() < p_reverb:
        wave = reverberate(wave, rng, sampling_rate)
    if rng.random() < p_noise:
        colour = "pink" if rng.random() < 0.5 else "white"
        wave = add_noise(wave, float(rng.uniform(*snr_db)), rng, colour)
    return wave
