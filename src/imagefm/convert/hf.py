"""Hugging Face ``CLIPModel`` / ``SiglipModel`` directories to imagefm and back.

Reading: our config is built from ``config.json`` (every numerical choice: activation, eps, sizes,
pooling rule, head), the image card from ``preprocessor_config.json``, the weights through a strict
key map, the tokenizer from the tokenizer files when there are any. ``transformers`` itself is
never imported: its defaults for fields a ``config.json`` leaves out are written down here.

Writing (``export_hf``): the reverse, refusing configurations the Hugging Face classes cannot
express instead of writing a model that would compute something else.

Behaviour mirrored from ``transformers`` (checked by tests/test_parity_hf.py):
* CLIP text pooling: when ``text_config.eos_token_id == 2`` (configs written before
  transformers PR #24773) HF pools at the largest token id ("argmax"); otherwise at the first
  occurrence of ``eos_token_id`` ("eos").
* SigLIP text pooling: the last position, followed by a Linear "head" with bias (our
  ``text_proj``); no image projection. Without the vision head (``vision_use_head = false``) HF
  has no pooled image output at all; we pool the mean of the patch tokens, as HF's
  ``SiglipForImageClassification`` does, and the towers' tokens match HF's ``last_hidden_state``.
* CLIP applies ``attention_mask`` to the text keys when it is given. SigLIP is trained without
  one (text padded to 64, pads attended) and HF's processor returns none: imagefm's SigLIP text
  tower ignores a mask (``use_padding_mask = False``), so its embeddings are the model's own
  whatever the caller passes (as open_clip's SigLIP models, loaded from the same weights).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from imagefm.checkpoint import (
    CheckpointError,
    atomic_write_text,
    empty_parameters,
    load_sharded,
    load_state_dict_file,
    save_state_dict,
)
from imagefm.config import (
    ConfigError,
    DualEncoderConfig,
    ImageCard,
    TextConfig,
    VisionConfig,
)
from imagefm.convert.hf_card import PREPROCESSOR_FILE, card_from_hf, card_to_hf
from imagefm.convert.keymap import KeyMap, Rule, load_with_key_map, reshape, rule, split
from imagefm.models.dual_encoder import DualEncoder

CONFIG_FILE = "config.json"
# Weight files in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("imagefm_tokenizer.json", "tokenizer.json", "vocab.json", "spiece.model")

# HF's hidden_act names -> ours. gelu_new is the tanh approximation written out by hand.
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
              "relu": "relu", "silu": "silu"}
# PIL resampling codes as preprocessor_config.json stores them.
# The legacy CLIP eos_token_id that makes HF pool at argmax(input_ids).
LEGACY_CLIP_EOS = 2

# transformers' defaults for the fields a config.json may leave out (configuration_clip.py /
# configuration_siglip.py): a missing field means what transformers would use.
_CLIP_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=49407)
_CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SIGLIP_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, projection_size=None)
_SIGLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, vision_use_head=True)


# --- key maps ------------------------------------------------------------------------------------

def _encoder_rules(source: str, ours: str) -> list[Rule]:
    """The pre-LN blocks, named alike in CLIP and SigLIP."""
    names = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
             "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.o_proj",
             "layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    return [rule(f"{source}.encoder.layers.{{i}}.{theirs}.{p}",
                 f"{ours}.transformer.blocks.{{i}}.{mine}.{p}")
            for theirs, mine in names.items() for p in ("weight", "bias")]


def _text_embedding_rules() -> list[Rule]:
    return [rule("text_model.embeddings.token_embedding.weight", "text.token_embed.weight"),
            rule("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
            *_encoder_rules("text_model", "text"),
            rule("text_model.final_layer_norm.weight", "text.norm_final.weight"),
            rule("text_model.final_layer_norm.bias", "text.norm_final.bias")]


# Older checkpoints saved the position_ids buffers; they hold no weights.
_HF_IGNORE = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

CLIP_KEY_MAP = KeyMap("Hugging Face CLIPModel", (
    *_text_embedding_rules(),
    rule("vision_model.embeddings.class_embedding", "vision.class_token"),
    rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
    rule("vision_model.embeddings.position_embedding.weight", "vision.pos_embed"),
    rule("vision_model.pre_layrnorm.weight", "vision.norm_pre.weight"),  # sic: HF's spelling
    rule("vision_model.pre_layrnorm.bias", "vision.norm_pre.bias"),
    *_encoder_rules("vision_model", "vision"),
    rule("vision_model.post_layernorm.weight", "vision.norm_post.weight"),
    rule("vision_model.post_layernorm.bias", "vision.norm_post.bias"),
    rule("visual_projection.weight", "image_proj.weight"),
    rule("text_projection.weight", "text_proj.weight"),
    rule("logit_scale", "logit_scale"),
), ignore=_HF_IGNORE)

SIGLIP_KEY_MAP = KeyMap("Hugging Face SiglipModel", (
    *_text_embedding_rules(),
    rule("text_model.head.weight", "text_proj.weight"),
    rule("text_model.head.bias", "text_proj.bias"),
    rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
    rule("vision_model.embeddings.patch_embedding.bias", "vision.patch_embed.bias"),
    rule("vision_model.embeddings.position_embedding.weight", "vision.pos_embed"),
    *_encoder_rules("vision_model", "vision"),
    rule("vision_model.post_layernorm.weight", "vision.norm_post.weight"),
    rule("vision_model.post_layernorm.bias", "vision.norm_post.bias"),
    # The attention-pool head: torch.nn.MultiheadAttention fuses q/k/v into in_proj_*.
    rule("vision_model.head.probe", "vision.head.probe"),
    rule("vision_model.head.attention.in_proj_weight",
         [f"vision.head.attn.{p}_proj.weight" for p in "qkv"], split(3)),
    rule("vision_model.head.attention.in_proj_bias",
         [f"vision.head.attn.{p}_proj.bias" for p in "qkv"], split(3)),
    rule("vision_model.head.attention.out_proj.weight", "vision.head.attn.o_proj.weight"),
    rule("vision_model.head.attention.out_proj.bias", "vision.head.attn.o_proj.bias"),
    rule("vision_model.head.layernorm.weight", "vision.head.norm.weight"),
    rule("vision_model.head.layernorm.bias", "vision.head.norm.bias"),
    *[rule(f"vision_model.head.mlp.{fc}.{p}", f"vision.head.mlp.{fc}.{p}")
      for fc in ("fc1", "fc2") for p in ("weight", "bias")],
    # HF keeps the temperature and bias as 1-element vectors, we as scalars.
    rule("logit_scale", "logit_scale", reshape((1,))),
    rule("logit_bias", "logit_bias", reshape((1,))),
), ignore=_HF_IGNORE)

KEY_MAPS = {"clip": CLIP_KEY_MAP, "siglip": SIGLIP_KEY_MAP}


# --- config.json -> our config -------------------------------------------------------------------

def _sub_config(hf: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """One tower's settings over transformers' defaults. A legacy ``<tower>_config_dict``, when
    present, is the complete spec and replaces ``<tower>_config`` (as in CLIPConfig)."""
    legacy = hf.get(f"{tower}_config_dict")
    given = legacy if legacy is not None else (hf.get(f"{tower}_config") or {})
    merged = dict(defaults)
    merged.update({k: v for k, v in given.items() if v is not None or k not in defaults})
    return merged


def _activation(name: Any, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise CheckpointError(f"{where}: hidden_act {name!r} is not supported; imagefm knows "
                              f"{', '.join(sorted(_ACT_FROM_HF))}")
    return _ACT_FROM_HF[name]


def _square(value: Any, name: str, where: str) -> int:
    """HF allows int or [h, w] for image/patch sizes; our towers are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: {name} {value} is not square; imagefm towers are")
        value = value[0]
    return int(value)


