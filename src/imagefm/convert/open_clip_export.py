"""imagefm dual encoders as open_clip checkpoints: the ``model_cfg`` equal to our config, and an
open_clip hub-style directory that ``open_clip.create_model("local-dir:<path>")`` and
:func:`imagefm.convert.open_clip.load_open_clip` read. What open_clip cannot express is refused,
naming the field.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, atomic_write_text, save_state_dict
from imagefm.config import BertConfig, DualEncoderConfig
from imagefm.convert.open_clip import (
    CONFIG_FILE,
    WEIGHT_FILES,
    UnsupportedOpenClipConfig,
    open_clip_key_map,
)
from imagefm.models.dual_encoder import DualEncoder


def config_to_open_clip(config: DualEncoderConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` equal to ``config`` (raises naming what open_clip lacks)."""
    v, t = config.vision, config.text
    if isinstance(t, BertConfig):
        raise CheckpointError("cannot export this model to open_clip format: its text tower is "
                              "BERT-family (open_clip's HFTextEncoder needs the Hugging Face "
                              "model it names); save it in imagefm format instead")
    problems = []
    for name, have, need in (("vision.class_token", v.class_token, True),
                             ("vision.patch_bias", v.patch_bias, False),
                             ("image_projection", config.image_projection, "linear")):
        if have != need:
            problems.append(f"{name} = {have!r} (open_clip needs {need!r})")
    if v.pool not in ("cls", "mean"):
        problems.append(f"vision.pool = {v.pool!r} (open_clip pools the class token or the mean)")
    if v.act != t.act:
        problems.append(f"vision.act {v.act!r} != text.act {t.act!r} (open_clip uses one)")
    act_kwargs = {"approximate": "tanh"} if v.act == "gelu_tanh" else None
    if v.act not in ("quick_gelu", "gelu", "gelu_tanh"):
        problems.append(f"act = {v.act!r} (open_clip has quick_gelu and gelu)")
    for owner, tower in (("vision", v), ("text", t)):
        if int(tower.width * (tower.mlp_dim / tower.width)) != tower.mlp_dim:
            problems.append(f"{owner}.mlp_dim = {tower.mlp_dim} is not width * a ratio")
    if problems:
        raise CheckpointError("cannot export this model to open_clip format:\n  "
                              + "\n  ".join(problems))
    vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
              "head_width": v.width // v.heads, "mlp_ratio": v.mlp_dim / v.width,
              "patch_size": v.patch_size, "no_ln_pre": not v.pre_norm,
              "pool_type": "tok" if v.pool == "cls" else "avg",
              "norm_kwargs": {"eps": v.norm_eps}}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
            "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_dim / t.width,
            "no_causal_mask": not t.causal, "pool_type": t.pool,
            "proj_type": "none" if config.text_projection == "none" else "linear",
            "proj_bias": config.text_projection == "linear_bias",
            "norm_kwargs": {"eps": t.norm_eps}}
    if t.pool == "eos":
        text["eos_id"] = t.eos_token_id
    if act_kwargs:
        vision["act_kwargs"] = text["act_kwargs"] = act_kwargs
    cfg: dict[str, Any] = {"embed_dim": config.embed_dim, "quick_gelu": v.act == "quick_gelu",
                           "vision_cfg": vision, "text_cfg": text,
                           "init_logit_scale": config.init_logit_scale}
    if config.init_logit_bias is not None:
        cfg["init_logit_bias"] = config.init_logit_bias
    return cfg


def export_open_clip(model: DualEncoder, path: str | Path) -> Path:
    """Write ``model`` as an open_clip hub-style directory (``open_clip_config.json`` +
    ``open_clip_model.safetensors`` + tokenizer files) that ``open_clip.create_model(
    "local-dir:<path>")`` and :func:`load_open_clip` read."""
    config = model.config
    model_cfg = config_to_open_clip(config)
    text = config.text
    if text.use_padding_mask and not (text.causal and text.pool in ("argmax", "eos", "first")):
        # Causal attention at or before the EOS never sees right padding; otherwise it does.
        warnings.warn("open_clip's text tower never masks padding and this model does, so "
                      "outputs agree only for unpadded text", stacklevel=2)
    if model.card.resize_mode not in ("shortest", "squash"):
        raise UnsupportedOpenClipConfig(f"preprocess.resize_mode = {model.card.resize_mode!r} "
                                        "has no open_clip equivalent (its 'longest' pads black)")
    weights = open_clip_key_map(config).to_source(model.state_dict())
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(weights, directory / WEIGHT_FILES[0], metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    c = model.card
    preprocess = {"size": c.image_size, "mean": list(c.mean), "std": list(c.std),
                  "interpolation": c.interpolation, "resize_mode": c.resize_mode}
    atomic_write_text(directory / CONFIG_FILE,
                      json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    return directory
