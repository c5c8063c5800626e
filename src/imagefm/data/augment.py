"""Training-time image augmentation, on top of the model card's own preprocessing.

    transform = TrainTransform(model.card, AugmentConfig(scale=(0.5, 1.0), hflip_prob=0.5))
    pixels = transform(image, generator)        # float32 [3, S, S], normalised per the card

One image goes through:

1. a **random resized crop**: an area fraction in ``scale`` and an aspect ratio in ``ratio``
   (log-uniform), sampled as torchvision's ``RandomResizedCrop`` samples them: 10 attempts,
   then a centre crop of the whole image clamped to the ratio range. ``scale = (1, 1)`` means
   no crop at all (see ``TrainTransform``);
2. the card's **geometry**: ``ImageProcessor.resize_and_crop`` (resize the shorter side and
   centre-crop, or squash), the very code of evaluation, so training and evaluation see images
   the same way;
3. **colour jitter** (brightness, contrast, saturation, hue, in a random order, applied with
   probability ``color_jitter_prob``), then **grayscale** with ``gray_scale_prob``;
4. a **horizontal flip** with ``hflip_prob``;
5. the card's **normalisation** (``ImageProcessor.preprocess_one``: the same float32 table).

The colour steps run after the resize, on the ``S x S`` image rather than on the full-size
crop: they are per-pixel (contrast uses the image mean, which the resize hardly changes), so
the order changes nothing that matters and costs far less on large photos. The jittered image
is rounded back to 8 bits, as torchvision's PIL path does after each step.

Every random draw comes from the ``torch.Generator`` passed in, so a sample is reproducible
from its seed whatever the process or worker. No torchvision: PIL and numpy, as
:mod:`imagefm.data.image`. Names follow open_clip's ``aug_cfg`` where it has them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.config import ConfigError, ImageCard
from imagefm.data.image import DEFAULT_MAX_PIXELS, ImageProcessor, ImageSource, open_image

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentConfig:
    """What random changes a training image gets (all off but a mild crop by default).

    ``color_jitter`` is one number (brightness, contrast and saturation by that much, no hue)
    or ``(brightness, contrast, saturation[, hue])``, stored as the four amounts: factors are
    drawn uniformly from ``[max(0, 1 - x), 1 + x]``, the hue shift from ``[-hue, hue]`` (at
    most 0.5 of the circle).
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float | tuple[float, float, float, float] = 0.0
    color_jitter_prob: float = 1.0
    gray_scale_prob: float = 0.0
    hflip_prob: float = 0.0

    def __post_init__(self) -> None:
        scale = _pair("scale", self.scale)
        ratio = _pair("ratio", self.ratio)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"augment.scale = {list(scale)} must be two area fractions with "
                              "0 < low <= high <= 1, e.g. [0.9, 1.0]")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"augment.ratio = {list(ratio)} must be two aspect ratios with "
                              "0 < low <= high, e.g. [0.75, 1.3333]")
        jitter = _jitter(self.color_jitter)
        for name in ("color_jitter_prob", "gray_scale_prob", "hflip_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value <= 1:
                raise ConfigError(f"augment.{name} = {value!r} must be a probability in [0, 1]")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "color_jitter", jitter)  # always the four amounts

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "augment") -> AugmentConfig:
        """From a config mapping; an unknown key or bad value raises one ``ConfigError`` line
        naming ``where.<key>``."""
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown {where} key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(str(err).replace("augment.", f"{where}.", 1)) from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("scale", "ratio", "color_jitter"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) amounts."""
        return self.color_jitter  # type: ignore[return-value]  (a tuple after __post_init__)

    @property
    def crops(self) -> bool:
        """False for ``scale = (1, 1)``: the whole image, as evaluation sees it."""
        return self.scale != (1.0, 1.0)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"augment.{key} needs numbers, got {value!r}")
    return float(value)


def _pair(key: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"augment.{key} = {value!r} must be two numbers [low, high]")
    return _number(key, value[0]), _number(key, value[1])


def _jitter(value: Any) -> tuple[float, float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amounts = [_number("color_jitter", value)] * 3 + [0.0]
    elif isinstance(value, (list, tuple)) and len(value) in (3, 4):
        amounts = [_number("color_jitter", v) for v in value] + [0.0] * (4 - len(value))
    else:
        raise ConfigError(f"augment.color_jitter = {value!r} must be one number or "
                          "[brightness, contrast, saturation, hue]")
    if min(amounts) < 0 or amounts[3] > 0.5:
        raise ConfigError(f"augment.color_jitter = {value!r}: amounts must be >= 0 and the hue "
                          "at most 0.5")
    return amounts[0], amounts[1], amounts[2], amounts[3]


# --- random draws --------------------------------------------------------------------------------

def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _chance(probability: float, generator: torch.Generator) -> bool:
    """True with ``probability``; no draw at all for 0 or 1."""
    if probability <= 0:
        return False
    if probability >= 1:
        return True
    return bool(torch.rand((), generator=generator) < probability)


def sample_crop(width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float], generator: torch.Generator
                ) -> tuple[int, int, int, int]:
    """``(left, top, crop width, crop height)`` as torchvision's ``RandomResizedCrop`` picks it.

    Up to 10 attempts at an area fraction uniform in ``scale`` and an aspect ratio (width /
    height) log-uniform in ``ratio``; the first that fits is placed uniformly at random. If none
    fits, the centre crop of the whole image with its aspect ratio clamped to ``ratio``.
    """
    area = width * height
    # float32 logs and exp, as torchvision computes them: the same seed gives the same crop.
    log_low, log_high = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = float(torch.exp(torch.empty(()).uniform_(log_low, log_high,
                                                          generator=generator)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# --- colour --------------------------------------------------------------------------------------
# Float RGB images [H, W, 3] in [0, 1]; the formulas of torchvision's tensor functions.

def grayscale(pixels: np.ndarray) -> np.ndarray:
    """Luma ``[H, W]`` of an RGB image."""
    return pixels @ _LUMA


def adjust_brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: ``factor`` 0 gives black, 1 the image, 2 twice as bright (clipped)."""
    return np.clip(pixels * factor, 0.0, 1.0)