def _vision(v: dict[str, Any], where: str, **structure: Any) -> VisionConfig:
    return VisionConfig(
        image_size=_square(v["image_size"], "vision_config.image_size", where),
        patch_size=_square(v["patch_size"], "vision_config.patch_size", where),
        width=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"], act=_activation(v["hidden_act"], where),
        norm_eps=float(v["layer_norm_eps"]), in_channels=v["num_channels"], **structure)


def _text(t: dict[str, Any], where: str, **structure: Any) -> TextConfig:
    structure.setdefault("use_padding_mask", True)
    return TextConfig(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
        width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
        mlp_dim=t["intermediate_size"], act=_activation(t["hidden_act"], where),
        norm_eps=float(t["layer_norm_eps"]), **structure)


def _clip_text_pooling(eos: Any, where: str) -> dict[str, Any]:
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int):
        raise CheckpointError(f"{where}: text_config.eos_token_id {eos!r} must be one integer "
                              f"(HF CLIP pools the text at that token)")
    if eos == LEGACY_CLIP_EOS:
        return {"pool": "argmax", "eos_token_id": None}
    return {"pool": "eos", "eos_token_id": eos}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> DualEncoderConfig:
    """Our config from a Hugging Face ``config.json`` of a ``CLIPModel`` or ``SiglipModel``."""
    model_type = hf.get("model_type")
    try:
        if model_type == "clip":
            text = _sub_config(hf, "text", _CLIP_TEXT_DEFAULTS)
            vision = _sub_config(hf, "vision", _CLIP_VISION_DEFAULTS)
            return DualEncoderConfig(
                model_type="clip",
                vision=_vision(vision, where, class_token=True, patch_bias=False, pre_norm=True,
                               pool="cls"),
                text=_text(text, where, causal=True,
                           **_clip_text_pooling(text["eos_token_id"], where)),
                embed_dim=int(hf.get("projection_dim") or 512),
                image_projection="linear", text_projection="linear",
                init_logit_scale=float(hf.get("logit_scale_init_value", 2.6592)))
        if model_type == "siglip":
            text = _sub_config(hf, "text", _SIGLIP_TEXT_DEFAULTS)
            vision = _sub_config(hf, "vision", _SIGLIP_VISION_DEFAULTS)
            use_head = bool(vision["vision_use_head"])
            return DualEncoderConfig(
                model_type="siglip",
                vision=_vision(vision, where, class_token=False, patch_bias=True, pre_norm=False,
                               pool="map" if use_head else "mean"),
                # SigLIP is trained on text padded to 64 with no mask (big_vision), and run so by
                # HF's processor (it returns no attention_mask) and open_clip: a mask passed in
                # is ignored, so every caller gets the embeddings the model was trained for.
                text=_text(text, where, causal=False, pool="last", use_padding_mask=False),
                embed_dim=int(text["projection_size"] or text["hidden_size"]),
                image_projection="none", text_projection="linear_bias",
                init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None
    raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; imagefm reads "
                          f"Hugging Face 'clip' (CLIPModel) and 'siglip' (SiglipModel)")


