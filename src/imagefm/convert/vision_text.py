"""Hugging Face ``VisionTextDualEncoderModel`` directories to imagefm.

How Korean and multilingual dual encoders are often published: a CLIP (or SigLIP) vision tower,
a BERT / RoBERTa / XLM-RoBERTa text tower, two projections without bias and a temperature.

    config.json   model_type "vision-text-dual-encoder", projection_dim, logit_scale_init_value,
                  vision_config (model_type clip_vision_model | siglip_vision_model),
                  text_config (model_type bert | roberta | xlm-roberta)
    weights       vision_model.* (transformers 5; 4.x wrote vision_model.vision_model.*),
                  text_model.*, visual_projection.weight, text_projection.weight, logit_scale
    preprocessor_config.json, tokenizer.json + tokenizer_config.json

What the reference computes (checked by tests/test_parity_vision_text.py):
* image: the vision model's ``pooler_output`` (CLIP: the post-LayerNorm class token; SigLIP: its
  attention-pool head), then ``visual_projection``;
* text: the text model's ``pooler_output``, BERT's pooler ``tanh(dense(h[CLS]))`` (our
  ``pool = "pooler"``), then ``text_projection``; ``attention_mask`` masks padding; RoBERTa and
  XLM-R count positions from ``pad_token_id + 1`` over the non-pad tokens;
* ``logits_per_image = exp(logit_scale) * normalised image @ normalised text``, CLIP's loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, empty_parameters
from imagefm.config import ConfigError, DualEncoderConfig, VisionConfig
from imagefm.convert.hf import (
    _CLIP_VISION_DEFAULTS,
    _SIGLIP_VISION_DEFAULTS,
    CLIP_KEY_MAP,
    CONFIG_FILE,
    SIGLIP_KEY_MAP,
    _read_json,
    _vision,
    read_hf_weights,
)
from imagefm.convert.hf_card import PREPROCESSOR_FILE, card_from_hf
from imagefm.convert.hf_text import (
    bert_config_from_hf_text,
    bert_family_tokenizer,
    has_tokenizer_files,
    hf_text_ignore,
    hf_text_rules,
)
from imagefm.convert.keymap import KeyMap, Rule, load_with_key_map, reshape, rule
from imagefm.models.dual_encoder import DualEncoder

MODEL_TYPE = "vision-text-dual-encoder"
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
DEFAULT_PROJECTION_DIM = 512  # VisionTextDualEncoderConfig's defaults
DEFAULT_LOGIT_SCALE = 2.6592


def is_vision_text_config(hf: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a VisionTextDualEncoderModel's (how the loading layer
    recognises the format)."""
    return hf.get("model_type") == MODEL_TYPE


# --- config.json -> our config -------------------------------------------------------------------

def _vision_config(hf: dict[str, Any], where: str) -> tuple[str, VisionConfig]:
    v = hf.get("vision_config") or {}
    kind = VISION_MODEL_TYPES.get(v.get("model_type"))
    if kind is None:
        raise CheckpointError(f"{where}: vision_config.model_type {v.get('model_type')!r} is not "
                              f"supported; imagefm reads {', '.join(VISION_MODEL_TYPES)} towers")
    if kind == "clip":
        merged = {**_CLIP_VISION_DEFAULTS, **v}
        return kind, _vision(merged, where, class_token=True, patch_bias=False, pre_norm=True,
                             pool="cls")
    merged = {**_SIGLIP_VISION_DEFAULTS, **v}
    if not merged["vision_use_head"]:
        raise CheckpointError(f"{where}: a SigLIP vision tower without its head "
                              f"(vision_use_head = false) has no pooled output to project")
    return kind, _vision(merged, where, class_token=False, patch_bias=True, pre_norm=False,
                         pool="map")


def config_from_vision_text(hf: dict[str, Any], where: str = CONFIG_FILE,
                            context_length: int | None = None) -> DualEncoderConfig:
    """Our config from a VisionTextDualEncoderModel ``config.json``."""
    if not is_vision_text_config(hf):
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not "
                              f"{MODEL_TYPE!r}")
    _, vision = _vision_config(hf, where)
    text = bert_config_from_hf_text(hf.get("text_config") or {}, f"{where}: text_config",
                                    pool="pooler", context_length=context_length)
    try:
        return DualEncoderConfig(
            model_type="clip", vision=vision, text=text,
            embed_dim=int(hf.get("projection_dim") or DEFAULT_PROJECTION_DIM),
            image_projection="linear", text_projection="linear",
            init_logit_scale=float(hf.get("logit_scale_init_value", DEFAULT_LOGIT_SCALE)))
    except ConfigError as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


