"""The Whisper-compatible audio tower: parity with transformers' WhisperEncoder on tiny random
checkpoints of odd shapes (loaded through imagefm.load, by path and by Hub id), strict key maps,
short inputs with a frame mask, and our own save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.checkpoint import CheckpointError
from imagefm.config import ConfigError
from imagefm.convert.keymap import KeyMapError
from imagefm.models.audio_features import MelConfig, log_mel
from imagefm.models.whisper_encoder import (
    AudioEncoder,
    AudioEncoderConfig,
    audio_preset,
    sinusoids,
)

transformers = pytest.importorskip("transformers")

# Odd on purpose: 3 heads of 12, an FFN width that is no multiple of anything, 37 positions
# (74 frames), 2 layers.
SHAPES = dict(d_model=36, encoder_layers=2, encoder_attention_heads=3, encoder_ffn_dim=52,
              num_mel_bins=80, max_source_positions=37)


def _whisper_config(**overrides) -> object:
    shapes = {**SHAPES, **overrides}
    return transformers.WhisperConfig(
        **shapes, decoder_layers=1, decoder_attention_heads=3, decoder_ffn_dim=20,
        vocab_size=64, max_target_positions=16, pad_token_id=1, bos_token_id=2,
        eos_token_id=2, decoder_start_token_id=3)


def _reference(cls_name: str = "WhisperModel", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(_whisper_config(**overrides)).eval()
    with torch.no_grad():  # random, not the zero-initialised biases, so every weight matters
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0, 0.2)
    return model


def _hf_encoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_encoder() if hasattr(model, "get_encoder") else model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    reference = _reference("WhisperForConditionalGeneration")
    directory = tmp_path_factory.mktemp("whisper")
    reference.save_pretrained(directory)
    return reference, directory


def test_whisper_encoder_parity_full_chunk(saved) -> None:
    reference, directory = saved
    ours = imagefm.load(directory)
    assert isinstance(ours, AudioEncoder)
    assert ours.config.d_model == 36 and ours.config.max_source_positions == 37
    features = torch.randn(2, 80, 74)  # the whole chunk: 2 x max_source_positions frames
    with torch.no_grad():
        expected = _hf_encoder(reference)(features).last_hidden_state
        got = ours(features)
    assert got.shape == (2, 37, 36)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frames", [40, 26])
def test_whisper_encoder_parity_short_input(saved, frames: int) -> None:
    """transformers refuses anything but the full chunk; the reference for T frames is the same
    checkpoint with its position table cut to the first T / 2 rows. (An odd T has no reference:
    its last output sees the zero the conv pads with, which no input frame reproduces.)"""
    reference, directory = saved
    ours = imagefm.load(directory)
    positions = frames // 2
    short = _reference("WhisperModel", max_source_positions=positions)
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items()
             if k.startswith("model.encoder.")}
    state["encoder.embed_positions.weight"] = state["encoder.embed_positions.weight"][:positions]
    short.load_state_dict(state, strict=False)
    features = torch.randn(2, 80, frames)
    with torch.no_grad():
        expected = short.encoder(features).last_hidden_state
        got = ours(features)
    assert got.shape == (2, positions, 36)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [20, 21])
def test_frame_mask_makes_padding_invisible(saved, length: int) -> None:
    """A clip padded in a batch gives the same real outputs as alone, without a mask."""
    _, directory = saved
    ours = imagefm.load(directory)
    torch.manual_seed(1)
    alone = torch.randn(1, 80, length)
    batch = torch.randn(2, 80, 50)
    batch[0, :, :length] = alone[0]  # the rest of row 0 is padding of any value
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, :length] = True
    mask[1] = True
    with torch.no_grad():
        single = ours(alone)
        batched = ours(batch, mask)
        unmasked = ours(batch)
    keep = ours.output_mask(mask)
    real = (length + 1) // 2
    assert keep.shape == (2, 25) and keep[0].sum() == real and keep[1].all()
    assert single.shape == (1, real, 36)
    torch.testing.assert_close(batched[0, :real], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], unmasked[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[0, :real], single[0], atol=1e-3)  # the mask mattered


@pytest.mark.parametrize("cls_name,prefix", [("WhisperModel", "encoder."),
                                             ("WhisperEncoder", "")])
def test_other_whisper_classes_load(tmp_path: Path, cls_name: str, prefix: str) -> None:
    if cls_name == "WhisperEncoder":
        reference = _reference("WhisperModel").encoder
        reference.config.architectures = ["WhisperEncoder"]
    else:
        reference = _reference(cls_name)
    reference.save_pretrained(tmp_path)
    from imagefm.checkpoint import load_state_dict_file

    keys = list(load_state_dict_file(tmp_path / "model.safetensors"))
    assert f"{prefix}conv1.weight" in keys
    ours = imagefm.load(tmp_path)
    features = torch.randn(1, 80, 74)
    with torch.no_grad():
        torch.testing.assert_close(ours(features), _hf_encoder(reference)(features)
                                   .last_hidden_state, atol=1e-4, rtol=1e-4)


def test_whisper_key_map_is_strict(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    reference = _reference("WhisperModel")
    reference.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layers.0.self_attn.k_proj.bias"] = torch.zeros(36)  # Whisper has none
    del state["encoder.layers.1.fc2.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyMapError) as err:
        imagefm.load(tmp_path)
    message = str(err.value)
    assert "encoder.layers.0.self_attn.k_proj.bias" in message
    assert "transformer.blocks.1.mlp.fc2.bias" in message


def test_whisper_features_come_from_the_preprocessor(saved, tmp_path: Path) -> None:
    _, directory = saved
    model, mel = imagefm.load(directory, processor=True)
    assert mel == MelConfig() and model.config.mel == mel  # no preprocessor file: the defaults
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    extractor = transformers.WhisperFeatureExtractor(chunk_length=10, hop_length=200)
    extractor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["hop_length"] == 200
    mel = imagefm.load_processor(tmp_path)
    assert (mel.hop_length, mel.chunk_seconds, mel.n_mels) == (200, 10.0, 80)


def test_whisper_loads_by_hub_id(saved, hub) -> None:
    _, directory = saved
    hub.add_repo("org/whisper-odd", directory)
    ours = imagefm.load("org/whisper-odd")
    expected = imagefm.load(directory)
    assert isinstance(ours, AudioEncoder) and ours.config == expected.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), expected.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert "model.safetensors" in hub.downloaded("org/whisper-odd")
    hub.clear_log()
    with hub.offline(stop_server=False):  # then from the cache, with no request
        again, mel = imagefm.load("hf-hub:org/whisper-odd", processor=True)
    assert hub.requests == [] and mel == expected.config.mel
    assert isinstance(again, AudioEncoder)


def test_imagefm_format_round_trip(tmp_path: Path) -> None:
    config = audio_preset("audio-tiny", encoder_layers=1, d_model=48, encoder_attention_heads=4,
                          encoder_ffn_dim=64)
    model = AudioEncoder(config).eval()
    model.save_pretrained(tmp_path)
    loaded = imagefm.load(tmp_path)
    assert isinstance(loaded, AudioEncoder) and loaded.config == config
    assert loaded.config.mel.chunk_seconds is None
    waves = [torch.randn(16000).numpy() * 0.1, torch.randn(5000).numpy() * 0.1]
    features, mask = log_mel(waves, config.mel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features, mask), model(features, mask))
    assert "k_proj.bias" not in " ".join(loaded.state_dict())


def test_encoder_trains_and_refuses_bad_input() -> None:
    config = AudioEncoderConfig(d_model=24, encoder_layers=1, encoder_attention_heads=2,
                                encoder_ffn_dim=32, max_source_positions=8)
    model = AudioEncoder(config)
    assert not model.embed_positions.weight.requires_grad  # fixed sinusoids, as Whisper
    torch.testing.assert_close(model.embed_positions.weight, sinusoids(8, 24))
    features = torch.randn(2, 80, 16, requires_grad=True)
    model(features).square().mean().backward()
    assert model.conv1.weight.grad is not None and features.grad is not None
    assert "bias" not in dict(model.transformer.blocks[0].attn.k_proj.named_parameters())
    with pytest.raises(ValueError, match="longer than this encoder takes"):
        model(torch.randn(1, 80, 17))
    with pytest.raises(ValueError, match="mel bins"):
        model(torch.randn(1, 64, 16))
    with pytest.raises(ConfigError, match="n_mels"):
        AudioEncoderConfig(num_mel_bins=128)
    with pytest.raises(ConfigError, match="unknown key"):
        AudioEncoderConfig.from_dict({"d_model": 24, "width": 3})
    with pytest.raises(ConfigError, match="audio preset"):
        audio_preset("whisper-huge-v9")


def test_non_whisper_config_is_refused(tmp_path: Path) -> None:
    from imagefm.convert.whisper import config_from_whisper

    with pytest.raises(CheckpointError, match="model_type"):
        config_from_whisper({"model_type": "wav2vec2"})
    cfg = config_from_whisper({"model_type": "whisper"})
    assert cfg == audio_preset("whisper-tiny")


def test_real_speech_end_to_end_matches_transformers(tmp_path: Path) -> None:
    """Tux Paint narration -> (WhisperFeatureExtractor -> WhisperEncoder) vs (log_mel -> ours),
    on the full 3000-frame chunk of a checkpoint with Whisper's 1500 positions."""
    pytest.importorskip("soundfile")
    from imagefm.data.audio import load_audio

    narrations = sorted(Path("/usr/share/tuxpaint/stamps").glob("animals/**/*_desc.ogg"))
    if not narrations:
        pytest.skip("Tux Paint narrations not installed")
    waves = [load_audio(p) for p in narrations[:2]]
    reference = _reference("WhisperModel", max_source_positions=1500)
    reference.save_pretrained(tmp_path)
    ours = imagefm.load(tmp_path)
    extractor = transformers.WhisperFeatureExtractor()
    hf_features = extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
    features, _ = log_mel(waves, ours.config.mel)
    with torch.no_grad():
        expected = reference.encoder(hf_features).last_hidden_state
        got = ours(features)
    assert got.shape == (2, 1500, 36)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
