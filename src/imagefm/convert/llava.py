"""Hugging Face ``LlavaForConditionalGeneration`` directories → :class:`imagefm.models.vlm.VLM`.

Several key layouts exist, and all load (the roots are read off the checkpoint's keys):

- transformers < 4.52: ``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
  ``language_model.model.*`` and ``language_model.lm_head.weight``;
- 4.52 and later, in memory: ``model.vision_tower.vision_model.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*`` and ``lm_head.weight``;
- transformers 5 saves the language model under the old names again, and the vision tower
  without its ``vision_model.`` level (``vision_tower.encoder.*``).

The tower rules are the CLIP/SigLIP vision rules of :mod:`imagefm.convert.hf` and the LM rules of
:mod:`imagefm.convert.llama`, re-rooted; only the projector's two rules are new here.
``vision_feature_layer`` and ``vision_feature_select_strategy`` carry over into the config.

And back (:func:`export_llava`): config files as transformers 5 writes them, the weights under
the published (transformers < 4.52) names, which every version reads; VLMs LLaVA cannot
express (pixel-shuffle projector, EfficientNet tower, ...) are refused, naming the fields.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imagefm.checkpoint import CheckpointError, empty_parameters, save_state_dict
from imagefm.config import ConfigError, VisionConfig
from imagefm.convert.hf import (
    _ACT_TO_HF,
    _CLIP_VISION_DEFAULTS,
    _SIGLIP_VISION_DEFAULTS,
    CLIP_KEY_MAP,
    SIGLIP_KEY_MAP,
    _read_json,
    _sub_config,
    _vision,
    read_hf_weights,
)
from imagefm.convert.hf_card import _RESAMPLE_TO_HF, PREPROCESSOR_FILE, card_from_hf, card_to_hf
from imagefm.convert.hf_vlm import (
    check_token,
    dtype_name,
    float_state_dict,
    make_directory,
    refuse,
    text_config,
    write_generation_config,
    write_json,
    write_tokenizer,
)
from imagefm.convert.keymap import KeyMap, Rule, load_with_key_map, rule
from imagefm.convert.llama import (
    CONFIG_FILE,
    config_from_hf_lm,
    hf_lm_key_map,
    load_lm_tokenizer,
    read_chat_template,
)
from imagefm.models.vlm import VLM, VLMConfig
from imagefm.vlm_processor import VLMProcessor

PROCESSOR_FILE = "processor_config.json"

_TOWERS = {  # vision_config.model_type -> (defaults, structure, key map)
    "clip_vision_model": (_CLIP_VISION_DEFAULTS,
                          dict(class_token=True, patch_bias=False, pre_norm=True, pool="cls"),
                          CLIP_KEY_MAP),
    "siglip_vision_model": (_SIGLIP_VISION_DEFAULTS,
                            dict(class_token=False, patch_bias=True, pre_norm=False, pool="mean"),
                            SIGLIP_KEY_MAP),
}
_ACTIVATIONS = ("gelu",)  # LLaVA's projector_hidden_act; our mlp2x_gelu is exact GELU


def _rerooted(rules: tuple[Rule, ...], source_from: str, source_to: str, ours_to: str
              ) -> list[Rule]:
    """``rules`` whose source names start with ``source_from``, moved under new roots."""
    out = []
    for r in rules:
        if r.source.startswith(source_from):
            source = source_to + r.source[len(source_from):]
            out.append(rule(source, [ours_to + name for name in r.ours], r.transform))
    return out


def _prefix(keys: list[str], suffix: str, default: str) -> str:
    """What comes before ``suffix`` in the key that ends with it (``default`` if none does)."""
    found = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
    return min(found, key=len) if found else default


def llava_key_map(config: VLMConfig, vision_type: str, keys: list[str]) -> KeyMap:
    """The key map for a checkpoint whose key names are ``keys``.

    Each part's root is read off the keys: the vision tower under ``vision_tower.vision_model.``
    (transformers 4), ``vision_tower.`` (5) or either under ``model.``; the LM under
    ``language_model.model.`` or ``model.language_model.``; the head as ``lm_head.weight`` or
    ``language_model.lm_head.weight``.
    """
    vision_root = _prefix(keys, "embeddings.patch_embedding.weight", "vision_tower.vision_model.")
    projector_root = _prefix(keys, "linear_1.weight", "multi_modal_projector.")
    lm_root = _prefix(keys, "embed_tokens.weight", "language_model.model.")
    head = ("language_model.lm_head.weight" if "language_model.lm_head.weight" in keys
            else "lm_head.weight")
    tower_map = _TOWERS[vision_type][2]
    lm_map = hf_lm_key_map(config.lm)
    vision_rules = tuple(r for r in tower_map.rules if r.source.startswith("vision_model."))
    # Our dual encoder's tower is "vision.*" and so is the VLM's: only the source side moves.
    rules = _rerooted(vision_rules, "vision_model.", vision_root, "")
    rules += _rerooted(lm_map.rules, "model.", lm_root, "lm.")
    rules += [rule(head, "lm." + r.ours[0], r.transform) for r in lm_map.rules
              if r.source == "lm_head.weight"]
    for index in (1, 2):
        rules += [rule(f"{projector_root}linear_{index}.{p}", f"projector.fc{index}.{p}")
                  for p in ("weight", "bias")]
    ignore = [f"{vision_root}embeddings.position_ids",
              f"{lm_root}layers.{{i}}.self_attn.rotary_emb.inv_freq",
              f"{lm_root}rotary_emb.inv_freq"]
    if config.lm.tie_embeddings:
        ignore.append(head)
    return KeyMap(f"Hugging Face LLaVA (vision at {vision_root!r}, LM at {lm_root!r})",
                  tuple(rules), tuple(ignore))


def config_from_llava(hf: dict[str, Any], where: str = CONFIG_FILE) -> tuple[VLMConfig, str]:
    """Our config (and the vision tower's HF model type) from a LLaVA ``config.json``."""
    if hf.get("model_type") != "llava":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not 'llava'")
    vision_type = (hf.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if vision_type not in _TOWERS:
        raise CheckpointError(f"{where}: vision tower {vision_type!r} is not supported; imagefm "
                              f"reads {', '.join(_TOWERS)}")
    defaults, structure, _ = _TOWERS[vision_type]
    vision = _sub_config(hf, "vision", defaults)
    if vision.get("vision_use_head"):  # loaded, though LLaVA reads hidden states, not the head
        structure = {**structure, "pool": "map"}
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    act = hf.get("projector_hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: projector_hidden_act {act!r} is not supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r}: imagefm reads one "
                              f"layer, not a list of layers")
    token = hf.get("image_token_id", hf.get("image_token_index", 32000))
    try:
        config = VLMConfig(
            vision=_vision(vision, where, **structure),
            lm=config_from_hf_lm(text, where), image_token_id=int(token),
            projector="mlp2x_gelu", projector_bias=bool(hf.get("multimodal_projector_bias",
                                                                  True)),
            vision_feature_layer=layer,
            vision_feature_select=hf.get("vision_feature_select_strategy", "default"))
    except ConfigError as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None
    return config, vision_type


def load_llava(path: str | Path, *, strict: bool = True) -> VLM:
    """Load an HF LLaVA directory (weights, tokenizer, chat template, image card)."""
    directory = Path(path)
    hf = _read_json(directory / CONFIG_FILE)
    config, vision_type = config_from_llava(hf, str(directory / CONFIG_FILE))
    with empty_parameters():
        model = VLM(config, llava_card(directory, config, vision_type))
    weights = read_hf_weights(directory)
    key_map = llava_key_map(config, vision_type, list(weights))
    load_with_key_map(model, key_map, weights, strict=strict, where=str(directory))
    model.tokenizer = load_lm_tokenizer(directory, config.lm)
    model.chat_template = read_chat_template(directory)
    return model.eval()


def llava_card(directory: Path, config: VLMConfig, vision_type: str) -> Any:
    """The image card: preprocessor_config.json (the published checkpoints), or the
    ``image_processor`` entry of processor_config.json (what transformers 5 writes)."""
    path = directory / PREPROCESSOR_FILE
    if path.is_file():
        pre = _read_json(path)
    else:
        path = directory / PROCESSOR_FILE
        pre = _read_json(path).get("image_processor") if path.is_file() else None
    # card_from_hf reads the model type and the tower's size from a dual-encoder config.
    kind = "siglip" if vision_type == "siglip_vision_model" else "clip"
    return card_from_hf(pre, SimpleNamespace(model_type=kind, vision=config.vision), str(path))


def load_llava_processor(path: str | Path) -> VLMProcessor:
    """The :class:`~imagefm.vlm_processor.VLMProcessor` of an HF LLaVA directory, without
    loading its weights."""
    directory = Path(path)
    config, vision_type = config_from_llava(_read_json(directory / CONFIG_FILE))
    card = llava_card(directory, config, vision_type)
    tokenizer = load_lm_tokenizer(directory, config.lm)
    return VLMProcessor.from_parts(config, card, tokenizer, read_chat_template(directory))


# --- export: VLM → a Hugging Face LLaVA directory -------------------------------------------------

# The key names of the published llava-hf checkpoints (transformers < 4.52 wrote them; every
# later version reads them, and so do tools built for those checkpoints).
PUBLISHED_KEYS = ["vision_tower.vision_model.embeddings.patch_embedding.weight",
                  "multi_modal_projector.linear_1.weight",
                  "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"]
_STRUCTURES = {name: {k: v for k, v in structure.items() if k != "pool"}
               for name, (_, structure, _) in _TOWERS.items()}


def hf_vision_tower(vision: VisionConfig) -> tuple[str, dict[str, Any], list[str]]:
    """(HF model type, ``vision_config``, problems) of the CLIP or SigLIP vision model equal to
    ``vision``: its structure picks the kind, the problems are what neither can express."""
    have = {k: getattr(vision, k) for k in ("class_token", "patch_bias", "pre_norm")}
    kind = next((name for name, structure in _STRUCTURES.items() if structure == have), None)
    problems = []
    if kind is None:
        problems.append(f"vision class_token / patch_bias / pre_norm = {have} (CLIP's vision "
                        f"model has {_STRUCTURES['clip_vision_model']}, SigLIP's "
                        f"{_STRUCTURES['siglip_vision_model']})")
    if vision.stem != "patch" or vision.naflex:
        problems.append(f"vision.stem = {vision.stem!r}, vision.naflex = {vision.naflex} (the HF "
                        f"towers embed fixed-size images with one patch convolution)")
    if kind == "clip_vision_model" and vision.pool == "map":
        problems.append("vision.pool = 'map' (CLIP's vision model has no attention-pool head)")
    if vision.act not in _ACT_TO_HF:
        problems.append(f"vision.act = {vision.act!r} (not an activation of the HF towers)")
    config = {"model_type": kind or "clip_vision_model", "hidden_size": vision.width,
              "intermediate_size": vision.mlp_dim, "num_hidden_layers": vision.layers,
              "num_attention_heads": vision.heads, "num_channels": vision.in_channels,
              "image_size": vision.image_size, "patch_size": vision.patch_size,
              "hidden_act": _ACT_TO_HF.get(vision.act), "layer_norm_eps": vision.norm_eps}
    if kind == "siglip_vision_model":
        config["vision_use_head"] = vision.pool == "map"
    return config["model_type"], config, problems


def hf_text_config(lm: Any, problems: list[str]) -> dict[str, Any]:
    """The LM's ``text_config`` (an empty one, with the reason added to ``problems``, when no HF
    decoder class computes what it does)."""
    try:
        return text_config(lm)
    except CheckpointError as err:
        problems.append(f"lm: {err}")
        return {}


def _feature_select(config: VLMConfig) -> str:
    """HF's ``vision_feature_select_strategy``: 'default' drops the first token, whatever it is;
    ours drops a class token only, so a tower without one is 'full' there."""
    drops = config.vision.class_token and not config.keeps_class_token
    return "default" if drops else "full"


def config_to_llava(model: VLM) -> dict[str, Any]:
    """The ``config.json`` transformers 5 writes for the ``LlavaForConditionalGeneration`` equal
    to ``model`` (raises with every field it cannot express)."""
    config, card = model.config, model.card
    if not config.is_vit:
        refuse("LlavaForConditionalGeneration", [
            "vision: an EfficientNet-Lite tower (LLaVA's is a CLIP or SigLIP vision transformer)"])
    _, vision, problems = hf_vision_tower(config.vision)
    text = hf_text_config(config.lm, problems)
    if config.projector != "mlp2x_gelu":
        problems.append(f"projector = {config.projector!r} (LLaVA's is 'mlp2x_gelu')")
    if card.resize_mode not in ("shortest", "squash") or card.image_size != vision["image_size"]:
        problems.append(f"card: {card.resize_mode} resize to {card.image_size} px (LLaVA's "
                        f"processor gives the tower its {vision['image_size']} px, by a "
                        f"shortest-side resize and crop or a squash)")
    if card.interpolation not in _RESAMPLE_TO_HF:
        problems.append(f"card.interpolation = {card.interpolation!r}")
    problems += check_token(model.tokenizer, "image_token", config.image_token,
                            config.image_token_id)
    refuse("LlavaForConditionalGeneration", problems)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": config.image_token_id,
            "image_seq_length": config.image_tokens, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": config.projector_bias,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": _feature_select(config),
            "tie_word_embeddings": config.lm.tie_embeddings, "dtype": dtype_name(model),
            "text_config": text, "vision_config": vision}


def export_llava(model: VLM, path: str | Path) -> Path:
    """Write ``model`` as the directory transformers' ``LlavaForConditionalGeneration`` (and
    ``AutoProcessor``: ``LlavaProcessor`` with CLIP's or SigLIP's image processor) loads:
    config.json, model.safetensors under the published key names, generation_config.json,
    processor_config.json, the tokenizer and chat template.

    Raises :class:`CheckpointError` naming every field LLaVA cannot express (a pixel-shuffle
    projector, an EfficientNet tower, ...).
    """
    directory = Path(path)
    hf_config = config_to_llava(model)
    config = model.config
    key_map = llava_key_map(config, hf_config["vision_config"]["model_type"], PUBLISHED_KEYS)
    weights = key_map.to_source(float_state_dict(model))
    processor = {"processor_class": "LlavaProcessor", "image_processor": card_to_hf(model.card),
                 "image_token": config.image_token, "patch_size": config.vision.patch_size,
                 "vision_feature_select_strategy": _feature_select(config),
                 "num_additional_image_tokens": int(config.vision.class_token)}
    directory = make_directory(directory)
    save_state_dict(weights, directory / "model.safetensors", metadata={"format": "pt"})
    write_generation_config(directory, config.lm)
    write_json(directory / PROCESSOR_FILE, processor)
    write_tokenizer(directory, model, config.lm, "LlavaProcessor")
    write_json(directory / CONFIG_FILE, hf_config)  # last: marks a complete directory
    return directory
