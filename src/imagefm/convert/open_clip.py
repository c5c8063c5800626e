"""open_clip checkpoints to imagefm (writing them back: :mod:`imagefm.convert.open_clip_export`).

Two ways an open_clip model arrives:
* a directory as open_clip publishes to the Hugging Face hub: ``open_clip_config.json``
  (``{"model_cfg": ..., "preprocess_cfg": ...}``) next to ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``;
* a bare state-dict file plus the name of an open_clip architecture (``arch="ViT-B-32"``), whose
  JSON is read from the installed open_clip package's ``model_configs/`` without importing it.

The standard ViT CLIP towers are supported, timm's SigLIP ViTs as image towers
(``open_clip_timm``), and Hugging Face BERT / RoBERTa / XLM-R text towers (``hf_text``; their
config.json comes from a local ``hf_model_name`` directory or ``hf_text=``). Everything in a
config that changes the computed function is either translated into our config or refused with
an error naming the field (other timm or Hugging Face towers, attentional poolers, CoCa, layer
scale, custom attention blocks...).
open_clip's own text tower never masks padding, so ``use_padding_mask`` is off.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from imagefm.checkpoint import (
    CheckpointError,
    empty_parameters,
    load_state_dict_file,
)
from imagefm.config import (
    CLIP_MEAN_STD,
    BertConfig,
    ConfigError,
    DualEncoderConfig,
    ImageCard,
    TextConfig,
    VisionConfig,
)
from imagefm.convert.hf import load_tokenizer_files
from imagefm.convert.hf_text import (
    open_clip_hf_text,
    open_clip_hf_text_config,
    open_clip_hf_text_rules,
    open_clip_hf_text_tokenizer,
)
from imagefm.convert.keymap import TRANSPOSE, KeyMap, Rule, load_with_key_map, reshape, rule, split
from imagefm.convert.open_clip_timm import (
    is_timm_tower,
    open_clip_hf_tokenizer,
    timm_vision_config,
    with_timm_vision,
)
from imagefm.models.dual_encoder import DualEncoder

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")

# Config fields, by what we do with them. Anything not listed is refused as unknown, as
# open_clip's own dataclasses refuse it.
_TOP_FIELDS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
               "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"}
_TOP_REFUSED = {"multimodal_cfg": "CoCa models (multimodal_cfg) are not supported"}
_VISION_FIELDS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
                  "no_ln_pre", "pool_type", "global_average_pool", "final_ln_after_pool",
                  "act_kwargs", "norm_kwargs", "pos_embed_type"}
_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                "no_causal_mask", "pool_type", "eos_id", "proj_bias", "proj_type",
                "act_kwargs", "norm_kwargs"}
# No effect on the computed function at inference (training-only, output format, tokenizer, or
# options of towers we refuse anyway). Text final_ln_after_pool: open_clip never passes it to its
# TextTransformer, and a LayerNorm commutes with picking one token anyway.
_HARMLESS = {"patch_dropout", "output_tokens", "timm_model_pretrained", "timm_pool", "timm_proj",
             "timm_proj_bias", "timm_drop", "timm_drop_path", "attn_pooler_queries",
             "attn_pooler_heads", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
             "pad_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TEXT_HARMLESS = {"final_ln_after_pool"}
# Fields that change the model in a way ours cannot express, with the values that do not.
_REFUSED_UNLESS = {
    "ls_init_value": ((None,), "layer scale"),
    "attentional_pool": ((False,), "an attentional pooler"),
    "timm_model_name": ((None, ""), "a timm image tower"),
    "hf_model_name": ((None, ""), "a Hugging Face text tower"),
    "embed_cls": ((False,), "an appended text class token (CoCa style)"),
    "input_patchnorm": ((False,), "input patch norm"),
    "block_type": ((None, "default"), "a custom attention block"),
    "qk_norm": ((False,), "q/k norm"),
    "scaled_cosine_attn": ((False,), "scaled cosine attention"),
    "scale_heads": ((False,), "per-head attention scales"),
    "scale_attn_inner": ((False,), "an inner attention norm"),
    "scale_attn": ((False,), "a post-attention norm"),
    "scale_fc": ((False,), "an MLP norm"),
}
_IGNORE = ("attn_mask", "text.attn_mask")  # the causal-mask buffer some checkpoints carry


class UnsupportedOpenClipConfig(CheckpointError):
    """An open_clip config uses something imagefm's dual encoder cannot express."""


