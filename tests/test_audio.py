"""Audio decoding (imagefm.data.audio) and Whisper log-mel features
(imagefm.models.audio_features): every format through libsndfile, resampling, mono, limits, bad
files skipped and counted, and features equal to transformers' WhisperFeatureExtractor on real
speech (the Tux Paint narrations)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from imagefm.data.audio import (  # noqa: E402
    AudioError,
    load_audio,
    load_audio_or_skip,
    resample,
    write_wav,
)
from imagefm.data.formats import SkipCounter  # noqa: E402
from imagefm.models.audio_features import MelConfig, log_mel, mel_filterbank  # noqa: E402

NARRATIONS = sorted(Path("/usr/share/tuxpaint/stamps").glob("animals/**/*_desc.ogg"))


def _tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _encode(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# --- decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"),
                                         ("OGG", "VORBIS"), ("OGG", "OPUS"),
                                         ("MP3", "MPEG_LAYER_III")])
def test_formats_decode_resample_and_downmix(tmp_path: Path, fmt: str, subtype: str) -> None:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    rate = 48000 if subtype == "OPUS" else 22050  # Opus only runs at 8/12/16/24/48 kHz
    left, right = _tone(440, rate, 1.5), _tone(440, rate, 1.5, amplitude=0.1)
    stereo = np.stack([left, right], axis=1)
    data = _encode(stereo, rate, fmt, subtype)
    path = tmp_path / f"tone.{fmt.lower()}"
    path.write_bytes(data)
    for source in (path, str(path), data):
        wave = load_audio(source, 16000)
        assert wave.dtype == np.float32 and wave.ndim == 1
        # Lossy codecs pad the start and end (MP3 by about a frame): a few hundredths of a second.
        assert abs(len(wave) / 16000 - 1.5) < 0.08
        assert abs(_peak_hz(wave, 16000) - 440) < 3
        middle = wave[4000:20000]
        assert abs(np.abs(middle).max() - 0.3) < 0.03  # the mean of the channels' 0.5 and 0.1
    if subtype == "PCM_16":  # lossless: the samples themselves
        expected = resample((left + right) / 2, rate, 16000)
        np.testing.assert_allclose(load_audio(data, 16000), expected, atol=2e-4)


def test_resampling_keeps_time_and_pitch(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", _tone(1000, 8000, 2.0), 8000)
    wave = load_audio(tmp_path / "a.wav", 16000)
    assert len(wave) == 32000
    assert abs(_peak_hz(wave, 16000) - 1000) < 2
    same = load_audio(tmp_path / "a.wav", 8000)
    np.testing.assert_allclose(same, _tone(1000, 8000, 2.0), atol=1e-4)  # 16-bit PCM


def test_max_seconds_and_sample_clipping(tmp_path: Path) -> None:
    loud = _tone(300, 16000, 3.0, amplitude=1.6)
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")  # float WAV keeps 1.6
    wave = load_audio(tmp_path / "loud.wav", 16000, max_seconds=1.25)
    assert len(wave) == 20000
    assert wave.max() == 1.0 and wave.min() == -1.0
    np.testing.assert_allclose(wave, np.clip(loud[:20000], -1, 1), atol=1e-6)
    resampled = load_audio(tmp_path / "loud.wav", 8000, max_seconds=0.5)
    assert len(resampled) == 4000 and np.abs(resampled).max() <= 1.0
    with pytest.raises(ValueError, match="max_seconds"):
        load_audio(tmp_path / "loud.wav", max_seconds=0)


def test_bad_audio_raises_one_line_and_is_counted(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    write_wav(good, _tone(440, 16000, 0.5), 16000)
    truncated = tmp_path / "truncated.ogg"
    truncated.write_bytes(_encode(_tone(440, 16000, 1.0), 16000, "OGG", "VORBIS")[:120])
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, subtype="FLOAT")
    (tmp_path / "zero.mp3").write_bytes(b"")
    bad = [b"not audio at all" * 50, b"RIFF\x00\x00\x00\x00WAVEfmt ", truncated, empty, nan,
           tmp_path / "zero.mp3", tmp_path / "missing.flac"]
    for source in bad:
        with pytest.raises(AudioError) as err:
            load_audio(source)
        assert "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)
    assert "no such file" in _message(tmp_path / "missing.flac")
    assert "no audio samples" in _message(empty)
    assert "NaN" in _message(nan)

    skips = SkipCounter()
    loaded = [load_audio_or_skip(s, skips) for s in [good, *bad, good]]
    assert [w is not None for w in loaded] == [True] + [False] * len(bad) + [True]
    assert skips.seen == len(bad) + 2 and skips.skipped == {"bad_audio": len(bad)}
    assert skips.examples["bad_audio"][0].startswith("<800 bytes>: cannot decode audio")
    assert len(skips.examples["bad_audio"]) == 3  # the first few, to name in a summary


def _message(source: object) -> str:
    with pytest.raises(AudioError) as err:
        load_audio(source)  # type: ignore[arg-type]
    return str(err.value)


def test_write_wav_is_atomic_and_round_trips(tmp_path: Path) -> None:
    wave = _tone(220, 16000, 0.25)
    path = write_wav(tmp_path / "sub" / "out.wav", wave, 16000)
    assert [p.name for p in path.parent.iterdir()] == ["out.wav"]  # no temporary file left
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    np.testing.assert_allclose(load_audio(path), wave, atol=1e-4)


# --- log-mel features ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    if len(NARRATIONS) < 3:
        pytest.skip("Tux Paint narrations not installed (apt-get install tuxpaint-stamps-default)")
    return [load_audio(p) for p in NARRATIONS[:3]]


@pytest.fixture(scope="module")
def extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor()


def test_mel_equals_whisper_feature_extractor_on_real_speech(speech, extractor) -> None:
    assert all(0.3 < len(w) / 16000 < 30 for w in speech)
    reference = extractor(speech, sampling_rate=16000, return_tensors="np",
                          return_attention_mask=True)
    features, mask = log_mel(speech, MelConfig())
    assert features.shape == (3, 80, 3000) and features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), reference.input_features, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(mask.numpy(), reference.attention_mask.astype(bool))
    # The filterbank itself (Slaney scale and normalisation) against transformers'.
    np.testing.assert_allclose(mel_filterbank(16000, 400, 80).numpy(), extractor.mel_filters,
                               atol=1e-7, rtol=1e-6)
    # A tensor batch and a waveform longer than the chunk (cut at 30 s, as Whisper).
    long = np.tile(speech[0], 40)
    from_tensor, _ = log_mel(torch.from_numpy(long)[None], MelConfig())
    expected = extractor(long, sampling_rate=16000, return_tensors="np").input_features
    np.testing.assert_allclose(from_tensor.numpy(), expected, atol=1e-5, rtol=0)


def test_variable_length_mel_keeps_whisper_values_without_the_padding(speech, extractor) -> None:
    config = MelConfig(chunk_seconds=None)
    features, mask = log_mel(speech, config)
    lengths = [config.frames_for(len(w)) for w in speech]
    assert features.shape == (3, 80, max(lengths))
    assert mask.sum(dim=1).tolist() == lengths
    reference = extractor(speech, sampling_rate=16000, return_tensors="np").input_features
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(features[i, :, :n].numpy(), reference[i, :, :n], atol=1e-5,
                                   rtol=0)
        # Padding holds the example's floor, and an example is the same alone as in a batch.
        floor = features[i, :, :n].min()
        assert torch.all(features[i, :, n:] == floor)
        alone, alone_mask = log_mel([speech[i]], config)
        assert alone.shape[2] == n and bool(alone_mask.all())
        torch.testing.assert_close(alone[0], features[i, :, :n], atol=0, rtol=0)


def test_silent_and_tiny_audio_give_finite_features() -> None:
    for config in (MelConfig(), MelConfig(chunk_seconds=None)):
        features, mask = log_mel([np.zeros(8000, np.float32), np.zeros(1, np.float32),
                                  np.zeros(0, np.float32)], config)
        assert torch.isfinite(features).all()
        # Silence: log10(1e-10) everywhere, clamped at max - 8 = itself, then (x + 4) / 4.
        assert torch.allclose(features, torch.full_like(features, -1.5))
        assert mask.sum(dim=1).tolist()[:2] == [50, 1]
    with pytest.raises(ValueError, match="mono"):
        log_mel([np.zeros((2, 100), np.float32)], MelConfig())
    with pytest.raises(ValueError):
        MelConfig(chunk_seconds=0)
    assert MelConfig.from_dict(MelConfig(chunk_seconds=None).to_dict()).chunk_seconds is None
