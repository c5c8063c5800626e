"""Hugging Face ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``
directories → imagefm's :class:`~imagefm.models.qwen_vl.QwenVL`.

Detect by ``config.json`` ``model_type`` ``"qwen2_vl"`` or ``"qwen2_5_vl"``. Two key layouts exist
and both load (the roots are read off the checkpoint's keys):

- the published checkpoints, and what transformers 5 saves: ``visual.*``, ``model.*`` (the LM)
  and ``lm_head.weight``;
- transformers 4.52-4.57: ``model.visual.*``, ``model.language_model.*`` and ``lm_head.weight``.

Renamed on the way in: the vision attention's fused ``qkv`` splits into q/k/v_proj and ``proj``
becomes o_proj; the Conv3d patch embedding (kernel = stride) becomes the ``Linear`` it is; the
merger's ``ln_q``/``mlp.0``/``mlp.2`` become norm/fc1/fc2 (Qwen2.5-VL's gated vision MLP keeps
its gate/up/down_proj names). The LM rules are
:mod:`imagefm.convert.llama`'s, re-rooted. config.json comes in two shapes as well: the published
one is flat (the LM's fields at the top, ``rope_scaling: {"type": "mrope", ...}``), newer ones nest
``text_config``; preprocessor_config.json gives min/max pixels, mean and std (``min_pixels`` or
``size.shortest_edge``; transformers 5 writes them into processor_config.json instead). The video
processor's settings come, as the reference looks for them, from processor_config.json's
``video_processor``, else video_preprocessor_config.json, else preprocessor_config.json (the
published checkpoints: videos then share the images' pixel bounds); Qwen2.5-VL's
``vision_config.tokens_per_second`` sets its absolute-time M-RoPE for videos.
``transformers`` is never imported.

And back (:func:`export_qwen2_vl`): the layout transformers 5 writes (nested ``text_config`` with
``rope_parameters``, processor_config.json with the image and video processors nested), the
weights under the published names; what the HF classes cannot express is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, save_state_dict
from imagefm.config import ConfigError
from imagefm.convert.hf import _ACT_TO_HF as _HF_ACTIVATIONS
from imagefm.convert.hf import _read_json
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
from imagefm.convert.keymap import KeyMap, Rule, reshape, rule, split
from imagefm.convert.llama import hf_lm_key_map
from imagefm.convert.llava import _prefix, _rerooted
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.qwen2_vl_vision import QwenVisionConfig
from imagefm.models.qwen_vl import QwenImageConfig, QwenVideoConfig, QwenVL, QwenVLConfig
from imagefm.qwen_vl_processor import QwenVLProcessor

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# transformers' defaults (configuration_qwen2_vl.py, image_processing_qwen2_vl.py) for fields a
# file may leave out.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=151643, eos_token_id=151645,
    pad_token_id=None, use_sliding_window=False)
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                     mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=4),
}
_TOKEN_DEFAULTS = dict(image_token_id=151655, video_token_id=151656,
                       vision_start_token_id=151652, vision_end_token_id=151653)
_TEXT_ROPE_THETA, _VISION_ROPE_THETA = 1000000.0, 10000.0
_MROPE_SECTION = [16, 24, 24]
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "silu": "silu", "relu": "relu"}


# --- config.json / preprocessor_config.json → QwenVLConfig ---------------------------------------

def _text_config(hf: dict[str, Any], where: str) -> DecoderConfig:
    text = hf.get("text_config") or hf  # nested (newer) or flat (the published configs)
    c = {**_TEXT_DEFAULTS, **text}
    if c.get("use_sliding_window"):
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    rope = dict(text.get("rope_scaling") or {})
    rope.update(text.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (Qwen2-VL uses "
                              f"M-RoPE without scaling)")
    eos = c.get("eos_token_id")
    heads = int(c["num_attention_heads"])
    return DecoderConfig(
        model_type="qwen2", vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]),
        layers=int(c["num_hidden_layers"]), heads=heads,
        kv_heads=int(c["num_key_value_heads"] or heads), mlp_dim=int(c["intermediate_size"]),
        act={"swish": "silu"}.get(c["hidden_act"], c["hidden_act"]),
        norm_eps=float(c["rms_norm_eps"]), context_length=int(c["max_position_embeddings"]),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", _TEXT_ROPE_THETA))),
        mrope_section=tuple(rope.get("mrope_section", _MROPE_SECTION)), qkv_bias=True,
        # Before transformers 5 the flag sat in text_config; 5 reads it at the top.
        tie_embeddings=bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        pad_token_id=c.get("pad_token_id"))


def _vision_config(hf: dict[str, Any], where: str) -> QwenVisionConfig:
    model_type = hf["model_type"]
    v = {**_VISION_DEFAULTS[model_type], **(hf.get("vision_config") or {})}
    act = v["hidden_act"]
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: vision hidden_act {act!r} is not supported")
    rope = v.get("rope_parameters") or {}
    common = dict(layers=int(v["depth"]), heads=int(v["num_heads"]), act=_ACTIVATIONS[act],
                  patch_size=int(v["patch_size"]),
                  temporal_patch_size=int(v["temporal_patch_size"]),
                  in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
                  merge_size=int(v["spatial_merge_size"]),
                  rope_theta=float(rope.get("rope_theta", _VISION_ROPE_THETA)),
                  model_type=f"{model_type}_vision")
    if model_type == "qwen2_vl":  # hidden_size is the LM's width here
        width = int(v["embed_dim"])
        return QwenVisionConfig(width=width, mlp_dim=int(width * v["mlp_ratio"]),
                                out_width=int(v["hidden_size"]), **common)
    return QwenVisionConfig(  # Qwen2.5-VL: hidden_size is the tower's own width
        width=int(v["hidden_size"]), mlp_dim=int(v["intermediate_size"]),
        out_width=int(v["out_hidden_size"]), norm="rmsnorm", gated_mlp=True,
        window_size=int(v["window_size"]),
        full_attention_layers=tuple(v["fullatt_block_indexes"]), **common)


def image_config_from_hf(pre: dict[str, Any] | None, vision: QwenVisionConfig,
                         where: str = PREPROCESSOR_FILE) -> QwenImageConfig:
    """The processor settings of a ``Qwen2VLImageProcessor`` config (defaults when absent);
    settings our processor does not compute are refused."""
    pre = dict(pre or {})
    size = pre.get("size") or {}
    for key, ours in (("patch_size", vision.patch_size), ("merge_size", vision.merge_size),
                      ("temporal_patch_size", vision.temporal_patch_size)):
        if pre.get(key, ours) != ours:
            raise CheckpointError(f"{where}: {key} {pre[key]} differs from the vision tower's "
                                  f"{ours}")
    interpolation = image_interpolation(
        pre, where, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
    defaults = QwenImageConfig()
    try:
        return QwenImageConfig(
            min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge")
                           or defaults.min_pixels),
            max_pixels=int(pre.get("max_pixels") or size.get("longest_edge")
                           or defaults.max_pixels),
            interpolation=interpolation,
            mean=tuple(pre.get("image_mean", defaults.mean)),
            std=tuple(pre.get("image_std", defaults.std)))
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def video_config_from_hf(pre: dict[str, Any] | None, vision: QwenVisionConfig,
                         where: str = VIDEO_PREPROCESSOR_FILE) -> QwenVideoConfig:
    """The settings of a ``Qwen2VLVideoProcessor`` config (its defaults when absent), checked
    as the image processor's. Its ``fps`` / ``do_sample_frames`` (frame sampling) do not apply:
    imagefm uses the frames it is given."""
    pre = dict(pre or {})
    size = pre.get("size") or {}
    defaults = QwenVideoConfig()
    image = image_config_from_hf(
        {**pre, "min_pixels": pre.get("min_pixels") or size.get("shortest_edge")
         or defaults.min_pixels,
         "max_pixels": pre.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels},
        vision, where)
    cap = int(pre.get("max_video_tokens", 128000)) if pre.get("cap_pixels_per_frame") else 0
    try:
        return QwenVideoConfig(**dataclasses.asdict(image), max_video_tokens=cap)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _tokens_per_second(hf: dict[str, Any]) -> float | None:
    """Qwen2.5-VL's temporal M-RoPE positions per second of video (None for Qwen2-VL)."""
    if hf["model_type"] != "qwen2_5_vl":
        return None
    vision = {**_VISION_DEFAULTS["qwen2_5_vl"], **(hf.get("vision_config") or {})}
    return float(vision["tokens_per_second"])