# --- architecture configs ------------------------------------------------------------------------

def model_configs_dir() -> Path:
    """The installed open_clip package's ``model_configs/`` (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "open_clip is not installed, so open_clip architecture names cannot be resolved; "
            "install open_clip_torch, or load a directory with open_clip_config.json")
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def arch_config(arch: str) -> dict[str, Any]:
    """The model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) of an open_clip
    architecture name. ``<name>-quickgelu`` without its own file is ``<name>`` with QuickGELU."""
    directory = model_configs_dir()
    path = directory / f"{arch}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    base = arch.removesuffix("-quickgelu")
    if base != arch and (directory / f"{base}.json").is_file():
        return {**json.loads((directory / f"{base}.json").read_text(encoding="utf-8")),
                "quick_gelu": True}
    known = sorted(p.stem for p in directory.glob("*.json"))
    close = [k for k in known if k.lower().startswith(arch.lower()[:5])][:10]
    raise CheckpointError(f"unknown open_clip architecture {arch!r} (no {path}); "
                          f"similar names: {close or known[:10]}")


# --- model_cfg -> our config ---------------------------------------------------------------------

def _check_fields(cfg: dict[str, Any], known: set[str], owner: str) -> None:
    for name, value in cfg.items():
        if name in _REFUSED_UNLESS:
            accepted, what = _REFUSED_UNLESS[name]
            # Compare types too: 0 == False, yet ls_init_value = 0 is a (zero) layer scale.
            if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
                raise UnsupportedOpenClipConfig(
                    f"{owner}.{name} = {value!r}: {what} is not supported by imagefm's dual "
                    f"encoder")
        elif name not in known and name not in _HARMLESS:
            raise UnsupportedOpenClipConfig(f"{owner}.{name} is an unknown or unsupported "
                                            f"open_clip config field")


def _activation(quick_gelu: bool, act_kwargs: dict[str, Any] | None, owner: str) -> str:
    act_kwargs = act_kwargs or {}
    if not act_kwargs:
        return "quick_gelu" if quick_gelu else "gelu"
    if not quick_gelu and act_kwargs == {"approximate": "tanh"}:
        return "gelu_tanh"
    raise UnsupportedOpenClipConfig(f"{owner}.act_kwargs = {act_kwargs!r} is not supported")


def _norm_eps(norm_kwargs: dict[str, Any] | None, owner: str) -> float:
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", 1e-5)  # torch's LayerNorm default, which open_clip uses
    if norm_kwargs:
        raise UnsupportedOpenClipConfig(f"{owner}.norm_kwargs {sorted(norm_kwargs)} are not "
                                        f"supported (only eps)")
    return float(eps)


def _square(value: Any, owner: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UnsupportedOpenClipConfig(f"{owner} = {value} is not square")
        value = value[0]
    return int(value)


def _vision_config(v: dict[str, Any], quick_gelu: bool) -> VisionConfig:
    _check_fields(v, _VISION_FIELDS, "vision_cfg")
    layers = v.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        raise UnsupportedOpenClipConfig("vision_cfg.layers is a list: ModifiedResNet image "
                                        "towers are not supported")
    width = v.get("width", 768)
    pool = v.get("pool_type", "tok")
    if v.get("global_average_pool"):  # the older spelling of pool_type = 'avg'
        pool = "avg"
    if pool not in ("tok", "avg"):
        raise UnsupportedOpenClipConfig(f"vision_cfg.pool_type = {pool!r} is not supported")
    if pool == "avg" and v.get("final_ln_after_pool"):
        # LN(mean(x)) is not mean(LN(x)); for the class token the order does not matter.
        raise UnsupportedOpenClipConfig("vision_cfg.final_ln_after_pool with average pooling "
                                        "is not supported")
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        raise UnsupportedOpenClipConfig(f"vision_cfg.pos_embed_type {v['pos_embed_type']!r}")
    return VisionConfig(
        image_size=_square(v.get("image_size", 224), "vision_cfg.image_size"),
        patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size"),
        width=width, layers=layers, heads=width // v.get("head_width", 64),
        mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
        act=_activation(quick_gelu, v.get("act_kwargs"), "vision_cfg"),
        norm_eps=_norm_eps(v.get("norm_kwargs"), "vision_cfg"),
        class_token=True, patch_bias=False, pre_norm=not v.get("no_ln_pre", False),
        pool="cls" if pool == "tok" else "mean")


def _text_config(t: dict[str, Any], quick_gelu: bool) -> TextConfig:
    _check_fields(t, _TEXT_FIELDS | _TEXT_HARMLESS, "text_cfg")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "last", "first"):
        raise UnsupportedOpenClipConfig(f"text_cfg.pool_type = {pool!r} is not supported")
    width = t.get("width", 512)
    return TextConfig(
        vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77),
        width=width, layers=t.get("layers", 12), heads=t.get("heads", 8),
        mlp_dim=int(width * t.get("mlp_ratio", 4.0)),
        act=_activation(quick_gelu, t.get("act_kwargs"), "text_cfg"),
        norm_eps=_norm_eps(t.get("norm_kwargs"), "text_cfg"),
        causal=not t.get("no_causal_mask", False), pool=pool,
        eos_token_id=t.get("eos_id", 2) if pool == "eos" else None,
        use_padding_mask=False)


def config_from_open_clip(model_cfg: dict[str, Any],
                          hf_text_config: dict[str, Any] | None = None) -> DualEncoderConfig:
    """Our config from an open_clip model config; refuses what we cannot express.
    ``hf_text_config``: the config.json of a Hugging Face text tower (``text_cfg.hf_model_name``;
    read from a local ``hf_model_name`` directory when not given, see ``hf_text``)."""
    for name, why in _TOP_REFUSED.items():
        if name in model_cfg:
            raise UnsupportedOpenClipConfig(why)
    unknown = sorted(set(model_cfg) - _TOP_FIELDS)
    if unknown:
        raise UnsupportedOpenClipConfig(f"unknown or unsupported open_clip config field(s): "
                                        f"{unknown}")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    text_cfg = model_cfg.get("text_cfg", {})
    bias = model_cfg.get("init_logit_bias")
    proj = "none" if text_cfg.get("proj_type") == "none" else (
        "linear_bias" if text_cfg.get("proj_bias") else "linear")
    vision_cfg = model_cfg.get("vision_cfg", {})
    try:
        if is_timm_tower(vision_cfg):  # a timm ViT (SigLIP): see open_clip_timm
            vision, image_proj = timm_vision_config(vision_cfg)
        else:
            vision, image_proj = _vision_config(vision_cfg, quick_gelu), "linear"
        if text_cfg.get("hf_model_name"):  # open_clip's HFTextEncoder: see hf_text
            # Only hf_* fields reach it; the others are CLIPTextCfg's, which it ignores.
            known = _TEXT_FIELDS | _TEXT_HARMLESS | _HARMLESS | set(_REFUSED_UNLESS)
            unknown = sorted(set(text_cfg) - known)
            if unknown:
                raise UnsupportedOpenClipConfig(f"text_cfg: unknown open_clip config field(s) "
                                                f"{unknown}")
            hf = hf_text_config or open_clip_hf_text_config(text_cfg)
            text, proj = open_clip_hf_text(text_cfg, hf, model_cfg["embed_dim"])
        else:
            text = _text_config(text_cfg, quick_gelu)
        return DualEncoderConfig(
            model_type="clip" if bias is None else "siglip",  # a logit bias means sigmoid loss
            vision=vision, text=text,
            embed_dim=model_cfg["embed_dim"], image_projection=image_proj, text_projection=proj,
            init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
            init_logit_bias=None if bias is None else float(bias))
    except (ConfigError, KeyError) as err:
        raise UnsupportedOpenClipConfig(f"cannot express this open_clip model: {err}") from None


def card_from_open_clip(preprocess_cfg: dict[str, Any] | None, image_size: int) -> ImageCard:
    """open_clip's eval preprocessing: the model's image size, then ``preprocess_cfg`` over
    open_clip's defaults (OpenAI mean/std, bicubic, resize shortest side + centre crop)."""
    pre = preprocess_cfg or {}
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise UnsupportedOpenClipConfig(f"preprocess_cfg.resize_mode = {mode!r} is not "
                                        f"supported (shortest or squash)")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise UnsupportedOpenClipConfig(f"preprocess_cfg.interpolation = {interpolation!r}")
    mean, std = CLIP_MEAN_STD
    return ImageCard(image_size=image_size, resize_mode=mode, interpolation=interpolation,
                     mean=tuple(pre.get("mean", mean)), std=tuple(pre.get("std", std)))


