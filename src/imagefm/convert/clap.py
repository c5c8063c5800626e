"""CLAP (speech–text) presets and their builders, with pretrained text towers where named.

    model = build_clap("clap-e5", pretrained=True)   # audio-tiny + multilingual-e5-small
    imagefm train configs/clap-speech.yaml           # model.preset: clap-e5

``imagefm.train.presets.MODEL_PRESETS`` maps the preset names to the ``clap_*`` builders below
(``build(overrides, pretrained) -> model``). A random BERT text tower gets the character-level
WordPiece tokenizer (English and Hangul jamo), as ``build_dual_encoder`` does.
"""

from __future__ import annotations

from typing import Any

from imagefm.config import BertConfig, ConfigError, merge_nested
from imagefm.convert.towers import PRETRAINED_TOWERS, char_wordpiece_tokenizer
from imagefm.models.clap import ClapConfig, ClapModel
from imagefm.models.dual_encoder import fit_text_to_tokenizer
from imagefm.models.whisper_encoder import audio_preset

# multilingual-e5-small's shape (as the lit-effnet preset's text tower).
E5_SMALL = BertConfig(vocab_size=250037, layers=12, pad_token_id=1)

CLAP_PRESETS: dict[str, ClapConfig] = {
    # For tests and smoke runs: a few seconds of CPU per step.
    "clap-tiny": ClapConfig(
        audio=audio_preset("audio-tiny", d_model=64, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=128),
        text=BertConfig(context_length=32, width=64, layers=2, heads=2, mlp_dim=128),
        embed_dim=64),
    # Speech from scratch (a small Whisper-style tower a shared CPU trains in minutes), text from
    # multilingual-e5-small (English, Korean and ~100 more languages).
    "clap-e5": ClapConfig(
        audio=audio_preset("audio-tiny", d_model=128, encoder_layers=3, encoder_attention_heads=4,
                           encoder_ffn_dim=512),
        text=E5_SMALL, embed_dim=384),
}
# The pretrained text tower each preset starts from (model.pretrained=true).
CLAP_TEXT_TOWERS: dict[str, str] = {"clap-e5": "multilingual-e5-small"}


def build_clap(name: str, overrides: dict[str, Any] | None = None, pretrained: bool = True
               ) -> ClapModel:
    """A fresh CLAP model of preset ``name`` with ``overrides`` (``{"audio": {"encoder_layers":
    2}}``); with ``pretrained``, the preset's pretrained text tower and its tokenizer."""
    if name not in CLAP_PRESETS:
        raise ConfigError(f"unknown CLAP preset {name!r}; choose one of "
                          f"{', '.join(CLAP_PRESETS)}")
    config = ClapConfig.from_dict(merge_nested(CLAP_PRESETS[name].to_dict(), overrides or {}))
    tower = CLAP_TEXT_TOWERS.get(name) if pretrained else None
    tokenizer = None
    if tower is None:
        if not isinstance(config.text, BertConfig):
            raise ConfigError("a CLAP text tower without pretrained weights must be a BERT "
                              "tower (text.model_type = bert): it gets the character tokenizer")
        tokenizer = char_wordpiece_tokenizer(config.text.context_length)
        config = fit_text_to_tokenizer(config, tokenizer)  # type: ignore[arg-type]
    model = ClapModel(config)
    if tower is not None:
        tokenizer = PRETRAINED_TOWERS[tower].load(model.text)
    model.tokenizer = tokenizer
    return model