def adjust_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean grey: deviations from it scale by ``factor``."""
    mean = float(grayscale(pixels).mean())
    return np.clip(factor * pixels + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image: ``factor`` 0 gives grey, 1 the image."""
    grey = grayscale(pixels)[..., None]
    return np.clip(factor * pixels + (1.0 - factor) * grey, 0.0, 1.0)


def adjust_hue(pixels: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` turns (0.5: opposite colours) in HSV."""
    hue, saturation, value = _rgb_to_hsv(pixels)
    return _hsv_to_rgb(_fraction(hue + shift), saturation, value)


def _rgb_to_hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # Elementwise over the channels: numpy's max(axis=-1) over 3 values is ten times slower.
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = high - low
    safe = np.where(delta > 0, delta, np.float32(1))
    # Distances from the maximum, in units of the spread (colorsys' formulas; red wins ties,
    # then green, as in torchvision).
    rc, gc, bc = (high - r) / safe, (high - g) / safe, (high - b) / safe
    hue = np.where(high == r, bc - gc, np.where(high == g, 2 + rc - bc, 4 + gc - rc))
    hue = np.where(delta > 0, _fraction(hue / 6), np.float32(0))
    saturation = delta / np.where(high > 0, high, np.float32(1))
    return hue, saturation, high


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    # Channel c = v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6 and n = 5, 3, 1
    # for red, green, blue: the six-sector formula without branches.
    k = 6 * _fraction((np.array([5, 3, 1], dtype=np.float32) + hue[..., None] * 6) / 6)
    ramp = np.clip(np.minimum(k, 4 - k), 0, 1)
    return (value[..., None] * (1 - saturation[..., None] * ramp)).astype(np.float32)


def _fraction(values: np.ndarray) -> np.ndarray:
    """``values mod 1`` (numpy's float ``%`` is several times slower than this)."""
    return values - np.floor(values)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# --- the transform -------------------------------------------------------------------------------

class TrainTransform:
    """One training image → normalised ``float32 [3, S, S]`` per ``card``, randomly changed
    per ``aug`` (see the module docstring for the steps).

    With ``scale = (1, 1)`` the crop step is skipped: the whole image goes to the card's
    resize, so with no jitter, grayscale or flip the output equals ``ImageProcessor(card)``'s
    exactly. (torchvision would still draw a crop a pixel short of the image now and then, from
    rounding, or clamp an elongated image to ``ratio``; neither is what "no crop" means.)
    """

    def __init__(self, card: ImageCard, aug: AugmentConfig | None = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if card.resize_mode == "naflex":
            raise ConfigError("training augmentation gives square images; this model's card is "
                              "NaFlex (patches at the native aspect ratio), which it does not "
                              "support: turn augmentation off for this model")
        self.card = card
        self.aug = aug if aug is not None else AugmentConfig()
        self.processor = ImageProcessor(card, max_pixels=max_pixels)

    def __call__(self, image: Image.Image | ImageSource, generator: torch.Generator
                 ) -> torch.Tensor:
        aug = self.aug
        pil = open_image(image, max_pixels=self.processor.max_pixels)
        if aug.crops:
            left, top, w, h = sample_crop(pil.width, pil.height, aug.scale, aug.ratio, generator)
            if (w, h) != pil.size:
                pil = pil.crop((left, top, left + w, top + h))
        pixels = self.processor.resize_and_crop(pil)  # uint8 [S, S, 3], the eval geometry
        pixels = self.colour(pixels, generator)
        if _chance(aug.hflip_prob, generator):
            pixels = pixels[:, ::-1]
        return torch.from_numpy(self.processor.preprocess_one(np.ascontiguousarray(pixels)))

    def colour(self, pixels: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Colour jitter then grayscale on ``uint8 [H, W, 3]`` (returned as is when neither
        applies, so the untouched path stays exact)."""
        amounts = self.aug.jitter
        jitter = any(amounts) and _chance(self.aug.color_jitter_prob, generator)
        gray = _chance(self.aug.gray_scale_prob, generator)
        if not (jitter or gray):
            return pixels
        values = pixels.astype(np.float32) / 255.0
        if jitter:
            order = torch.randperm(4, generator=generator).tolist()
            factors = [_jitter_factor(i, amount, generator) if amount else None
                       for i, amount in enumerate(amounts)]
            for index in order:
                if factors[index] is not None:
                    values = _ADJUST[index](values, factors[index])
        if gray:
            values = np.repeat(grayscale(values)[..., None], 3, axis=-1)
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)

    def __repr__(self) -> str:
        return f"TrainTransform({self.card}, {self.aug})"


def _jitter_factor(index: int, amount: float, generator: torch.Generator) -> float:
    if _JITTER_NAMES[index] == "hue":
        return _uniform(generator, -amount, amount)
    return _uniform(generator, max(0.0, 1.0 - amount), 1.0 + amount)
