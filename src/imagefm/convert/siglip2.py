"""Hugging Face ``Siglip2Model`` directories (SigLIP 2 NaFlex, ``model_type: "siglip2"``).

SigLIP 2 comes in two layouts on the Hub:

* fixed resolution (``google/siglip2-base-patch16-224`` ...): a plain ``SiglipModel``
  (``model_type: "siglip"``) with Gemma's tokenizer; ``imagefm.convert.hf.load_hf`` reads it,
  and ``Tokenizer.from_hf_dir`` gives the SigLIP 2 text rule.
* NaFlex (``google/siglip2-base-patch16-naflex`` ...): ``Siglip2Model``, read here. The towers
  and weights are SigLIP's, named alike, except that the patch embedding is a Linear over
  flattened patches and the position table is a square grid of ``num_patches`` entries that the
  model resizes to each image's patch grid (``VisionConfig.naflex``). The preprocessor
  (``Siglip2ImageProcessor``) becomes a ``naflex`` image card: patch size, patch budget,
  resample filter, mean and std.

As in ``convert/hf.py``, ``transformers`` is never imported: its defaults for the fields a
``config.json`` leaves out are written down here. Checked by tests/test_parity_siglip2.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError, empty_parameters
from imagefm.config import HALF_MEAN_STD, ConfigError, DualEncoderConfig, ImageCard
from imagefm.convert.hf import (
    _SIGLIP_TEXT_DEFAULTS,
    _SIGLIP_VISION_DEFAULTS,
    CONFIG_FILE,
    SIGLIP_KEY_MAP,
    _read_json,
    _square,
    _sub_config,
    _text,
    _vision,
    load_tokenizer_files,
    read_hf_weights,
)
from imagefm.convert.hf_card import _RESAMPLE_FROM_HF, PREPROCESSOR_FILE
from imagefm.convert.keymap import KeyMap, load_with_key_map
from imagefm.models.dual_encoder import DualEncoder

MODEL_TYPE = "siglip2"

# The NaFlex weights carry SigLIP's names and, once the patch embedding is a Linear, its shapes:
# patch_embedding.weight [width, C*p*p] and position_embedding.weight [num_patches, width] go to
# our Linear and position grid unchanged.
SIGLIP2_KEY_MAP = KeyMap("Hugging Face Siglip2Model", SIGLIP_KEY_MAP.rules,
                         ignore=SIGLIP_KEY_MAP.ignore)

# transformers' Siglip2VisionConfig: SigLIP's vision defaults with num_patches for image_size.
_SIGLIP2_VISION_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in _SIGLIP_VISION_DEFAULTS.items() if k != "image_size"},
    "num_patches": 256}
# transformers' Siglip2ImageProcessor defaults.
_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, max_num_patches=256, resample=2, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=list(HALF_MEAN_STD[0]), image_std=list(HALF_MEAN_STD[1]))


def config_from_siglip2(hf: dict[str, Any], where: str = CONFIG_FILE) -> DualEncoderConfig:
    """Our config from the ``config.json`` of a Hugging Face ``Siglip2Model``."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not "
                              f"{MODEL_TYPE!r} (Siglip2Model)")
    text = _sub_config(hf, "text", _SIGLIP_TEXT_DEFAULTS)
    vision = _sub_config(hf, "vision", _SIGLIP2_VISION_DEFAULTS)
    num_patches = vision["num_patches"]
    side = math.isqrt(num_patches) if isinstance(num_patches, int) and num_patches > 0 else 0
    if side * side != num_patches or side == 0:
        raise CheckpointError(f"{where}: vision_config.num_patches {num_patches!r} is not a "
                              f"positive square number (the position table is a square grid)")
    patch = _square(vision["patch_size"], "vision_config.patch_size", where)
    # Our ViT's image size is the position grid in pixels (side patches of patch pixels).
    vision = {**vision, "image_size": side * patch, "patch_size": patch}
    try:
        use_head = bool(vision["vision_use_head"])
        return DualEncoderConfig(
            model_type="siglip",  # the sigmoid loss; the tower kind is in vision.naflex
            vision=_vision(vision, where, class_token=False, patch_bias=True, pre_norm=False,
                           pool="map" if use_head else "mean", naflex=True),
            text=_text(text, where, causal=False, pool="last", use_padding_mask=False),
            embed_dim=int(text["projection_size"] or text["hidden_size"]),
            image_projection="none", text_projection="linear_bias",
            init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


def card_from_siglip2(pre: dict[str, Any] | None, config: DualEncoderConfig,
                      where: str = PREPROCESSOR_FILE) -> ImageCard:
    """The ``naflex`` image card of a ``Siglip2ImageProcessor`` config (None: its defaults)."""
    pre = {**_PROCESSOR_DEFAULTS, **(pre or {})}
    patch_size, max_patches = int(pre["patch_size"]), int(pre["max_num_patches"])
    if patch_size != config.vision.patch_size:
        raise CheckpointError(f"{where}: patch_size {patch_size} differs from the model's "
                              f"{config.vision.patch_size}")
    if not pre["do_rescale"] or abs(pre["rescale_factor"] - 1 / 255) > 1e-9:
        raise CheckpointError(f"{where}: only rescaling by 1/255 is supported")
    if pre["do_normalize"]:
        mean, std = tuple(pre["image_mean"]), tuple(pre["image_std"])
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if pre["resample"] not in _RESAMPLE_FROM_HF:
        raise CheckpointError(f"{where}: resample {pre['resample']!r} is not supported; imagefm "
                              f"knows {_RESAMPLE_FROM_HF} (PIL codes)")
    try:
        return ImageCard(image_size=math.isqrt(max_patches) * patch_size, resize_mode="naflex",
                         interpolation=_RESAMPLE_FROM_HF[pre["resample"]], mean=mean, std=std,
                         patch_size=patch_size, max_num_patches=max_patches)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _read_config_and_card(directory: Path) -> tuple[DualEncoderConfig, ImageCard]:
    config = config_from_siglip2(_read_json(directory / CONFIG_FILE),
                                 str(directory / CONFIG_FILE))
    pre_path = directory / PREPROCESSOR_FILE
    pre = _read_json(pre_path) if pre_path.is_file() else None
    return config, card_from_siglip2(pre, config, str(pre_path))


def load_siglip2(path: str | Path, *, strict: bool = True) -> DualEncoder:
    """Load a Hugging Face ``Siglip2Model`` (NaFlex) directory as a :class:`DualEncoder`.

    Call it as the HF model is called: ``model(pixel_values=, pixel_attention_mask=,
    spatial_shapes=, input_ids=)``, the inputs :func:`load_siglip2_processor` gives.
    ``strict`` (default) fails with a report naming every missing, unexpected or mis-shaped key.
    """
    directory = Path(path)
    config, card = _read_config_and_card(directory)
    with empty_parameters():  # meta parameters when the loading layer asks (no random init)
        model = DualEncoder(config, card)
    load_with_key_map(model, SIGLIP2_KEY_MAP, read_hf_weights(directory), strict=strict,
                      where=str(directory))
    model.tokenizer = load_tokenizer_files(directory)
    return model.eval()


def load_siglip2_processor(path: str | Path) -> Any:
    """The :class:`~imagefm.processor.Processor` of a ``Siglip2Model`` directory: images →
    ``pixel_values`` (patches), ``pixel_attention_mask``, ``spatial_shapes``; texts →
    ``input_ids``, ``attention_mask`` (Gemma tokenizer, lower-cased, padded to 64)."""
    from imagefm.processor import Processor

    directory = Path(path)
    _, card = _read_config_and_card(directory)
    return Processor(card, load_tokenizer_files(directory))
