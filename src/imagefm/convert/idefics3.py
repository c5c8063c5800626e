"""Hugging Face ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``
directories → imagefm's :class:`~imagefm.models.idefics3.Idefics3`, and back.

Detect by ``config.json`` ``model_type`` ``"idefics3"`` or ``"smolvlm"`` (the two compute the same;
SmolVLM names its tokens in tokenizer_config.json). Keys, in every transformers version so far:
``model.vision_model.*`` (SigLIP, the rules of :mod:`imagefm.convert.hf` re-rooted),
``model.connector.modality_projection.proj.weight`` (the bias-free connector),
``model.text_model.*`` (:mod:`imagefm.convert.llama`'s Llama rules re-rooted) and
``lm_head.weight`` (absent when the top-level ``tie_word_embeddings`` ties it — the text
config's own flag is not what transformers reads). The roots are read off the keys.

The image settings come from preprocessor_config.json, or transformers 5's processor_config.json
(``image_processor``); ``image_seq_len`` there must be what the model computes. Greedy
generation stops at generation_config.json's ``eos_token_id`` when the file has one, as
transformers' ``generate`` does. ``transformers`` is never imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, atomic_write_text, save_state_dict
from imagefm.config import ConfigError
from imagefm.convert.hf import (
    _ACT_TO_HF,
    SIGLIP_KEY_MAP,
    _read_json,
    _sub_config,
    _vision,
)
from imagefm.convert.hf_vlm import load_hf_vlm, load_hf_vlm_processor
from imagefm.convert.keymap import KeyMap, rule
from imagefm.convert.llama import (
    config_from_hf_lm,
    config_to_hf_lm,
    hf_lm_key_map,
)
from imagefm.convert.llava import _prefix, _rerooted
from imagefm.idefics3_processor import Idefics3Processor
from imagefm.models.idefics3 import Idefics3, Idefics3Config, Idefics3ImageConfig

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
GENERATION_FILE = "generation_config.json"
MODEL_TYPES = ("idefics3", "smolvlm")
_HF_CLASSES = {"idefics3": "Idefics3ForConditionalGeneration",
               "smolvlm": "SmolVLMForConditionalGeneration"}

# transformers' defaults (configuration_idefics3.py, image_processing_idefics3.py) for fields a
# file may leave out.
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
    num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6)
_IMAGE_DEFAULTS: dict[str, Any] = dict(
    do_resize=True, size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364},
    do_image_splitting=True, resample=1, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
_RESAMPLE_FROM_HF = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_TO_HF = {v: k for k, v in _RESAMPLE_FROM_HF.items()}
_TOKEN_KEYS = {"image_token": "image_token", "fake_image_token": "fake_image_token",
               "global_image_token": "global_image_token",
               "end_of_utterance_token": "end_of_utterance_token"}


# --- config ------------------------------------------------------------------------------------

def _image_settings(directory: Path | None) -> tuple[dict[str, Any], int | None]:
    """The image processor's settings and the processor's ``image_seq_len`` (None if unsaid)."""
    pre: dict[str, Any] = {}
    seq_len = None
    if directory is not None and (directory / PROCESSOR_FILE).is_file():
        processor = _read_json(directory / PROCESSOR_FILE)
        pre = dict(processor.get("image_processor") or {})
        seq_len = processor.get("image_seq_len")
    if directory is not None and (directory / PREPROCESSOR_FILE).is_file():
        pre = _read_json(directory / PREPROCESSOR_FILE)
    return {**_IMAGE_DEFAULTS, **{k: v for k, v in pre.items() if v is not None}}, seq_len


def _image_config(pre: dict[str, Any], where: str) -> Idefics3ImageConfig:
    resample = pre["resample"]
    if resample not in _RESAMPLE_FROM_HF:
        raise CheckpointError(f"{where}: resample {resample!r} is not supported (imagefm reads "
                              f"{sorted(_RESAMPLE_FROM_HF)})")
    try:
        return Idefics3ImageConfig(
            longest_edge=int(pre["size"]["longest_edge"]),
            tile_size=int(pre["max_image_size"]["longest_edge"]),
            split=bool(pre["do_image_splitting"]), resize=bool(pre["do_resize"]),
            interpolation=_RESAMPLE_FROM_HF[resample],
            rescale_factor=float(pre["rescale_factor"]) if pre["do_rescale"] else 1.0,
            normalize=bool(pre["do_normalize"]), mean=tuple(pre["image_mean"]),
            std=tuple(pre["image_std"]))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: image processor settings not understood: {err!r} "
                              f"(size and max_image_size need 'longest_edge')") from None


def config_from_idefics3(hf: dict[str, Any], directory: Path | None = None,
                         where: str = CONFIG_FILE) -> Idefics3Config:
    """Our config from an Idefics3 / SmolVLM ``config.json`` and, when ``directory`` is given,
    its processor, tokenizer and generation files."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not one of "
                              f"{', '.join(MODEL_TYPES)}")
    vision = _sub_config(hf, "vision", _VISION_DEFAULTS)
    # No text_config at all means transformers' default: Llama with rms_norm_eps 1e-5.
    text = dict(hf["text_config"]) if hf.get("text_config") else {"rms_norm_eps": 1e-5}
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))  # the top level ties
    generation = (directory / GENERATION_FILE) if directory is not None else None
    if generation is not None and generation.is_file():
        eos = _read_json(generation).get("eos_token_id")
        if eos is not None:
            text["eos_token_id"] = eos
    pre, seq_len = _image_settings(directory)
    tokens = {}
    if directory is not None and (directory / "tokenizer_config.json").is_file():
        tok_config = _read_json(directory / "tokenizer_config.json")
        tokens = {ours: tok_config[theirs] for ours, theirs in _TOKEN_KEYS.items()
                  if isinstance(tok_config.get(theirs), str)}
    try:
        config = Idefics3Config(
            vision=_vision(vision, where, class_token=False, patch_bias=True, pre_norm=False,
                           pool="mean"),
            lm=config_from_hf_lm(text, where), image_token_id=int(hf.get("image_token_id", 128257)),
            scale_factor=int(hf.get("scale_factor", 2)), image=_image_config(pre, where),
            model_type=model_type, **tokens)
    except ConfigError as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None
    if config.image.tile_size != config.vision.image_size:
        raise CheckpointError(f"{where}: the processor's tiles ({config.image.tile_size} px) are "
                              f"not the vision tower's image size ({config.vision.image_size})")
    if seq_len is not None and int(seq_len) != config.image_seq_len:
        raise CheckpointError(f"{where}: processor_config.json's image_seq_len {seq_len} is not "
                              f"the {config.image_seq_len} tokens per tile the model makes")
    return config


