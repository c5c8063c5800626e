"""Training augmentation: exact eval preprocessing when off, torchvision's crop sampling,
colour jitter in the expected directions, determinism from the generator, strict config."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imagefm.config import ConfigError, ImageCard
from imagefm.data.augment import (
    AugmentConfig,
    TrainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    sample_crop,
)
from imagefm.data.image import ImageProcessor

CLIP_CARD = ImageCard(32)  # shortest side + centre crop, bicubic, CLIP mean/std
SQUASH_CARD = ImageCard(24, "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Nearest squash with no normalisation: output pixel values are source pixel values / 255.
PLAIN_CARD = ImageCard(64, "squash", "nearest", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_image(width: int, height: int, seed: int = 0, low: int = 0, high: int = 256
                ) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, high, (height, width, 3), dtype=np.uint8))


def smooth_image(width: int = 64, height: int = 64) -> Image.Image:
    """Mid-range colours (no clipping under mild jitter), varied hue and saturation."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([0.3 + 0.3 * x, 0.25 + 0.3 * y, 0.5 - 0.2 * x * y], axis=-1)
    return Image.fromarray(np.rint(pixels * 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def unnormalise(pixels: torch.Tensor, card: ImageCard) -> np.ndarray:
    """[3, S, S] normalised → float [S, S, 3] in 0..1."""
    mean = torch.tensor(card.mean)[:, None, None]
    std = torch.tensor(card.std)[:, None, None]
    return (pixels * std + mean).permute(1, 2, 0).numpy()


# --- no augmentation = evaluation ----------------------------------------------------------------

@pytest.mark.parametrize("card", [CLIP_CARD, SQUASH_CARD], ids=["shortest", "squash"])
@pytest.mark.parametrize("size", [(48, 48), (80, 50), (40, 60), (120, 30)])
def test_without_augmentation_it_is_the_eval_preprocessing_exactly(card, size):
    image = noise_image(*size, seed=sum(size))
    expected = ImageProcessor(card)(image)[0]
    # Jitter configured but never applied (probability 0) changes nothing either.
    for aug in (AugmentConfig(scale=(1.0, 1.0)),
                AugmentConfig(scale=(1, 1), color_jitter=0.4, color_jitter_prob=0.0)):
        transform = TrainTransform(card, aug)
        for seed in range(3):
            got = transform(image, gen(seed))
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert torch.equal(got, expected)
    assert torch.equal(TrainTransform(card, AugmentConfig(scale=(1, 1)))(png_bytes(image),
                                                                          gen(0)), expected)


def test_a_flip_is_the_eval_image_mirrored():
    image = noise_image(50, 40)
    expected = ImageProcessor(SQUASH_CARD)(image)[0].flip(-1)
    got = TrainTransform(SQUASH_CARD, AugmentConfig(scale=(1, 1), hflip_prob=1.0))(image, gen(0))
    assert torch.equal(got, expected)


# --- determinism ---------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_tensor_and_other_seeds_other_crops():
    image = noise_image(96, 72, seed=1)
    transform = TrainTransform(CLIP_CARD, AugmentConfig(
        scale=(0.3, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8,
        gray_scale_prob=0.2, hflip_prob=0.5))
    for seed in (0, 7, 123):
        assert torch.equal(transform(image, gen(seed)), transform(image, gen(seed)))
    outputs = [transform(image, gen(seed)) for seed in range(8)]
    assert all(not torch.equal(outputs[i], outputs[j]) for i in range(8) for j in range(i))
    boxes = {sample_crop(96, 72, (0.3, 1.0), (3 / 4, 4 / 3), gen(seed)) for seed in range(50)}
    assert len(boxes) >= 45


def test_crops_are_sampled_as_torchvision_samples_them():
    transforms = pytest.importorskip("torchvision.transforms")
    for (width, height), scale, ratio in [((96, 72), (0.08, 1.0), (3 / 4, 4 / 3)),
                                          ((300, 40), (0.5, 1.0), (3 / 4, 4 / 3)),  # fallback
                                          ((40, 100), (0.9, 1.0), (0.5, 2.0))]:
        image = Image.new("RGB", (width, height))
        for seed in range(40):
            torch.manual_seed(seed)  # torchvision draws from the global generator
            top, left, h, w = transforms.RandomResizedCrop.get_params(image, scale, ratio)
            assert sample_crop(width, height, scale, ratio, gen(seed)) == (left, top, w, h)


def test_crop_area_and_aspect_stay_in_range_on_an_image_that_shows_coordinates():
    """Each pixel of the source says where it is (red = x, green = y); the nearest-neighbour
    squash of the crop then tells the crop's size from the output alone."""
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    source = Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))
    scale, ratio = (0.25, 0.8), (0.5, 2.0)
    transform = TrainTransform(PLAIN_CARD, AugmentConfig(scale=scale, ratio=ratio))
    fractions, aspects, lefts = [], [], []
    for seed in range(150):
        out = np.rint(unnormalise(transform(source, gen(seed)), PLAIN_CARD) * 255)
        xs, ys = out[..., 0], out[..., 1]
        # Nearest sampling of w source columns into 64 spans w * 63/64 of them, +- 1.
        width = (xs.max() - xs.min()) * 64 / 63
        height = (ys.max() - ys.min()) * 64 / 63
        assert np.all(np.diff(xs, axis=1) >= 0) and np.all(np.diff(ys, axis=0) >= 0)
        fractions.append(width * height / 256**2)
        aspects.append(width / height)
        lefts.append(xs.min())
    fractions, aspects = np.array(fractions), np.array(aspects)
    assert fractions.min() >= scale[0] - 0.03 and fractions.max() <= scale[1] + 0.03
    assert aspects.min() >= ratio[0] * 0.95 and aspects.max() <= ratio[1] * 1.05
    # The whole range is used, and crops move around.
    assert fractions.min() < scale[0] + 0.08 and fractions.max() > scale[1] - 0.08
    assert np.mean(fractions) == pytest.approx(np.mean(scale), abs=0.06)
    assert aspects.min() < 0.65 and aspects.max() > 1.6
    assert len(set(lefts)) > 50


# --- colour --------------------------------------------------------------------------------------

def test_colour_adjustments_match_torchvision():
    functional = pytest.importorskip("torchvision.transforms.functional")
    pixels = np.asarray(noise_image(16, 12, seed=3), dtype=np.float32) / 255
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    for ours, theirs, factors in [
            (adjust_brightness, functional.adjust_brightness, (0.0, 0.6, 1.4)),
            (adjust_contrast, functional.adjust_contrast, (0.0, 0.6, 1.4)),
            (adjust_saturation, functional.adjust_saturation, (0.0, 0.6, 1.4)),
            (adjust_hue, functional.adjust_hue, (-0.5, -0.2, 0.0, 0.1, 0.45))]:
        for factor in factors:
            expected = theirs(tensor, factor).permute(1, 2, 0).numpy()
            np.testing.assert_allclose(ours(pixels, factor), expected, atol=2e-6,
                                       err_msg=f"{ours.__name__}({factor})")


def test_colour_adjustments_move_statistics_the_expected_way():
    pixels = np.asarray(smooth_image(), dtype=np.float32) / 255
    assert adjust_brightness(pixels, 1.5).mean() == pytest.approx(1.5 * pixels.mean(), rel=1e-5)
    assert adjust_brightness(pixels, 0.5).mean() == pytest.approx(0.5 * pixels.mean(), rel=1e-5)
    grey = pixels @ np.array([0.2989, 0.587, 0.114], dtype=np.float32)
    low = adjust_contrast(pixels, 0.5)
    assert low.std() == pytest.approx(0.5 * pixels.std(), rel=1e-4)  # no clipping here
    assert (low @ np.array([0.2989, 0.587, 0.114])).mean() == pytest.approx(grey.mean(),
                                                                            abs=1e-4)
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert np.allclose(adjust_saturation(pixels, 0.0).std(axis=-1), 0, atol=1e-6)
    more = adjust_saturation(pixels, 1.5)
    assert (more.max(axis=-1) - more.min(axis=-1)).mean() > 1.4 * spread.mean()
    red = np.array([[[1.0, 0.0, 0.0]]], dtype=np.float32)
    np.testing.assert_allclose(adjust_hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-6)  # → green
    np.testing.assert_allclose(adjust_hue(red, 0.5), [[[0, 1, 1]]], atol=1e-6)  # → cyan
    np.testing.assert_allclose(adjust_hue(pixels, 0.0), pixels, atol=1e-6)


def test_brightness_jitter_scales_the_image_within_its_range():
    image = smooth_image()
    card = ImageCard(64, "squash", "nearest", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    base = unnormalise(ImageProcessor(card)(image)[0], card).mean()
    transform = TrainTransform(card, AugmentConfig(scale=(1, 1), color_jitter=(0.5, 0, 0, 0)))
    ratios = np.array([unnormalise(transform(image, gen(s)), card).mean() / base
                       for s in range(40)])
    assert ratios.min() >= 0.5 - 0.01 and ratios.max() <= 1.5 + 0.01
    assert (ratios < 0.9).sum() > 5 and (ratios > 1.1).sum() > 5  # darker and brighter


def test_gray_scale_makes_channels_equal_and_jitter_probability_is_respected():
    image = smooth_image()
    gray = TrainTransform(PLAIN_CARD, AugmentConfig(scale=(1, 1), gray_scale_prob=1.0))
    out = gray(image, gen(0))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    expected = ImageProcessor(PLAIN_CARD)(image)[0]
    half = TrainTransform(PLAIN_CARD, AugmentConfig(scale=(1, 1), color_jitter=0.4,
                                                    color_jitter_prob=0.5))
    untouched = sum(torch.equal(half(image, gen(s)), expected) for s in range(60))
    assert 15 <= untouched <= 45


# --- config --------------------------------------------------------------------------------------

def test_config_from_a_mapping_and_its_defaults():
    aug = AugmentConfig.from_dict({"scale": [0.5, 1], "color_jitter": 0.4, "hflip_prob": 0.5})
    assert aug.scale == (0.5, 1.0) and aug.ratio == (3 / 4, 4 / 3)
    assert aug.color_jitter == (0.4, 0.4, 0.4, 0.0) == aug.jitter
    assert AugmentConfig.from_dict(aug.to_dict()) == aug
    assert AugmentConfig.from_dict(None) == AugmentConfig()
    assert AugmentConfig(color_jitter=[0.1, 0.2, 0.3]).jitter == (0.1, 0.2, 0.3, 0.0)


@pytest.mark.parametrize("data, match", [
    ({"scale": [0.5, 1], "hflip": 0.5}, "unknown data.options.augment key hflip; known: scale"),
    ({"scale": [0, 1]}, "data.options.augment.scale"),
    ({"scale": [0.9, 0.5]}, "data.options.augment.scale"),
    ({"scale": 0.5}, "data.options.augment.scale"),
    ({"ratio": [2, 1]}, "data.options.augment.ratio"),
    ({"color_jitter": [0.4, 0.4, 0.4, 0.6]}, "hue"),
    ({"color_jitter": "strong"}, "data.options.augment.color_jitter"),
    ({"gray_scale_prob": 1.5}, "data.options.augment.gray_scale_prob"),
])
def test_bad_config_is_refused_with_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        AugmentConfig.from_dict(data, where="data.options.augment")
    assert "\n" not in str(info.value)


def test_a_naflex_card_is_refused():
    card = ImageCard(64, "naflex", "bilinear", patch_size=16, max_num_patches=16)
    with pytest.raises(ConfigError, match="NaFlex"):
        TrainTransform(card, AugmentConfig())