# --- reading -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF directory: safetensors (single or sharded), else a weights-only
    pickle."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".index.json"):
                return load_sharded(directory, name)
            return load_state_dict_file(path)
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_tokenizer_files(directory: Path) -> Any | None:
    """The tokenizer saved in ``directory``, or None when there are no tokenizer files.

    A tokenizer that is present but cannot be read gives a warning, not a failed model load:
    the image tower is still usable, and ``Processor`` says clearly when a tokenizer is missing.
    """
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from imagefm.tokenizer import Tokenizer

    try:
        if (directory / "imagefm_tokenizer.json").is_file():
            return Tokenizer.from_pretrained(directory)
        return Tokenizer.from_hf_dir(directory)
    except (OSError, ValueError) as err:
        warnings.warn(f"{directory}: tokenizer files present but not readable, loading the model "
                      f"without a tokenizer: {err}", stacklevel=3)
        return None


def _read_card(directory: Path, config: DualEncoderConfig) -> ImageCard:
    path = directory / PREPROCESSOR_FILE
    return card_from_hf(_read_json(path) if path.is_file() else None, config, str(path))


def load_hf(path: str | Path, *, strict: bool = True) -> DualEncoder:
    """Load a Hugging Face ``CLIPModel`` or ``SiglipModel`` directory as a :class:`DualEncoder`.

    ``strict`` (default) fails with a report naming every missing, unexpected or mis-shaped key.
    """
    directory = Path(path)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    with empty_parameters():
        model = DualEncoder(config, _read_card(directory, config))
    load_with_key_map(model, KEY_MAPS[config.model_type], read_hf_weights(directory),
                      strict=strict, where=str(directory))
    model.tokenizer = load_tokenizer_files(directory)
    return model.eval()