def config_to_idefics3(config: Idefics3Config) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``config``."""
    v = config.vision
    text = config_to_hf_lm(config.lm)
    text.pop("architectures", None)
    return {
        "architectures": [_HF_CLASSES[config.model_type]], "model_type": config.model_type,
        "image_token_id": config.image_token_id, "scale_factor": config.scale_factor,
        "tie_word_embeddings": config.lm.tie_embeddings, "dtype": "float32",
        "vision_config": {
            "model_type": f"{config.model_type}_vision", "hidden_size": v.width,
            "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "num_channels": v.in_channels,
            "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": _ACT_TO_HF[v.act], "layer_norm_eps": v.norm_eps},
        "text_config": text,
    }


# --- key map -----------------------------------------------------------------------------------

def idefics3_key_map(config: Idefics3Config, keys: list[str] | None = None) -> KeyMap:
    """HF names <-> ours; the roots are read off ``keys`` (the usual ones when None)."""
    keys = keys or []
    vision_root = _prefix(keys, "embeddings.patch_embedding.weight", "model.vision_model.")
    lm_root = _prefix(keys, "embed_tokens.weight", "model.text_model.")
    connector = _prefix(keys, "modality_projection.proj.weight", "model.connector.")
    vision_rules = tuple(r for r in SIGLIP_KEY_MAP.rules if r.source.startswith("vision_model.")
                         and not r.source.startswith("vision_model.head."))
    lm_map = hf_lm_key_map(config.lm)
    rules = _rerooted(vision_rules, "vision_model.", vision_root, "")
    rules += _rerooted(lm_map.rules, "model.", lm_root, "lm.")
    rules += [rule("lm_head.weight", "lm.lm_head.weight") for r in lm_map.rules
              if r.source == "lm_head.weight"]
    rules.append(rule(f"{connector}modality_projection.proj.weight", "projector.fc1.weight"))
    ignore = [f"{vision_root}embeddings.position_ids",
              f"{lm_root}layers.{{i}}.self_attn.rotary_emb.inv_freq",
              f"{lm_root}rotary_emb.inv_freq"]
    if config.lm.tie_embeddings:
        ignore.append("lm_head.weight")
    return KeyMap(f"Hugging Face {_HF_CLASSES[config.model_type]}", tuple(rules), tuple(ignore))


# --- load / export -----------------------------------------------------------------------------

def read_config(directory: Path) -> Idefics3Config:
    """The config of an HF Idefics3 / SmolVLM directory: config.json and the processor,
    tokenizer and generation files."""
    return config_from_idefics3(_read_json(directory / CONFIG_FILE), directory,
                                str(directory / CONFIG_FILE))


def load_idefics3(path: str | Path, *, strict: bool = True) -> Idefics3:
    """Load an HF Idefics3 / SmolVLM directory (weights, tokenizer, chat template, image
    settings). ``strict`` fails on any key mismatch."""
    directory = Path(path)
    config = read_config(directory)
    return load_hf_vlm(Idefics3, config, directory, lambda keys: idefics3_key_map(config, keys),
                       strict=strict)


def load_idefics3_processor(path: str | Path) -> Idefics3Processor:
    """The processor of an Idefics3 / SmolVLM directory (HF or imagefm format), without
    loading weights."""
    return load_hf_vlm_processor(Idefics3Processor, path, read_config)


def export_idefics3(model: Idefics3, path: str | Path) -> Path:
    """Write ``model`` as a directory transformers' ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` read (weights, config, processor settings, tokenizer, chat template)."""
    directory = Path(path)
    config = model.config
    hf_config = config_to_idefics3(config)
    directory.mkdir(parents=True, exist_ok=True)
    state = idefics3_key_map(config).to_source(model.state_dict())
    save_state_dict({k: v.contiguous() for k, v in state.items()},
                    directory / "model.safetensors", metadata={"format": "pt"})
    image = config.image
    preprocessor = {
        "image_processor_type": ("SmolVLMImageProcessor" if config.model_type == "smolvlm"
                                 else "Idefics3ImageProcessor"),
        "do_convert_rgb": True, "do_resize": image.resize,
        "size": {"longest_edge": image.longest_edge},
        "max_image_size": {"longest_edge": image.tile_size},
        "do_image_splitting": image.split, "resample": _RESAMPLE_TO_HF[image.interpolation],
        "do_rescale": True, "rescale_factor": image.rescale_factor,
        "do_normalize": image.normalize, "image_mean": list(image.mean),
        "image_std": list(image.std), "do_pad": True}
    processor_class = ("SmolVLMProcessor" if config.model_type == "smolvlm"
                       else "Idefics3Processor")
    atomic_write_text(directory / PREPROCESSOR_FILE, json.dumps(preprocessor, indent=2))
    atomic_write_text(directory / PROCESSOR_FILE, json.dumps(
        {"processor_class": processor_class, "image_seq_len": config.image_seq_len}, indent=2))
    tokenizer = model.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

        def token(index: int | None) -> str | None:
            return None if index is None else tokenizer.id_to_token(index)

        eos = config.lm.eos_token_ids
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "processor_class": processor_class,
                      "add_bos_token": tokenizer.bos_id is not None,
                      "bos_token": token(config.lm.bos_token_id),
                      "eos_token": token(eos[0]) if eos else None,
                      "pad_token": token(tokenizer.pad_id),
                      "model_max_length": config.lm.context_length,
                      **{theirs: getattr(config, ours) for ours, theirs in _TOKEN_KEYS.items()}}
        atomic_write_text(directory / "tokenizer_config.json",
                          json.dumps(tok_config, indent=2, ensure_ascii=False))
    if model.chat_template is not None:
        atomic_write_text(directory / "chat_template.jinja", model.chat_template)
    # config.json last: its presence marks a complete directory.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2))
    return directory
