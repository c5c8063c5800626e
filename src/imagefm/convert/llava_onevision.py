"""Hugging Face ``LlavaOnevisionForConditionalGeneration`` directories →
:class:`imagefm.models.llava_onevision.LlavaOneVision`.

The weights are LLaVA's (:func:`imagefm.convert.llava.llava_key_map`: SigLIP tower, projector
``linear_1``/``linear_2``, Qwen2 LM, in any of the key layouts transformers 4 and 5 write) plus
``image_newline``. config.json gives the tower, the LM, ``image_grid_pinpoints``,
``vision_aspect_ratio`` and the feature layer; the image processor's settings
(preprocessor_config.json, or the ``image_processor`` entry of processor_config.json that
transformers 5 writes) give the resampling filter, mean and std. Settings our processor does not
compute, or that disagree with the model (tile size, pinpoints, ``num_image_tokens``), are
refused rather than silently changed.

Detection: config.json ``model_type`` ``"llava_onevision"``.

And back (:func:`export_llava_onevision`): LLaVA's export (:mod:`imagefm.convert.llava`) plus the
tiling settings, in the layout transformers 5 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagefm.checkpoint import CheckpointError, save_state_dict
from imagefm.config import ConfigError
from imagefm.convert.hf import _read_json, _sub_config, _vision, read_hf_weights
from imagefm.convert.hf_card import _RESAMPLE_TO_HF
from imagefm.convert.hf_vlm import (
    check_token,
    dtype_name,
    float_state_dict,
    image_interpolation,
    load_hf_vlm,
    load_hf_vlm_processor,
    make_directory,
    refuse,
    write_generation_config,
    write_json,
    write_tokenizer,
)
from imagefm.convert.keymap import KeyMap, rule
from imagefm.convert.llama import CONFIG_FILE, config_from_hf_lm
from imagefm.convert.llava import (
    _TOWERS,
    PUBLISHED_KEYS,
    _prefix,
    hf_text_config,
    hf_vision_tower,
    llava_key_map,
)
from imagefm.models.llava_onevision import (
    LlavaOneVision,
    OneVisionConfig,
    OneVisionImageConfig,
)
from imagefm.onevision_processor import OneVisionProcessor

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# transformers' LlavaOnevisionConfig defaults (SigLIP so400m without its last layer, Qwen2).
_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                        num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
_DEFAULT_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


# --- config.json + the processor's settings → OneVisionConfig -------------------------------------

def _image_config(pre: dict[str, Any], where: str) -> OneVisionImageConfig:
    if pre.get("do_center_crop"):
        raise CheckpointError(f"{where}: do_center_crop is not supported")
    interpolation = image_interpolation(
        pre, where, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"))
    defaults = OneVisionImageConfig()
    return OneVisionImageConfig(interpolation=interpolation,
                                mean=tuple(pre.get("image_mean", defaults.mean)),
                                std=tuple(pre.get("image_std", defaults.std)))


def _check_processor(config: OneVisionConfig, pre: dict[str, Any], proc: dict[str, Any],
                     where: str) -> None:
    """The processor settings must describe the same tiling as the model's."""
    size = pre.get("size") or {}
    side = size.get("shortest_edge") or size.get("height")
    if side is not None and (side != config.tile_size or size.get("width", side) != side):
        raise CheckpointError(f"{where}: the image processor's size {size} differs from the "
                              f"vision tower's {config.tile_size} px tiles")
    pinpoints = pre.get("image_grid_pinpoints")
    if pinpoints is not None and tuple(map(tuple, pinpoints)) != config.image_grid_pinpoints:
        raise CheckpointError(f"{where}: the image processor's image_grid_pinpoints differ from "
                              f"config.json's")
    ratio = proc.get("vision_aspect_ratio", config.vision_aspect_ratio)
    strategy = proc.get("vision_feature_select_strategy") or config.vision_feature_select
    if ratio != config.vision_aspect_ratio or strategy != config.vision_feature_select:
        raise CheckpointError(f"{where}: the processor's vision_aspect_ratio / "
                              f"vision_feature_select_strategy ({ratio}, {strategy}) differ from "
                              f"config.json's")
    tokens = proc.get("num_image_tokens")
    if tokens is not None and tokens - (strategy == "default") != config.grid_size ** 2:
        raise CheckpointError(f"{where}: num_image_tokens {tokens} does not match the vision "
                              f"tower's {config.grid_size}x{config.grid_size} patch grid")