def load_hf_processor(path: str | Path) -> Any:
    """The :class:`~imagefm.processor.Processor` of an HF CLIP/SigLIP directory."""
    from imagefm.processor import Processor

    directory = Path(path)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    return Processor(_read_card(directory, config), load_tokenizer_files(directory))


# --- writing -------------------------------------------------------------------------------------

def _hf_problems(config: DualEncoderConfig) -> list[str]:
    """Why HF's class for ``config.model_type`` cannot compute what this model computes."""
    v, t = config.vision, config.text
    if config.model_type == "clip":
        wanted = {"vision.class_token": (v.class_token, True),
                  "vision.pre_norm": (v.pre_norm, True),
                  "vision.patch_bias": (v.patch_bias, False), "vision.pool": (v.pool, "cls"),
                  "text.causal": (t.causal, True),
                  "image_projection": (config.image_projection, "linear"),
                  "text_projection": (config.text_projection, "linear")}
        problems = [f"{name} = {have!r} (CLIPModel needs {need!r})"
                    for name, (have, need) in wanted.items() if have != need]
        if t.pool not in ("argmax", "eos"):
            problems.append(f"text.pool = {t.pool!r} (CLIPModel pools at argmax or the EOS id)")
        if t.pool == "eos" and t.eos_token_id == LEGACY_CLIP_EOS:
            problems.append("text.pool = 'eos' with eos_token_id = 2 (HF reads eos_token_id 2 "
                            "as the legacy argmax rule)")
        if config.init_logit_bias is not None:
            problems.append("a logit_bias (CLIPModel has none)")
        return problems
    wanted = {"vision.class_token": (v.class_token, False), "vision.pre_norm": (v.pre_norm, False),
              "vision.patch_bias": (v.patch_bias, True), "text.causal": (t.causal, False),
              "text.pool": (t.pool, "last"), "image_projection": (config.image_projection, "none"),
              "text_projection": (config.text_projection, "linear_bias")}
    problems = [f"{name} = {have!r} (SiglipModel needs {need!r})"
                for name, (have, need) in wanted.items() if have != need]
    if v.pool not in ("map", "mean"):
        problems.append(f"vision.pool = {v.pool!r} (SiglipModel has the 'map' head or none)")
    return problems