# --- key map -------------------------------------------------------------------------------------

def _resblock_rules(source: str, ours: str) -> list[Rule]:
    block, mine = f"{source}.resblocks.{{i}}", f"{ours}.blocks.{{i}}"
    names = {"ln_1": "norm1", "attn.out_proj": "attn.o_proj", "ln_2": "norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    rules = [rule(f"{block}.{theirs}.{p}", f"{mine}.{me}.{p}")
             for theirs, me in names.items() for p in ("weight", "bias")]
    # nn.MultiheadAttention keeps q, k, v stacked in one [3w, w] matrix.
    rules.append(rule(f"{block}.attn.in_proj_weight",
                      [f"{mine}.attn.{p}_proj.weight" for p in "qkv"], split(3)))
    rules.append(rule(f"{block}.attn.in_proj_bias",
                      [f"{mine}.attn.{p}_proj.bias" for p in "qkv"], split(3)))
    return rules


def open_clip_key_map(config: DualEncoderConfig, text_prefix: str = "",
                      logit_shape: tuple[int, ...] = ()) -> KeyMap:
    """The key map of an open_clip ``CLIP`` (text keys at the top level) or ``CustomTextCLIP``
    (``text_prefix = "text."``). ``proj``/``text_projection`` parameters are used as
    ``x @ proj`` there, so they are transposed into our ``nn.Linear`` weights."""
    p = text_prefix
    rules = [
        rule("visual.class_embedding", "vision.class_token"),
        rule("visual.positional_embedding", "vision.pos_embed"),
        rule("visual.conv1.weight", "vision.patch_embed.weight"),
        rule("visual.ln_pre.weight", "vision.norm_pre.weight"),
        rule("visual.ln_pre.bias", "vision.norm_pre.bias"),
        *_resblock_rules("visual.transformer", "vision.transformer"),
        rule("visual.ln_post.weight", "vision.norm_post.weight"),
        rule("visual.ln_post.bias", "vision.norm_post.bias"),
        rule("visual.proj", "image_proj.weight", TRANSPOSE),
        rule(f"{p}token_embedding.weight", "text.token_embed.weight"),
        rule(f"{p}positional_embedding", "text.pos_embed"),
        *_resblock_rules(f"{p}transformer", "text.transformer"),
        rule(f"{p}ln_final.weight", "text.norm_final.weight"),
        rule(f"{p}ln_final.bias", "text.norm_final.bias"),
        rule("logit_scale", "logit_scale", reshape(logit_shape)),
        rule("logit_bias", "logit_bias", reshape(logit_shape)),
    ]
    if config.text_projection == "linear":
        rules.append(rule(f"{p}text_projection", "text_proj.weight", TRANSPOSE))
    elif config.text_projection == "linear_bias":  # proj_bias: an nn.Linear
        rules.append(rule(f"{p}text_projection.weight", "text_proj.weight"))
        rules.append(rule(f"{p}text_projection.bias", "text_proj.bias"))
    ignore = _IGNORE
    if isinstance(config.text, BertConfig):  # an HFTextEncoder: text.transformer.*, text.proj
        hf_rules, hf_ignore = open_clip_hf_text_rules(config)
        rules = [r for r in rules if not r.ours[0].startswith(("text.", "text_proj."))]
        rules, ignore, p = [*rules, *hf_rules], (*_IGNORE, *hf_ignore), "text."
    return KeyMap(f"open_clip {'CustomTextCLIP' if p else 'CLIP'}", tuple(rules), ignore)