def config_from_llava_onevision(hf: dict[str, Any], pre: dict[str, Any] | None = None,
                                proc: dict[str, Any] | None = None,
                                where: str = CONFIG_FILE) -> tuple[OneVisionConfig, str]:
    """Our config (and the vision tower's HF model type) from a LLaVA-OneVision
    ``config.json``, its image processor's settings ``pre`` and processor settings ``proc``."""
    if hf.get("model_type") != "llava_onevision":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not "
                              f"'llava_onevision'")
    vision_type = (hf.get("vision_config") or {}).get("model_type", "siglip_vision_model")
    if vision_type not in _TOWERS:
        raise CheckpointError(f"{where}: vision tower {vision_type!r} is not supported; imagefm "
                              f"reads {', '.join(_TOWERS)}")
    defaults, structure, _ = _TOWERS[vision_type]
    vision = _sub_config(hf, "vision", {**defaults, **_VISION_DEFAULTS})
    if vision.get("vision_use_head"):  # loaded, though OneVision reads hidden states
        structure = {**structure, "pool": "map"}
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "qwen2")
    # transformers 5 reads the tie at the top, earlier versions in text_config: either ties.
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings")
                                       or text.get("tie_word_embeddings"))
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: projector_hidden_act {hf['projector_hidden_act']!r} is "
                              f"not supported (LLaVA-OneVision's is gelu)")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r}: imagefm reads one "
                              f"layer, not a list of layers")
    pre = dict(pre or {})
    try:
        config = OneVisionConfig(
            vision=_vision(vision, where, **structure), lm=config_from_hf_lm(text, where),
            image_grid_pinpoints=hf.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS,
            image=_image_config(pre, where),
            image_token_id=int(hf.get("image_token_id", hf.get("image_token_index", 151646))),
            vision_aspect_ratio=hf.get("vision_aspect_ratio", "anyres_max_9"),
            vision_feature_layer=layer,
            vision_feature_select=hf.get("vision_feature_select_strategy", "full"),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)))
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None
    _check_processor(config, pre, proc or {}, where)
    return config, vision_type


def _processor_settings(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image processor settings, processor settings): preprocessor_config.json and
    processor_config.json (transformers 5 nests the former inside the latter)."""
    proc_path = directory / PROCESSOR_FILE
    proc = _read_json(proc_path) if proc_path.is_file() else {}
    pre_path = directory / PREPROCESSOR_FILE
    pre = _read_json(pre_path) if pre_path.is_file() else proc.get("image_processor") or {}
    return pre, proc


def read_config(directory: Path) -> tuple[OneVisionConfig, str]:
    pre, proc = _processor_settings(directory)
    return config_from_llava_onevision(_read_json(directory / CONFIG_FILE), pre, proc,
                                       str(directory / CONFIG_FILE))


# --- the key map ---------------------------------------------------------------------------------

def llava_onevision_key_map(config: OneVisionConfig, vision_type: str, keys: list[str]) -> KeyMap:
    """LLaVA's key map (every layout it reads) plus ``image_newline``."""
    base = llava_key_map(config, vision_type, keys)  # reads config.lm only
    newline = _prefix(keys, "image_newline", "")
    return KeyMap(base.name.replace("LLaVA", "LLaVA-OneVision"),
                  (*base.rules, rule(newline + "image_newline", "image_newline")), base.ignore)


def load_llava_onevision(path: str | Path, *, strict: bool = True) -> LlavaOneVision:
    """Load an HF LLaVA-OneVision directory (weights, tokenizer, chat template, processor
    settings). ``strict`` fails on any missing, unexpected or mis-shaped key."""
    directory = Path(path)
    config, vision_type = read_config(directory)
    weights = read_hf_weights(directory)
    # OneVision reads hidden states before the tower's final norm; checkpoints converted without
    # that norm get an identity one (it never touches the outputs).
    root = _prefix(list(weights), "embeddings.patch_embedding.weight",
                   "vision_tower.vision_model.")
    if root + "post_layernorm.weight" not in weights:
        width = config.vision.width
        weights[root + "post_layernorm.weight"] = torch.ones(width)
        weights[root + "post_layernorm.bias"] = torch.zeros(width)
    return load_hf_vlm(LlavaOneVision, config, directory,
                       lambda keys: llava_onevision_key_map(config, vision_type, keys),
                       strict=strict, weights=weights)


