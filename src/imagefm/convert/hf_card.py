"""Hugging Face ``preprocessor_config.json`` <-> our image card (:class:`imagefm.config.ImageCard`).

CLIP's processor (shortest-edge resize + square centre crop) and SigLIP's (squash resize) are
the two geometries both sides can express; anything else is refused with the reason. Shared by
the dual-encoder (``convert/hf.py``) and VLM converters.
"""

from __future__ import annotations

from typing import Any

from imagefm.checkpoint import CheckpointError
from imagefm.config import CLIP_MEAN_STD, HALF_MEAN_STD, DualEncoderConfig, ImageCard, default_card

PREPROCESSOR_FILE = "preprocessor_config.json"
# PIL resampling codes, as HF processors store them.
_RESAMPLE_FROM_HF = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_TO_HF = {v: k for k, v in _RESAMPLE_FROM_HF.items()}


def card_from_hf(pre: dict[str, Any] | None, config: DualEncoderConfig,
                 where: str = PREPROCESSOR_FILE) -> ImageCard:
    """The image card of a ``preprocessor_config.json`` (None: defaults for the model type)."""
    if pre is None:
        return default_card(config)
    siglip = config.model_type == "siglip"
    mean, std = HALF_MEAN_STD if siglip else CLIP_MEAN_STD
    if pre.get("do_normalize", True):
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if not pre.get("do_rescale", True) or abs(pre.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{where}: only rescaling by 1/255 is supported")
    resample = pre.get("resample", 3)  # both HF processors default to bicubic
    if resample not in _RESAMPLE_FROM_HF:
        raise CheckpointError(f"{where}: resample {resample!r} is not supported; imagefm knows "
                              f"{_RESAMPLE_FROM_HF} (PIL codes)")
    size = pre.get("size", {"shortest_edge": 224} if not siglip else {"height": 224, "width": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = pre.get("crop_size", size.get("shortest_edge"))
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    do_crop = pre.get("do_center_crop", not siglip)
    if "shortest_edge" in size:
        if not do_crop or crop is None or crop["height"] != crop["width"]:
            raise CheckpointError(f"{where}: a shortest-edge resize needs a square centre crop "
                                  f"(imagefm cards produce square images)")
        if crop["height"] > size["shortest_edge"]:
            raise CheckpointError(f"{where}: crop_size {crop} is larger than the resize "
                                  f"{size['shortest_edge']}; imagefm cannot pad")
        mode, image_size = "shortest", crop["height"]
        if size["shortest_edge"] != image_size:
            raise CheckpointError(f"{where}: resize to {size['shortest_edge']} then crop to "
                                  f"{image_size} is not a card imagefm can express")
    elif "height" in size and "width" in size and size["height"] == size["width"]:
        if do_crop and crop is not None and crop != size:
            raise CheckpointError(f"{where}: squash to {size} then crop to {crop} is not a card "
                                  f"imagefm can express")
        mode, image_size = "squash", size["height"]
    else:
        raise CheckpointError(f"{where}: size {size} is not supported (need shortest_edge or a "
                              f"square height/width)")
    return ImageCard(image_size=int(image_size), resize_mode=mode,
                     interpolation=_RESAMPLE_FROM_HF[resample], mean=tuple(mean), std=tuple(std))


def card_to_hf(card: ImageCard) -> dict[str, Any]:
    """A ``preprocessor_config.json`` for an image card (CLIP's processor for shortest-edge
    resize + centre crop, SigLIP's for a squash resize)."""
    common = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(card.mean),
              "image_std": list(card.std), "resample": _RESAMPLE_TO_HF[card.interpolation]}
    if card.resize_mode not in ("shortest", "squash"):
        raise CheckpointError(f"preprocess.resize_mode = {card.resize_mode!r} has no HF image "
                              "processor equivalent; export to ONNX or our format instead")
    if card.resize_mode == "shortest":
        return {"image_processor_type": "CLIPImageProcessor", **common,
                "size": {"shortest_edge": card.image_size}, "do_center_crop": True,
                "crop_size": {"height": card.image_size, "width": card.image_size}}
    return {"image_processor_type": "SiglipImageProcessor", **common,
            "size": {"height": card.image_size, "width": card.image_size},
            "do_center_crop": False}
