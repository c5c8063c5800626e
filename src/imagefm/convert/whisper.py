"""Hugging Face Whisper checkpoints (``model_type: "whisper"``) -> our :class:`AudioEncoder`.

Reads the encoder of a ``WhisperModel`` (keys ``encoder.*``), a
``WhisperForConditionalGeneration`` (``model.encoder.*``) or a bare ``WhisperEncoder``
(``conv1.weight`` ...); the decoder and the LM head, which an audio tower does not use, are
skipped by name without being read. Any other key, a missing encoder weight or a wrong shape
fails the load (``strict``), with the full report.

Shapes come from ``config.json`` (transformers' ``WhisperConfig`` defaults, those of
whisper-tiny, for the fields it leaves out) and the features from ``preprocessor_config.json``
(``WhisperFeatureExtractor``: n_mels, sampling rate, hop, n_fft, 30 s chunks), so
``log_mel(waves, model.config.mel)`` gives the inputs the checkpoint expects.
``transformers`` is not imported. Checked by tests/test_whisper_encoder.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, empty_parameters
from imagefm.config import ConfigError
from imagefm.convert.hf import (
    _ACT_FROM_HF,
    CONFIG_FILE,
    _read_json,
    read_hf_weights,
)
from imagefm.convert.hf_card import PREPROCESSOR_FILE
from imagefm.convert.keymap import KeyMap, load_with_key_map, rule
from imagefm.models.audio_features import MelConfig
from imagefm.models.whisper_encoder import AudioEncoder, AudioEncoderConfig

MODEL_TYPE = "whisper"

# transformers' WhisperConfig defaults for the encoder (whisper-tiny's shapes).
_CONFIG_DEFAULTS: dict[str, Any] = dict(
    num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
    encoder_ffn_dim=1536, max_source_positions=1500, activation_function="gelu")
# WhisperFeatureExtractor defaults.
_FEATURE_DEFAULTS: dict[str, Any] = dict(
    feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)

# Where the encoder sits in each class's state dict, and the parts of the checkpoint an audio tower
# does not use (skipped by prefix, never read).
_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
_UNUSED_PREFIXES = ("model.decoder.", "decoder.", "proj_out.")


def _key_map(prefix: str) -> KeyMap:
    """Whisper's encoder names (under ``prefix``) -> ours; the key projection has no bias."""
    block = "transformer.blocks.{i}."
    layer = prefix + "layers.{i}."
    rules = [rule(prefix + name, name) for name in (
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "embed_positions.weight",
        "layer_norm.weight", "layer_norm.bias")]
    pairs = [("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"),
             ("self_attn.q_proj", "attn.q_proj"), ("self_attn.v_proj", "attn.v_proj"),
             ("self_attn.out_proj", "attn.o_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]
    for theirs, ours in pairs:
        rules += [rule(f"{layer}{theirs}.{p}", f"{block}{ours}.{p}") for p in ("weight", "bias")]
    rules.append(rule(layer + "self_attn.k_proj.weight", block + "attn.k_proj.weight"))
    return KeyMap(f"Hugging Face Whisper encoder ({prefix or 'no prefix'})", tuple(rules))


WHISPER_KEY_MAP = _key_map("model.encoder.")  # WhisperForConditionalGeneration, the Hub's usual


def mel_from_whisper(pre: dict[str, Any] | None, n_mels: int,
                     where: str = PREPROCESSOR_FILE) -> MelConfig:
    """The features of a ``WhisperFeatureExtractor`` config (None: its defaults)."""
    pre = {**_FEATURE_DEFAULTS, "feature_size": n_mels, **(pre or {})}
    try:
        mel = MelConfig(sampling_rate=int(pre["sampling_rate"]), n_fft=int(pre["n_fft"]),
                        hop_length=int(pre["hop_length"]), n_mels=int(pre["feature_size"]),
                        chunk_seconds=float(pre["chunk_length"]))
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot read the feature settings: {err}") from None
    if float(pre.get("dither") or 0.0) != 0.0:
        raise CheckpointError(f"{where}: dither {pre['dither']} is not supported (imagefm's "
                              f"log_mel is deterministic)")
    return mel


def config_from_whisper(hf: dict[str, Any], mel: MelConfig | None = None,
                        where: str = CONFIG_FILE) -> AudioEncoderConfig:
    """Our encoder config from a Whisper ``config.json`` (and its feature settings)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not "
                              f"{MODEL_TYPE!r}")
    c = {**_CONFIG_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    act = c["activation_function"]
    if act not in _ACT_FROM_HF:
        raise CheckpointError(f"{where}: activation_function {act!r} is not supported; imagefm "
                              f"knows {', '.join(sorted(_ACT_FROM_HF))}")
    try:
        return AudioEncoderConfig(
            num_mel_bins=int(c["num_mel_bins"]), d_model=int(c["d_model"]),
            encoder_layers=int(c["encoder_layers"]),
            encoder_attention_heads=int(c["encoder_attention_heads"]),
            encoder_ffn_dim=int(c["encoder_ffn_dim"]),
            max_source_positions=int(c["max_source_positions"]), activation=_ACT_FROM_HF[act],
            layer_norm_eps=1e-5,  # Whisper's LayerNorms use torch's default
            mel=mel if mel is not None else MelConfig(n_mels=int(c["num_mel_bins"])))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


def _read_config(directory: Path) -> AudioEncoderConfig:
    hf = _read_json(directory / CONFIG_FILE)
    pre_path = directory / PREPROCESSOR_FILE
    pre = _read_json(pre_path) if pre_path.is_file() else None
    n_mels = int(hf.get("num_mel_bins") or _CONFIG_DEFAULTS["num_mel_bins"])
    return config_from_whisper(hf, mel_from_whisper(pre, n_mels, str(pre_path)),
                               str(directory / CONFIG_FILE))


def load_whisper(path: str | Path, *, strict: bool = True) -> AudioEncoder:
    """Load the encoder of a Hugging Face Whisper directory as an :class:`AudioEncoder`.

    ``strict`` (default) fails with a report naming every missing, unexpected or mis-shaped key.
    """
    directory = Path(path)
    config = _read_config(directory)
    weights = read_hf_weights(directory)
    prefix = next((p for p in _ENCODER_PREFIXES if f"{p}conv1.weight" in weights), None)
    if prefix is None:
        raise CheckpointError(f"{directory}: no Whisper encoder weights (looked for "
                              f"{', '.join(p + 'conv1.weight' for p in _ENCODER_PREFIXES)})")
    for key in [k for k in weights if k.startswith(_UNUSED_PREFIXES)]:
        del weights[key]  # the decoder: not read at all
    with empty_parameters():  # meta parameters when the loading layer asks (no random init)
        model = AudioEncoder(config)
    load_with_key_map(model, _key_map(prefix), weights, strict=strict, where=str(directory))
    return model.eval()


def load_whisper_features(path: str | Path) -> MelConfig:
    """The "processor" of a Whisper directory: its log-mel settings (``log_mel(waves, it)``)."""
    return _read_config(Path(path)).mel