def config_from_qwen2_vl(hf: dict[str, Any], pre: dict[str, Any] | None = None,
                         where: str = CONFIG_FILE,
                         video: dict[str, Any] | None = None) -> QwenVLConfig:
    """Our config from a Qwen2-VL / Qwen2.5-VL ``config.json`` (and the image and video
    processors' settings)."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not one of "
                              f"{', '.join(MODEL_TYPES)}")
    try:
        vision = _vision_config(hf, where)
        tokens = {k: int(hf.get(k, v)) for k, v in _TOKEN_DEFAULTS.items()}
        return QwenVLConfig(vision=vision, lm=_text_config(hf, where),
                            image=image_config_from_hf(pre, vision), model_type=hf["model_type"],
                            video=video_config_from_hf(video, vision),
                            tokens_per_second=_tokens_per_second(hf), **tokens)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


# --- the key map ---------------------------------------------------------------------------------

def qwen2_vl_key_map(config: QwenVLConfig, keys: list[str]) -> KeyMap:
    """HF names → ours, for a checkpoint whose key names are ``keys`` (see the module
    docstring for the layouts)."""
    vision_root = _prefix(keys, "patch_embed.proj.weight", "visual.")
    lm_root = _prefix(keys, "embed_tokens.weight", "model.")
    v = config.vision
    conv_shape = (v.width, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    block = vision_root + "blocks.{i}."
    rules: list[Rule] = [rule(vision_root + "patch_embed.proj.weight", "vision.patch_embed.weight",
                              reshape(conv_shape))]
    for p in ("weight", "bias"):
        rules += [
            rule(f"{block}norm1.{p}", f"vision.blocks.{{i}}.norm1.{p}"),
            rule(f"{block}norm2.{p}", f"vision.blocks.{{i}}.norm2.{p}"),
            rule(f"{block}attn.qkv.{p}", [f"vision.blocks.{{i}}.attn.{x}_proj.{p}" for x in "qkv"],
                 split(3)),
            rule(f"{block}attn.proj.{p}", f"vision.blocks.{{i}}.attn.o_proj.{p}"),
            rule(f"{block}mlp.fc1.{p}", f"vision.blocks.{{i}}.mlp.fc1.{p}"),
            rule(f"{block}mlp.fc2.{p}", f"vision.blocks.{{i}}.mlp.fc2.{p}"),
            *(rule(f"{block}mlp.{x}.{p}", f"vision.blocks.{{i}}.mlp.{x}.{p}")
              for x in ("gate_proj", "up_proj", "down_proj")),  # Qwen2.5-VL
            rule(f"{vision_root}merger.ln_q.{p}", f"vision.merger.norm.{p}"),
            rule(f"{vision_root}merger.mlp.0.{p}", f"vision.merger.fc1.{p}"),
            rule(f"{vision_root}merger.mlp.2.{p}", f"vision.merger.fc2.{p}"),
        ]
    lm_map = hf_lm_key_map(config.lm)
    rules += _rerooted(lm_map.rules, "model.", lm_root, "lm.")
    rules += [rule(r.source, "lm." + r.ours[0]) for r in lm_map.rules
              if r.source == "lm_head.weight"]
    ignore = [f"{lm_root}layers.{{i}}.self_attn.rotary_emb.inv_freq",
              f"{lm_root}rotary_emb.inv_freq", f"{vision_root}rotary_pos_emb.inv_freq"]
    if config.lm.tie_embeddings:
        ignore.append("lm_head.weight")  # a saved copy of the tied embedding
    return KeyMap(f"Hugging Face Qwen2-VL (vision at {vision_root!r}, LM at {lm_root!r})",
                  tuple(rules), tuple(ignore))


# --- loading -------------------------------------------------------------------------------------

def _preprocessor(directory: Path) -> dict[str, Any] | None:
    """The image processor's settings: preprocessor_config.json (the published checkpoints), or
    the ``image_processor`` entry of processor_config.json (what transformers 5 writes)."""
    path = directory / PREPROCESSOR_FILE
    if path.is_file():
        return _read_json(path)
    path = directory / PROCESSOR_FILE
    return _read_json(path).get("image_processor") if path.is_file() else None


def _video_preprocessor(directory: Path) -> dict[str, Any] | None:
    """The video processor's settings, where the reference finds them: processor_config.json's
    ``video_processor``, video_preprocessor_config.json, or the image processor's
    preprocessor_config.json."""
    path = directory / PROCESSOR_FILE
    nested = _read_json(path).get("video_processor") if path.is_file() else None
    if nested is not None:
        return nested
    for name in (VIDEO_PREPROCESSOR_FILE, PREPROCESSOR_FILE):
        if (directory / name).is_file():
            return _read_json(directory / name)
    return None


def read_config(directory: Path) -> QwenVLConfig:
    """The config of an HF Qwen2-VL / Qwen2.5-VL directory: config.json and the image and video
    processors' settings."""
    return config_from_qwen2_vl(_read_json(directory / CONFIG_FILE), _preprocessor(directory),
                                str(directory / CONFIG_FILE), _video_preprocessor(directory))