def config_to_hf(config: DualEncoderConfig, logit_scale: float,
                 tokenizer: Any | None = None) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``config`` (raises if there is none)."""
    problems = _hf_problems(config)
    if problems:
        raise CheckpointError(f"cannot export this {config.model_type} model to Hugging Face "
                              f"format:\n  " + "\n  ".join(problems))
    v, t = config.vision, config.text
    vision = {"hidden_size": v.width, "intermediate_size": v.mlp_dim,
              "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
              "num_channels": v.in_channels, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": _ACT_TO_HF[v.act],
              "layer_norm_eps": v.norm_eps}
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": _ACT_TO_HF[t.act],
            "layer_norm_eps": t.norm_eps}
    if tokenizer is not None:
        text["pad_token_id"] = tokenizer.pad_id
        if tokenizer.bos_id is not None:
            text["bos_token_id"] = tokenizer.bos_id
    if config.model_type == "clip":
        # eos_token_id is HF CLIP's pooling switch: 2 selects argmax, anything else that id.
        text["eos_token_id"] = LEGACY_CLIP_EOS if t.pool == "argmax" else t.eos_token_id
        return {"architectures": ["CLIPModel"], "model_type": "clip",
                "projection_dim": config.embed_dim, "logit_scale_init_value": logit_scale,
                "text_config": {"model_type": "clip_text_model", **text,
                                "projection_dim": config.embed_dim},
                "vision_config": {"model_type": "clip_vision_model", **vision,
                                  "projection_dim": config.embed_dim},
                "dtype": "float32"}
    if tokenizer is not None and tokenizer.eos_id is not None:
        text["eos_token_id"] = tokenizer.eos_id
    return {"architectures": ["SiglipModel"], "model_type": "siglip",
            "text_config": {"model_type": "siglip_text_model", **text,
                            "projection_size": config.embed_dim},
            "vision_config": {"model_type": "siglip_vision_model", **vision,
                              "vision_use_head": v.pool == "map"},
            "dtype": "float32"}


def _hf_tokenizer_config(tokenizer: Any, model_type: str) -> dict[str, Any]:
    """tokenizer_config.json naming the special tokens, so ``Tokenizer.from_hf_dir`` (and HF)
    know the tokenizer's rules."""
    def token(index: int | None) -> str | None:
        return None if index is None else tokenizer.id_to_token(index)

    data = {"tokenizer_class": "CLIPTokenizer" if model_type == "clip" else "SiglipTokenizer",
            "model_max_length": tokenizer.context_length, "eos_token": token(tokenizer.eos_id),
            "pad_token": token(tokenizer.pad_id)}
    if model_type == "siglip" and tokenizer.settings()["backend"] == "tokenizers":
        # SigLIP 2's Gemma tokenizer (tokenizer.json): HF's SiglipTokenizer needs spiece.model.
        data.update(tokenizer_class="GemmaTokenizer", padding_side="right",
                    add_bos_token=tokenizer.bos_id is not None,
                    add_eos_token=tokenizer.eos_id is not None,
                    do_lower_case=tokenizer.settings()["lowercase"])
    if tokenizer.bos_id is not None:
        data["bos_token"] = token(tokenizer.bos_id)
    return data


def export_hf(model: DualEncoder, path: str | Path) -> Path:
    """Write ``model`` as a Hugging Face directory that ``CLIPModel.from_pretrained`` /
    ``SiglipModel.from_pretrained`` load: config.json, model.safetensors,
    preprocessor_config.json and, when the model has a tokenizer, its files.

    Raises :class:`CheckpointError` naming the fields HF's class cannot express (e.g. CLIP with
    mean pooling). Note: HF applies ``attention_mask`` to text keys whenever it is passed; a
    model trained with ``use_padding_mask = False`` gives the same CLIP outputs for right-padded
    text (causal attention never looks past the EOS), but SigLIP's bidirectional text tower only
    agrees when no mask (or an all-ones mask) is passed.
    """
    config = model.config
    directory = Path(path)
    hf_config = config_to_hf(config, float(model.logit_scale.detach()), model.tokenizer)
    if config.model_type == "siglip" and not config.text.use_padding_mask:
        warnings.warn("this SigLIP model ignores attention_mask; the exported HF model applies "
                      "it when given, so call it without one", stacklevel=2)
    if config.model_type == "siglip" and config.vision.pool == "mean":
        warnings.warn("SiglipModel without the attention-pool head has no pooled image output; "
                      "HF gives the tokens (last_hidden_state), imagefm reloads it with mean "
                      "pooling", stacklevel=2)
    state = dict(model.state_dict())
    if config.model_type == "siglip" and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros(())  # SiglipModel always has one; 0 changes nothing
    weights = KEY_MAPS[config.model_type].to_source(state)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(weights, directory / WEIGHT_FILES[0], metadata={"format": "pt"})
    atomic_write_text(directory / PREPROCESSOR_FILE, json.dumps(card_to_hf(model.card), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
        atomic_write_text(directory / "tokenizer_config.json",
                          json.dumps(_hf_tokenizer_config(model.tokenizer, config.model_type),
                                     indent=2, ensure_ascii=False))
    # config.json last: its presence marks a complete directory.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2))
    return directory