def load_llava_onevision_processor(path: str | Path) -> OneVisionProcessor:
    """The processor of a LLaVA-OneVision directory (HF or imagefm format), without loading
    weights."""
    return load_hf_vlm_processor(OneVisionProcessor, path,
                                 lambda directory: read_config(directory)[0])


# --- export: LlavaOneVision → a Hugging Face directory --------------------------------------------

VIDEO_TOKEN = "<video>"  # the reference processor's video placeholder


def config_to_llava_onevision(model: LlavaOneVision) -> dict[str, Any]:
    """The ``config.json`` transformers 5 writes for the ``LlavaOnevisionForConditionalGeneration``
    equal to ``model`` (raises with every field it cannot express)."""
    config = model.config
    _, vision, problems = hf_vision_tower(config.vision)
    text = hf_text_config(config.lm, problems)
    if config.image.interpolation not in _RESAMPLE_TO_HF:
        problems.append(f"image.interpolation = {config.image.interpolation!r}")
    problems += check_token(model.tokenizer, "image_token", config.image_token,
                            config.image_token_id)
    refuse("LlavaOnevisionForConditionalGeneration", problems)
    hf = {"architectures": ["LlavaOnevisionForConditionalGeneration"],
          "model_type": "llava_onevision", "image_token_index": config.image_token_id,
          "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
          "vision_aspect_ratio": config.vision_aspect_ratio,
          "vision_feature_layer": config.vision_feature_layer,
          "vision_feature_select_strategy": config.vision_feature_select,
          "projector_hidden_act": "gelu", "multimodal_projector_bias": config.projector_bias,
          "tie_word_embeddings": config.lm.tie_embeddings, "dtype": dtype_name(model),
          "text_config": text, "vision_config": vision}
    video = model.tokenizer.token_to_id(VIDEO_TOKEN) if model.tokenizer is not None else None
    if video is not None:  # else transformers' default id: the vocabulary has no video token
        hf["video_token_index"] = video
    return hf


def processor_config_to_hf(config: OneVisionConfig) -> dict[str, Any]:
    """processor_config.json: tiling, the image processor's settings and the token counts, and
    a video processor at the tile size (the reference processor needs one)."""
    image, side = config.image, config.tile_size
    common = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image.mean),
              "image_std": list(image.std), "resample": _RESAMPLE_TO_HF[image.interpolation],
              "size": {"height": side, "width": side}}
    default = config.vision_feature_select == "default"
    return {"processor_class": "LlavaOnevisionProcessor",
            "image_processor": {"image_processor_type": "LlavaOnevisionImageProcessor", **common,
                                "do_pad": True, "image_grid_pinpoints":
                                    [list(p) for p in config.image_grid_pinpoints]},
            "video_processor": {"video_processor_type": "LlavaOnevisionVideoProcessor",
                                **common},
            "image_token": config.image_token, "video_token": VIDEO_TOKEN,
            # the reference counts the tile's first token too and drops it under "default"
            "num_image_tokens": config.grid_size**2 + int(default),
            "vision_aspect_ratio": config.vision_aspect_ratio,
            "vision_feature_select_strategy": config.vision_feature_select}


def export_llava_onevision(model: LlavaOneVision, path: str | Path) -> Path:
    """Write ``model`` as the directory transformers' ``LlavaOnevisionForConditionalGeneration``
    (and ``AutoProcessor``) loads: config.json, model.safetensors under the published key names
    (LLaVA's and ``image_newline``), generation_config.json, processor_config.json, the
    tokenizer and chat template.

    Raises :class:`CheckpointError` naming every field the HF class cannot express.
    """
    directory = Path(path)
    hf_config = config_to_llava_onevision(model)
    config = model.config
    key_map = llava_onevision_key_map(config, hf_config["vision_config"]["model_type"],
                                      PUBLISHED_KEYS)
    weights = key_map.to_source(float_state_dict(model))
    directory = make_directory(directory)
    save_state_dict(weights, directory / "model.safetensors", metadata={"format": "pt"})
    write_generation_config(directory, config.lm)
    write_json(directory / PROCESSOR_FILE, processor_config_to_hf(config))
    write_tokenizer(directory, model, config.lm, "LlavaOnevisionProcessor")
    write_json(directory / CONFIG_FILE, hf_config)  # last: marks a complete directory
    return directory
