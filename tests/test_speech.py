"""The speech data engine: espeak-ng synthesis, augmentation, speech datasets, Tux Paint
narrations. Synthesis tests skip where espeak-ng is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from imagefm.data import speech  # noqa: E402
from imagefm.data.formats import SkipCounter  # noqa: E402
from imagefm.data.recipes.base import split_for  # noqa: E402
from imagefm.data.speech import (  # noqa: E402
    SpeechError,
    Voice,
    add_noise,
    espeak_available,
    reverberate,
    room_impulse_response,
    synthesize,
    voices,
)
from imagefm.data.speech_sets import (  # noqa: E402
    SynthesisPlan,
    keyword_classes,
    narration_files,
    read_speech_dataset,
    synthetic_speech,
    tuxpaint_narrations,
    write_speech_dataset,
)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
STAMPS = Path("/usr/share/tuxpaint/stamps")


@needs_espeak
def test_synthesis_rate_duration_and_range():
    voice = voices("en")[0]
    wave = synthesize("a red star on the left", voice)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.8 < len(wave) / 16000 < 4.0  # a short phrase at 160 words per minute
    assert np.abs(wave).max() <= 1.0 and np.abs(wave).max() > 0.1
    # The same speech at 8 kHz has half the samples.
    assert abs(len(synthesize("a red star on the left", voice, 8000)) * 2 - len(wave)) <= 4
    # More words take longer; a faster rate takes less time.
    longer = synthesize("a red star on the left of a big blue circle", voice)
    faster = synthesize("a red star on the left", voice.with_prosody(300, 50))
    assert len(longer) > 1.3 * len(wave) and len(faster) < 0.75 * len(wave)


@needs_espeak
def test_voices_differ():
    en = voices("en")
    assert len(en) >= 4 and len({v.name for v in en}) == len(en)
    waves = [synthesize("hello there", v) for v in en[:3]]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        n = min(len(waves[a]), len(waves[b]))
        assert not np.allclose(waves[a][:n], waves[b][:n], atol=1e-2)
    low, high = (synthesize("hello there", en[0].with_prosody(160, p)) for p in (10, 90))
    # A higher pitch moves the spectrum's centroid up.
    def centroid(w):
        power = np.abs(np.fft.rfft(w)) ** 2
        return float((np.fft.rfftfreq(len(w), 1 / 16000) * power).sum() / power.sum())
    assert centroid(high) > centroid(low)


@needs_espeak
def test_korean_voice_speaks_hangul():
    ko = voices("ko")
    assert len(ko) >= 4 and all(v.lang == "ko" for v in ko)
    short = synthesize("별", ko[0])
    sentence = synthesize("빨간 별이 파란 원의 왼쪽에 있어요", ko[0])
    assert len(short) / 16000 > 0.2
    assert len(sentence) > 3 * len(short)  # the Hangul is read, not skipped
    assert np.abs(sentence).max() > 0.1


def test_missing_espeak_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    assert not espeak_available()
    with pytest.raises(SpeechError, match="apt-get install -y espeak-ng"):
        synthesize("hello", Voice("en", "en-us"))
    with pytest.raises(ValueError, match="pitch"):
        Voice("en", "en-us", 160, 120)


def test_add_noise_hits_the_snr():
    rng = np.random.default_rng(0)
    clean = (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32)
    for snr, colour in ((20.0, "white"), (5.0, "pink")):
        noisy = add_noise(clean, snr, rng, colour)
        noise = noisy - clean
        measured = 10 * np.log10(np.mean(clean**2) / np.mean(noise**2))
        assert abs(measured - snr) < 0.3, (colour, measured)


def test_reverberation_decays_and_keeps_length():
    rng = np.random.default_rng(0)
    response = room_impulse_response(rng, 16000, rt60=0.4, drr_db=3.0)
    assert len(response) == 6400 and response[0] == np.abs(response).max()
    early, late = np.sum(response[1:3200] ** 2), np.sum(response[3200:] ** 2)
    assert late < 0.01 * early  # -30 dB by half of rt60
    assert np.isclose(10 * np.log10(response[0] ** 2 / np.sum(response[1:] ** 2)), 3.0, atol=1e-3)
    wave = np.zeros(16000, np.float32)
    wave[1000] = 0.5
    wet = reverberate(wave, rng, 16000, rt60=0.4, drr_db=0.0)
    assert len(wet) == len(wave) and np.isclose(np.abs(wet).max(), 0.5)
    assert np.count_nonzero(np.abs(wet[1001:]) > 1e-4) > 1000  # the tail rings on


@needs_espeak
def test_synthetic_dataset_splits_voices_and_transcripts(tmp_path):
    plan = SynthesisPlan(keyword_repeats={"train": 1},
                         scene_captions={"train": 2, "test": 2}, tuxpaint_repeats=0)
    skips = SkipCounter()
    manifest = write_speech_dataset(synthetic_speech(plan, skips, seed=3, tuxpaint_root=None),
                                    tmp_path, name="t", skips=skips, classes=keyword_classes())
    classes = keyword_classes()
    assert len(classes["en"]) == len(classes["ko"]) == 21
    assert manifest["counts"]["splits"] == {"train": 21 * 2 + 2 * 2, "test": 2 * 2}
    assert json.loads((tmp_path / "manifest.json").read_text())["classes"] == classes
    train, test = (read_speech_dataset(tmp_path, s) for s in ("train", "test"))
    held_out_voices = {voices(lang)[-1].name for lang in ("en", "ko")}
    assert not {i.meta["voice"] for i in train} & held_out_voices
    for item in train + test:
        info = sf.info(item.audio)
        assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.2
        assert item.captions[0].text == item.text and item.captions[0].lang == item.lang
        assert {c.lang for c in item.captions} == {"en", "ko"}
        assert item.meta["voice"] in {v.name for v in voices(item.lang)}
        if item.label is not None:
            assert item.text == classes[item.lang][item.label]
    korean = [i for i in train if i.lang == "ko"]
    assert korean and all(any("\uac00" <= ch <= "\ud7a3" for ch in i.text) for i in korean)
    # The same seed gives the same texts and voices.
    small = SynthesisPlan(keyword_repeats={}, scene_captions={"train": 2, "test": 1})
    first, again = ([(i.text, i.meta["voice"], len(w)) for i, w in
                     synthetic_speech(small, SkipCounter(), seed=3, tuxpaint_root=None)]
                    for _ in range(2))
    assert first == again and len(first) == 6


def test_narration_names(tmp_path):
    for name in ("lion_desc.ogg", "lion_desc_fr.ogg", "cat_desc_da.ogg.ogg", "cat_desc_pt_BR.ogg",
                 "lion.ogg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = {(p.name, stem, lang) for p, stem, lang in narration_files(tmp_path)}
    assert found == {("lion_desc.ogg", "lion", "en"), ("lion_desc_fr.ogg", "lion", "fr"),
                     ("cat_desc_da.ogg.ogg", "cat", "da"), ("cat_desc_pt_BR.ogg", "cat", "pt-BR")}


@pytest.mark.skipif(not STAMPS.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_tuxpaint_narrations_are_real_english_speech():
    skips = SkipCounter()
    items = list(tuxpaint_narrations(skips, STAMPS, langs=["en"]))
    assert len(items) > 40
    assert not any(lang == "ko" for _, _, lang in narration_files(STAMPS))  # none in Korean
    for item, wave in items:
        assert item.lang == "en" and item.captions[0].lang == "en"
        assert item.split == split_for(item.meta["stamp"])
        assert 0.3 < len(wave) / 16000 <= 15.0
    lion = [item for item, _ in items if item.meta["stamp"] == "bee"]
    assert lion and lion[0].split == "test"  # a reserved stamp stays in the test split
    assert {c.lang for c in lion[0].captions} == {"en", "ko"}


@pytest.mark.skipif(not STAMPS.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_prepare_command_writes_and_replaces(tmp_path):
    import typer
    from typer.testing import CliRunner

    from imagefm.cli import speech as speech_cli

    app = typer.Typer()
    speech_cli.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "narrations"
    command = ["speech", "prepare", "tuxpaint", "--out", str(out), "--langs", "nl"]
    assert CliRunner().invoke(app, command).exit_code == 0
    dutch = read_speech_dataset(out)
    assert dutch and all(i.lang == "nl" and i.source == "tuxpaint-narration" for i in dutch)
    assert CliRunner().invoke(app, command).exit_code == 2  # refuses to overwrite
    command[-1] = "ml"
    assert CliRunner().invoke(app, [*command, "--overwrite"]).exit_code == 0
    malayalam = read_speech_dataset(out)
    assert malayalam and {i.lang for i in malayalam} == {"ml"}
    assert len(list((out / "audio").glob("*.wav"))) == len(malayalam)  # no stale audio