# --- key map -------------------------------------------------------------------------------------

def _vision_rules(kind: str, prefix: str) -> list[Rule]:
    """The vision rules of our CLIPModel / SiglipModel maps, re-rooted at ``prefix``."""
    base = CLIP_KEY_MAP if kind == "clip" else SIGLIP_KEY_MAP
    return [rule(prefix + r.source.removeprefix("vision_model."), r.ours, r.transform)
            for r in base.rules if r.source.startswith("vision_model.")]


def vision_text_key_map(kind: str, nested: bool = False) -> KeyMap:
    """The key map of a VisionTextDualEncoderModel with a ``kind`` ("clip" / "siglip") vision
    tower. ``nested``: the transformers 4.x layout (``vision_model.vision_model.*``)."""
    vision = "vision_model.vision_model." if nested else "vision_model."
    return KeyMap(f"Hugging Face VisionTextDualEncoderModel ({kind} vision)", (
        *_vision_rules(kind, vision),
        *hf_text_rules("text_model.", pooler=True),
        rule("visual_projection.weight", "image_proj.weight"),
        rule("text_projection.weight", "text_proj.weight"),
        rule("logit_scale", "logit_scale", reshape(())),
    ), ignore=(f"{vision}embeddings.position_ids", *hf_text_ignore("text_model.", pooler=True)))


# --- loading -------------------------------------------------------------------------------------

def _tokenizer(directory: Path, text_hf: dict[str, Any]) -> Any | None:
    """The directory's tokenizer, or None when it has none. One that is there but cannot be
    read gives a warning: the image tower is still usable, and ``Processor`` says clearly that
    the tokenizer is missing."""
    if not has_tokenizer_files(directory):
        return None
    try:
        return bert_family_tokenizer(directory, model_type=text_hf.get("model_type"))
    except (CheckpointError, OSError, ValueError) as err:
        warnings.warn(f"{directory}: loading the model without a tokenizer: {err}", stacklevel=3)
        return None


def _read(directory: Path) -> tuple[str, DualEncoderConfig, Any, Any]:
    """(vision kind, config, image card, tokenizer) of a VisionTextDualEncoderModel directory."""
    where = str(directory / CONFIG_FILE)
    hf = _read_json(directory / CONFIG_FILE)
    tokenizer = _tokenizer(directory, hf.get("text_config") or {})
    config = config_from_vision_text(hf, where, tokenizer and tokenizer.context_length)
    if tokenizer is not None and tokenizer.context_length != config.text.context_length:
        # A tokenizer longer than the position table would give texts the model cannot take.
        tokenizer = tokenizer.with_settings(context_length=config.text.context_length)
    kind, _ = _vision_config(hf, where)
    path = directory / PREPROCESSOR_FILE
    # The card's defaults (for fields the file leaves out) follow the vision tower's family.
    card = card_from_hf(_read_json(path) if path.is_file() else None,
                        config.replace(model_type=kind), str(path))
    return kind, config, card, tokenizer


def load_vision_text(path: str | Path, *, strict: bool = True) -> DualEncoder:
    """Load a Hugging Face ``VisionTextDualEncoderModel`` directory as a :class:`DualEncoder`.

    ``strict`` (default) fails with a report naming every missing, unexpected or mis-shaped key.
    """
    directory = Path(path)
    kind, config, card, tokenizer = _read(directory)
    weights = read_hf_weights(directory)
    nested = any(key.startswith("vision_model.vision_model.") for key in weights)
    with empty_parameters():
        model = DualEncoder(config, card)
    load_with_key_map(model, vision_text_key_map(kind, nested), weights, strict=strict,
                      where=str(directory))
    model.tokenizer = tokenizer
    return model.eval()


def load_vision_text_processor(path: str | Path) -> Any:
    """The :class:`~imagefm.processor.Processor` of a VisionTextDualEncoderModel directory: the
    image card from ``preprocessor_config.json``, the BERT-family tokenizer."""
    from imagefm.processor import Processor

    _, _, card, tokenizer = _read(Path(path))
    return Processor(card, tokenizer)