# --- loading -------------------------------------------------------------------------------------

def _read_dir_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not an open_clip hub directory") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg", data), dict):
        raise CheckpointError(f"{path}: expected {{'model_cfg': ..., 'preprocess_cfg': ...}}")
    return data


def _source(path: Path, arch: str | None) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(model_cfg, preprocess_cfg, weights file) for a hub directory or a bare state dict."""
    if path.is_dir():
        if arch is not None:
            raise CheckpointError(f"{path} is a directory with its own {CONFIG_FILE}; arch= is "
                                  f"only for bare state-dict files")
        data = _read_dir_config(path)
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weights found (looked for "
                                  f"{', '.join(WEIGHT_FILES)})")
        return data.get("model_cfg", data), data.get("preprocess_cfg") or {}, weights
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if arch is None:
        raise CheckpointError(f"{path} is a bare state dict: pass arch= with its open_clip "
                              f"architecture name (e.g. 'ViT-B-32'), or use a directory with "
                              f"{CONFIG_FILE}")
    return arch_config(arch), {}, path


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DistributedDataParallel checkpoints prefix every key with ``module.``."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _tokenizer(directory: Path | None, model_cfg: dict[str, Any], context_length: int,
               hf_text: str | Path | None = None,
               hf_text_config: dict[str, Any] | None = None) -> Any:
    """Our own saved tokenizer, else open_clip's default CLIP BPE (what open_clip itself uses
    when the config names no other tokenizer), else HF tokenizer files, else None."""
    if directory is not None and (directory / "imagefm_tokenizer.json").is_file():
        return load_tokenizer_files(directory)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):  # a Hugging Face text tower's own tokenizer
        return open_clip_hf_text_tokenizer(directory, text_cfg, context_length, hf_text,
                                           (hf_text_config or {}).get("model_type"))
    default = not any(text_cfg.get(k) for k in ("hf_tokenizer_name", "tokenizer_mode",
                                                  "tokenizer_kwargs"))
    if default:
        from imagefm.tokenizer import Tokenizer

        try:
            return Tokenizer.from_open_clip(context_length)
        except FileNotFoundError:
            pass
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip_hf_tokenizer(directory, text_cfg)
    return load_tokenizer_files(directory) if directory is not None else None


def _hf_text_config(model_cfg: dict[str, Any], hf_text: str | Path | None
                    ) -> dict[str, Any] | None:
    text_cfg = model_cfg.get("text_cfg", {})
    return open_clip_hf_text_config(text_cfg, hf_text) if text_cfg.get("hf_model_name") else None


def load_open_clip(path: str | Path, *, arch: str | None = None, strict: bool = True,
                   hf_text: str | Path | None = None) -> DualEncoder:
    """Load an open_clip checkpoint: a hub-style directory, or a state-dict file plus ``arch``.

    ``hf_text``: for a Hugging Face text tower (``text_cfg.hf_model_name``, e.g.
    ``xlm-roberta-base-ViT-B-32``), a directory holding that text model's config.json (and
    tokenizer files, when the checkpoint has none); not needed when ``hf_model_name`` is itself
    a local directory.
    """
    path = Path(path)
    model_cfg, preprocess_cfg, weights = _source(path, arch)
    hf_config = _hf_text_config(model_cfg, hf_text)
    config = config_from_open_clip(model_cfg, hf_config)
    card = card_from_open_clip(preprocess_cfg, config.vision.image_size)
    with empty_parameters():
        model = DualEncoder(config, card)
    state = _strip_module_prefix(load_state_dict_file(weights))
    text_prefix = "text." if any(k.startswith("text.") for k in state) else ""
    logit_shape = (1,) if model_cfg.get("nonscalar_logit_scale") else ()
    key_map = open_clip_key_map(config, text_prefix, logit_shape)
    if is_timm_tower(model_cfg.get("vision_cfg", {})):
        key_map = with_timm_vision(key_map, config, model_cfg["vision_cfg"])
    load_with_key_map(model, key_map, state, strict=strict, where=str(weights))
    model.tokenizer = _tokenizer(path if path.is_dir() else None, model_cfg,
                                 config.text.context_length, hf_text, hf_config)
    return model.eval()


def load_open_clip_processor(path: str | Path, *, arch: str | None = None,
                             preprocess_cfg: dict[str, Any] | None = None,
                             hf_text: str | Path | None = None) -> Any:
    """The processor of an open_clip checkpoint. ``preprocess_cfg`` overrides the directory's
    (a bare state dict has none: open_clip's defaults apply unless you give the pretrained
    tag's values here); ``hf_text`` as for :func:`load_open_clip`."""
    from imagefm.processor import Processor

    path = Path(path)
    model_cfg, pre, _ = _source(path, arch)
    hf_config = _hf_text_config(model_cfg, hf_text)
    config = config_from_open_clip(model_cfg, hf_config)
    card = card_from_open_clip({**pre, **(preprocess_cfg or {})}, config.vision.image_size)
    tokenizer = _tokenizer(path if path.is_dir() else None, model_cfg, config.text.context_length,
                           hf_text, hf_config)
    return Processor(card, tokenizer)