def load_qwen2_vl(path: str | Path, *, strict: bool = True) -> QwenVL:
    """Load an HF Qwen2-VL or Qwen2.5-VL directory (weights, tokenizer, chat template,
    processor settings).
    ``strict`` fails on any missing, unexpected or mis-shaped key."""
    directory = Path(path)
    config = read_config(directory)
    return load_hf_vlm(QwenVL, config, directory, lambda keys: qwen2_vl_key_map(config, keys),
                       strict=strict)


def load_qwen2_vl_processor(path: str | Path) -> QwenVLProcessor:
    """The processor of a Qwen2-VL / Qwen2.5-VL directory (HF or imagefm format), without
    loading weights."""
    return load_hf_vlm_processor(QwenVLProcessor, path, read_config)


# --- export: QwenVL → a Hugging Face directory ---------------------------------------------------

_HF_CLASSES = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
               "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")}
# The placeholders Qwen2VLProcessor and the chat templates write, whatever the config says.
_HF_TOKENS = {"image_token": "<|image_pad|>", "vision_start_token": "<|vision_start|>",
              "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
_VISION_NORM_EPS = 1e-6  # fixed in the reference's vision blocks and merger


def _hf_problems(model: QwenVL) -> list[str]:
    """Why the HF class of ``config.model_type`` cannot compute what this model computes."""
    config = model.config
    v, lm, qwen25 = config.vision, config.lm, config.model_type == "qwen2_5_vl"
    target = _HF_CLASSES[config.model_type][0]
    wanted = {"vision.norm": (v.norm, "rmsnorm" if qwen25 else "layernorm"),
              "vision.gated_mlp": (v.gated_mlp, qwen25),
              "vision.norm_eps": (v.norm_eps, _VISION_NORM_EPS),
              "lm.qkv_bias": (lm.qkv_bias, True), "lm.o_bias": (lm.o_bias, False),
              "lm.mlp_bias": (lm.mlp_bias, False), "lm.qk_norm": (lm.qk_norm, False),
              "lm.rope_scaling": (lm.rope_scaling, "default"),
              "lm.head_dim": (lm.attn_head_dim, lm.width // lm.heads),
              **{name: (getattr(config, name), token) for name, token in _HF_TOKENS.items()}}
    problems = [f"{name} = {have!r} ({target} needs {need!r})"
                for name, (have, need) in wanted.items() if have != need]
    if v.act not in _HF_ACTIVATIONS:
        problems.append(f"vision.act = {v.act!r} (not an activation of the reference)")
    if qwen25 and not v.window_size:
        problems.append(f"vision.window_size = 0 ({target} attends within windows; set one, "
                        f"with every block in vision.full_attention_layers for none)")
    if not qwen25 and (v.window_size or v.full_attention_layers):
        problems.append(f"vision.window_size = {v.window_size}, vision.full_attention_layers = "
                        f"{list(v.full_attention_layers)} ({target} has no window attention)")
    if not qwen25 and v.mlp_dim % v.width:
        problems.append(f"vision.mlp_dim = {v.mlp_dim} ({target} has width {v.width} times a "
                        f"whole mlp_ratio)")
    per_second = config.tokens_per_second
    if qwen25 == (per_second is None) or (per_second is not None and per_second % 1):
        problems.append(f"tokens_per_second = {per_second} ({target} "
                        f"{'has a whole number' if qwen25 else 'has none'})")
    for name in ("image", "video"):
        if getattr(config, name).interpolation not in _RESAMPLE_TO_HF:
            problems.append(f"{name}.interpolation = {getattr(config, name).interpolation!r} "
                            f"(the reference resamples with {', '.join(_RESAMPLE_TO_HF)})")
    if config.video.fps != QwenVideoConfig.fps:
        problems.append(f"video.fps = {config.video.fps} (the reference assumes "
                        f"{QwenVideoConfig.fps} for frames given without a rate)")
    for name, index in (("image_token", config.image_token_id),
                        ("vision_start_token", config.vision_start_token_id),
                        ("vision_end_token", config.vision_end_token_id),
                        ("video_token", config.video_token_id)):
        problems += check_token(model.tokenizer, name, getattr(config, name), index)
    return problems


def _hf_vision(config: QwenVLConfig) -> dict[str, Any]:
    v, model_type = config.vision, config.model_type
    common = {"depth": v.layers, "num_heads": v.heads, "hidden_act": _HF_ACTIVATIONS[v.act],
              "in_channels": v.in_channels, "patch_size": v.patch_size,
              "spatial_merge_size": v.merge_size, "temporal_patch_size": v.temporal_patch_size,
              "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "axial"}}
    if model_type == "qwen2_vl":  # hidden_size is the LM's width (the merger's output) here
        return {"model_type": "qwen2_vl_vision", "embed_dim": v.width, "hidden_size": v.out_width,
                "mlp_ratio": v.mlp_dim // v.width, **common}
    return {"model_type": "qwen2_5_vl_vision", "hidden_size": v.width,
            "intermediate_size": v.mlp_dim, "out_hidden_size": v.out_width,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.full_attention_layers),
            "tokens_per_second": int(config.tokens_per_second or 0), **common}


def config_to_qwen2_vl(model: QwenVL) -> dict[str, Any]:
    """The ``config.json`` transformers 5 writes for the model equal to ``model`` (raises with
    every field its class cannot express)."""
    config = model.config
    refuse(_HF_CLASSES[config.model_type][0], _hf_problems(model))
    lm = config.lm
    text = {"model_type": f"{config.model_type}_text", "vocab_size": lm.vocab_size,
            "hidden_size": lm.width, "intermediate_size": lm.mlp_dim,
            "num_hidden_layers": lm.layers, "num_attention_heads": lm.heads,
            "num_key_value_heads": lm.kv_heads, "hidden_act": lm.act,
            "max_position_embeddings": lm.context_length, "rms_norm_eps": lm.norm_eps,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(lm.mrope_section),
                                "rope_theta": lm.rope_theta},
            "use_sliding_window": False, "bos_token_id": lm.bos_token_id,
            "eos_token_id": (lm.eos_token_ids[0] if len(lm.eos_token_ids) == 1
                             else list(lm.eos_token_ids) or None),
            "pad_token_id": lm.pad_token_id}
    return {"architectures": [_HF_CLASSES[config.model_type][0]],
            "model_type": config.model_type, "image_token_id": config.image_token_id,
            "video_token_id": config.video_token_id,
            "vision_start_token_id": config.vision_start_token_id,
            "vision_end_token_id": config.vision_end_token_id,
            "tie_word_embeddings": lm.tie_embeddings, "dtype": dtype_name(model),
            "text_config": text, "vision_config": _hf_vision(config)}


def _hf_processor(settings: QwenImageConfig, vision: QwenVisionConfig) -> dict[str, Any]:
    """An image or video processor's settings (``size``: min and max pixels)."""
    return {"do_convert_rgb": True, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(settings.mean),
            "image_std": list(settings.std), "resample": _RESAMPLE_TO_HF[settings.interpolation],
            "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
            "patch_size": vision.patch_size, "merge_size": vision.merge_size,
            "temporal_patch_size": vision.temporal_patch_size}


def processor_config_to_hf(config: QwenVLConfig) -> dict[str, Any]:
    """processor_config.json: the image and the video processor's settings."""
    video = _hf_processor(config.video, config.vision)
    if config.video.max_video_tokens:  # each frame's pixels capped at a share of the budget
        video.update(cap_pixels_per_frame=True, max_video_tokens=config.video.max_video_tokens)
    return {"processor_class": _HF_CLASSES[config.model_type][1],
            "image_processor": {"image_processor_type": "Qwen2VLImageProcessor",
                                **_hf_processor(config.image, config.vision)},
            "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor", **video}}


def export_qwen2_vl(model: QwenVL, path: str | Path) -> Path:
    """Write ``model`` as the directory transformers' ``Qwen2VLForConditionalGeneration`` /
    ``Qwen2_5_VLForConditionalGeneration`` (and ``AutoProcessor``) load: config.json,
    model.safetensors (the published key names: ``visual.*``, ``model.*``, ``lm_head.weight``),
    generation_config.json, processor_config.json, the tokenizer and chat template.

    Raises :class:`CheckpointError` naming every field the HF class cannot express.
    """
    directory = Path(path)
    hf_config = config_to_qwen2_vl(model)
    weights = qwen2_vl_key_map(model.config, []).to_source(float_state_dict(model))
    directory = make_directory(directory)
    save_state_dict(weights, directory / "model.safetensors", metadata={"format": "pt"})
    write_generation_config(directory, model.config.lm)
    write_json(directory / PROCESSOR_FILE, processor_config_to_hf(model.config))
    write_tokenizer(directory, model, model.config.lm, _HF_CLASSES[model.config.model_type][1])
    write_json(directory / CONFIG_FILE, hf_config)  # last: marks a complete directory
    return directory
