"""NaFlex preprocessing (SigLIP 2): every image keeps its aspect ratio and becomes its own grid
of patches, padded to a fixed patch budget.

    image (W x H) ─► resize to (w·p) x (h·p), the largest size with h·w <= max_num_patches
                 ─► /255, (x - mean) / std ─► cut into h·w patches of p x p x C, row by row
                 ─► pad with zero patches to max_num_patches
    gives  pixel_values [B, max_num_patches, p·p·C]   (each patch flattened row, column, channel)
           pixel_attention_mask [B, max_num_patches]  (1 = real patch, 0 = padding)
           spatial_shapes [B, 2]                       ((h, w) of each image's patch grid)

The names, dtypes and values are those of transformers' ``Siglip2ImageProcessor``; with PIL
doing the resize (as ``Siglip2ImageProcessorPil``) the pixel values agree bit for bit. The
torchvision backend transformers picks by default resizes the 8-bit image with its own
antialiased kernels, which differ from PIL's by a grey level here and there (tests measure it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.config import ImageCard
from imagefm.data.image import (
    _RESAMPLING,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    _normalisation_table,
    open_image,
)


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """(height, width) in pixels for a ``height x width`` image: multiples of ``patch_size``
    (at least one patch each way), aspect ratio kept, at most ``max_num_patches`` patches.

    The scale is found by bisection to ``eps``, exactly as transformers and big_vision do it, so
    that the sizes (not just nearly the sizes) agree with the reference processor.
    """
    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


class NaFlexImageProcessor:
    """Images → ``{"pixel_values", "pixel_attention_mask", "spatial_shapes"}`` for one NaFlex
    card (``resize_mode = "naflex"``). Accepts what ``open_image`` accepts and ``uint8`` numpy
    arrays ``HxWx3``."""

    def __init__(self, card: ImageCard, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if card.resize_mode != "naflex" or card.patch_size is None:
            raise ValueError(f"NaFlexImageProcessor needs a card with resize_mode 'naflex', got "
                             f"{card.resize_mode!r} (use imagefm.data.image.ImageProcessor)")
        self.card = card
        self.patch_size = card.patch_size
        self.max_num_patches = card.max_num_patches
        self.max_pixels = max_pixels
        self._resample = _RESAMPLING[card.interpolation]
        self._table = _normalisation_table(card.mean, card.std)  # exactly HF's float32 values

    def __call__(self, images: ImageSource | np.ndarray | Sequence[Any],
                 max_num_patches: int | None = None) -> dict[str, torch.Tensor]:
        """A batch (a single image gives B = 1). ``max_num_patches`` overrides the card's budget
        (NaFlex models run at any sequence length; more patches, more detail)."""
        budget = max_num_patches or self.max_num_patches
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        dim = 3 * self.patch_size**2
        pixel_values = torch.zeros(len(items), budget, dim, dtype=torch.float32)
        mask = torch.zeros(len(items), budget, dtype=torch.int32)
        shapes = torch.zeros(len(items), 2, dtype=torch.int64)
        for index, image in enumerate(items):
            patches, grid = self.patchify(image, budget)
            n = patches.shape[0]
            pixel_values[index, :n] = torch.from_numpy(patches)
            mask[index, :n] = 1
            shapes[index] = torch.tensor(grid)
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask,
                "spatial_shapes": shapes}

    def patchify(self, image: ImageSource | np.ndarray, max_num_patches: int | None = None
                 ) -> tuple[np.ndarray, tuple[int, int]]:
        """One image as normalised patches ``[h*w, p*p*3]`` (``float32``, no padding) and its
        patch grid ``(h, w)``."""
        p = self.patch_size
        pil = self._open(image)
        height, width = naflex_size(pil.height, pil.width, p,
                                    max_num_patches or self.max_num_patches)
        # Resized even when the size is unchanged, as the reference does (PIL copies then).
        pixels = np.asarray(pil.resize((width, height), self._resample))
        values = np.stack([self._table[c][pixels[..., c]] for c in range(3)], axis=-1)
        h, w = height // p, width // p
        patches = values.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
        return patches, (h, w)

    def _open(self, image: ImageSource | np.ndarray) -> Image.Image:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 HxWx3 array, got {image.dtype} "
                                 f"{image.shape}")
            return Image.fromarray(image)
        return open_image(image, max_pixels=self.max_pixels)

    def __repr__(self) -> str:
        return f"NaFlexImageProcessor({self.card})"
