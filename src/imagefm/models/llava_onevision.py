"""LLaVA-OneVision: a SigLIP tower seeing an image as AnyRes tiles, a 2-layer GELU projector and a
Qwen2 decoder.

    pixel_values [images, patches, C, S, S] (patch 0: the whole image squashed to S x S;
    then the tiles of the image resized into its best grid resolution, row by row)
      ─► VisionTransformer.hidden_states(vision_feature_layer) ─► Projector ─► per image:
         base [g², D]  +  tiles laid out as one map [D, rows·g, cols·g]
                          ─► unpad (crop the rows/columns that are padding)
                          ─► shrink bilinearly when larger than max_tiles tiles (anyres_max_9)
                          ─► one image_newline column at the end of every row
    input_ids ─► embed_tokens ─► [<image> rows replaced by those tokens, in order] ─► DecoderLM

(S = the tower's image size, g = S / patch.) An image of a conversation that holds several
images is not tiled: its one patch is the image padded to a square, and it gets its g² tokens and
one newline. ``batch_num_images`` (the processor's output) says how many images each
conversation has; without it every image is treated as a single image, as the reference does.

Image tokens by contract: the processor (:mod:`imagefm.onevision_processor`) writes exactly
:func:`image_token_count` ``<image>`` ids per image, computed by the same geometry as the model
(:func:`anyres_layout`); the model fills them and refuses a count that does not match.

Interface as transformers' ``LlavaOnevisionForConditionalGeneration``:
``vlm(input_ids=, pixel_values=, image_sizes=, attention_mask=, batch_num_images=).logits`` and
``vlm.generate(**batch, max_new_tokens=...)`` (greedy tokens equal to it,
tests/test_llava_onevision.py). Video input is not supported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import (
    CLIP_MEAN_STD,
    INTERPOLATIONS,
    ConfigError,
    VisionConfig,
    check_choice,
    from_dict,
)
from imagefm.models.decoder import DecoderLM, DecoderOutput
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.projector import Projector
from imagefm.models.vit import VisionTransformer
from imagefm.models.vlm_base import VLMBase

FEATURE_SELECTS = ("default", "full")  # default: drop each tile's first token (a CLS); full: keep
_ASPECT_RATIO = re.compile(r"anyres_max_(\d+)")


@dataclass(frozen=True)
class OneVisionImageConfig:
    """How the processor makes pixels (the reference's image processor settings): resampling
    filter, then ``/255`` and ``(x - mean) / std``. Tiles are the tower's ``image_size``."""

    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN_STD[0]
    std: tuple[float, float, float] = CLIP_MEAN_STD[1]

    def __post_init__(self) -> None:
        check_choice("image.interpolation", self.interpolation, INTERPOLATIONS)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("image.mean and image.std need three values, std > 0")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


@dataclass(frozen=True)
class OneVisionConfig:
    """Everything that shapes a LLaVA-OneVision model; saved in imagefm.json.

    ``image_grid_pinpoints``: the (height, width) resolutions, multiples of the tower's image
    size, an image may be tiled into. ``vision_aspect_ratio`` ``anyres_max_N``: the tiles' feature
    map is shrunk to about N tiles' worth when it is more than 1.1 x that.
    ``vision_feature_layer`` indexes the tower's hidden states as Hugging Face does (0 the
    embeddings, -1 the last block; no post-norm).
    """

    vision: VisionConfig
    lm: DecoderConfig
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    image: OneVisionImageConfig = OneVisionImageConfig()
    image_token_id: int = 151646
    image_token: str = "<image>"
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int = -1
    vision_feature_select: str = "full"
    projector_bias: bool = True

    def __post_init__(self) -> None:
        pinpoints = tuple(tuple(int(x) for x in p) for p in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)
        check_choice("onevision.vision_feature_select", self.vision_feature_select,
                     FEATURE_SELECTS)
        if self.vision.naflex:
            raise ConfigError("LLaVA-OneVision tiles fixed-size images; the vision tower must not "
                              "be a NaFlex tower")
        side = self.vision.image_size
        if not pinpoints or any(len(p) != 2 or min(p) <= 0 or p[0] % side or p[1] % side
                                for p in pinpoints):
            raise ConfigError(f"onevision.image_grid_pinpoints {list(pinpoints)} must be "
                              f"(height, width) pairs, multiples of the tower's image size {side}")
        if _ASPECT_RATIO.fullmatch(self.vision_aspect_ratio) is None:
            raise ConfigError(f"onevision.vision_aspect_ratio {self.vision_aspect_ratio!r} is not "
                              f"'anyres_max_<N>'")
        if self.max_tiles < 1:
            raise ConfigError("onevision.vision_aspect_ratio: anyres_max_<N> needs N >= 1")
        layers = self.vision.layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ConfigError(f"onevision.vision_feature_layer = {self.vision_feature_layer} is "
                              f"outside the tower's {layers + 1} hidden states")
        # Each tile must give exactly grid² tokens (the reference lays them out as a g x g map):
        # SigLIP (no class token) keeps all ("full"), a CLIP tower drops its CLS ("default").
        if self.vision.class_token != (self.vision_feature_select == "default"):
            raise ConfigError(
                f"onevision.vision_feature_select = {self.vision_feature_select!r} with a tower "
                f"{'with' if self.vision.class_token else 'without'} a class token would not "
                f"leave one token per patch; use 'default' with a class token, 'full' without")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ConfigError(f"onevision.image_token_id = {self.image_token_id} is not a token "
                              f"of the LM's vocabulary of {self.lm.vocab_size}")

    @property
    def grid_size(self) -> int:
        """Side g of one tile's feature map."""
        return self.vision.grid_size

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def max_tiles(self) -> int:
        return int(_ASPECT_RATIO.fullmatch(self.vision_aspect_ratio).group(1))

    @property
    def feature_blocks(self) -> int:
        """How many vision blocks run to reach ``vision_feature_layer``."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.layers + 1 + layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OneVisionConfig:
        data = dict(data)
        vision = from_dict(VisionConfig, data.pop("vision"), "vision")
        lm = DecoderConfig.from_dict(data.pop("lm"))
        image = from_dict(OneVisionImageConfig, dict(data.pop("image", {})), "image")
        return from_dict(cls, {**data, "vision": vision, "lm": lm, "image": image}, "onevision")

    def replace(self, **changes: Any) -> OneVisionConfig:
        return dataclasses.replace(self, **changes)


# --- AnyRes geometry (shared with the processor, so token counts and features agree) -------------

def select_best_resolution(height: int, width: int,
                           pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) among ``pinpoints`` that keeps most of the image's pixels when it is
    scaled to fit inside, the one wasting least area on ties (first one wins exact ties)."""
    best, best_kept, best_waste = pinpoints[0], -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = h * w - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (h, w), kept, waste
    return best


def tiles_per_image(height: int, width: int, config: OneVisionConfig) -> int:
    """Patches a tiled image has: its tiles plus the base (whole) image."""
    best_h, best_w = select_best_resolution(height, width, config.image_grid_pinpoints)
    side = config.tile_size
    return math.ceil(best_h / side) * math.ceil(best_w / side) + 1


@dataclass(frozen=True)
class AnyResLayout:
    """Where a tiled image's features go: ``rows x cols`` tiles; of their joined g-per-tile map,
    rows ``[top, top + height)`` and columns ``[left, left + width)`` are the image (the rest is
    padding); ``shrunk`` (height, width) when that part is then resized down, else None."""

    rows: int
    cols: int
    top: int
    height: int
    left: int
    width: int
    shrunk: tuple[int, int] | None

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.shrunk or (self.height, self.width)


def anyres_layout(height: int, width: int, config: OneVisionConfig) -> AnyResLayout:
    """The layout of an image of ``height x width`` pixels (see :class:`AnyResLayout`).

    The image was resized to fit its best resolution and centred with padding; unpadding keeps
    the band the image covers, computed from the aspect ratios as the reference does (rounding
    the scaled side at 7 decimals, the same padding cut from both ends).
    """
    best_h, best_w = select_best_resolution(height, width, config.image_grid_pinpoints)
    g, side = config.grid_size, config.tile_size
    rows, cols = best_h // side, best_w // side
    map_h, map_w = rows * g, cols * g
    top, left, keep_h, keep_w = 0, 0, map_h, map_w
    if width / height > map_w / map_h:  # wider than the map: padding above and below
        new_h = int(round(height * (map_w / width), 7))
        top = (map_h - new_h) // 2
        keep_h = map_h - 2 * top
    else:
        new_w = int(round(width * (map_h / height), 7))
        left = (map_w - new_w) // 2
        keep_w = map_w - 2 * left
    ratio = math.sqrt(keep_h * keep_w / (config.max_tiles * g * g))
    shrunk = (int(keep_h // ratio), int(keep_w // ratio)) if ratio > 1.1 else None
    return AnyResLayout(rows, cols, top, keep_h, left, keep_w, shrunk)


def image_token_count(height: int, width: int, config: OneVisionConfig, *,
                      tiled: bool = True) -> int:
    """``<image>`` tokens of one image: the base tile's g², then (tiled) every row of the
    unpadded map plus its newline, or (an image among several) one newline."""
    base = config.grid_size ** 2
    if not tiled:
        return base + 1
    h, w = anyres_layout(height, width, config).out_shape
    return base + h * (w + 1)


def tiled_images(batch_num_images: Any, images: int) -> list[bool]:
    """Which images are tiled: those alone in their conversation (all, without the counts)."""
    if batch_num_images is None:
        return [True] * images
    counts = [int(n) for n in (batch_num_images.tolist() if torch.is_tensor(batch_num_images)
                               else batch_num_images)]
    if sum(counts) != images:
        raise ValueError(f"batch_num_images {counts} adds up to {sum(counts)} images, but "
                         f"{images} were given")
    return [n == 1 for n in counts for _ in range(n)]


# --- the model ------------------------------------------------------------------------------------

class LlavaOneVision(VLMBase):
    """``vlm(input_ids, pixel_values, image_sizes, attention_mask)`` / ``vlm.generate(...)``.

    The tokenizer and chat template live on the inner LM (as :class:`~imagefm.models.vlm.VLM`).
    """

    architecture = "llava_onevision"  # the name imagefm.json records

    def __init__(self, config: OneVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.projector = Projector("mlp2x_gelu", config.vision.width, config.lm.width,
                                   bias=config.projector_bias)
        self.image_newline = nn.Parameter(torch.randn(config.lm.width) * config.lm.width**-0.5)
        self.lm = DecoderLM(config.lm)

    # --- images → tokens -------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                       batch_num_images: Any = None) -> list[torch.Tensor]:
        """Each image's tokens [image_token_count, lm width], in order.

        ``pixel_values`` [images, patches, C, S, S] (zero patches after an image's own count are
        padding) or its real patches already concatenated [sum(patches), C, S, S].
        """
        sizes = [tuple(int(x) for x in s) for s in image_sizes.tolist()]
        tiled = tiled_images(batch_num_images, len(sizes))
        counts = [tiles_per_image(h, w, self.config) if t else 1
                  for (h, w), t in zip(sizes, tiled, strict=True)]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images but "
                                 f"image_sizes {len(sizes)}")
            if max(counts) > pixel_values.shape[1]:
                raise ValueError(f"an image needs {max(counts)} patches but pixel_values hold "
                                 f"{pixel_values.shape[1]} per image: build them with the "
                                 f"model's processor")
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts, strict=True)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected [images, "
                             f"patches, C, H, W] or [{sum(counts)}, C, H, W]")
        tokens = self.vision.hidden_states(pixel_values, self.config.feature_blocks)
        if self.config.vision_feature_select == "default":
            tokens = tokens[:, 1:]
        features = self.projector(tokens).split(counts)
        return [self._pack(f, size, t) for f, size, t in zip(features, sizes, tiled, strict=True)]

    def _pack(self, features: torch.Tensor, size: tuple[int, int], tiled: bool) -> torch.Tensor:
        """One image's patch features [patches, g², D] → its tokens (see the module docstring)."""
        newline = self.image_newline.to(features.dtype)
        if not tiled:
            return torch.cat([features[0], newline[None]])
        layout = anyres_layout(*size, self.config)
        g, width = self.config.grid_size, features.shape[-1]
        tiles = features[1:].reshape(layout.rows, layout.cols, g, g, width)
        grid = tiles.permute(4, 0, 2, 1, 3).reshape(width, layout.rows * g, layout.cols * g)
        grid = grid[:, layout.top:layout.top + layout.height,
                    layout.left:layout.left + layout.width]
        if layout.shrunk is not None:
            grid = F.interpolate(grid[None], size=layout.shrunk, mode="bilinear")[0]
        column = newline[:, None, None].expand(width, grid.shape[1], 1)
        rows = torch.cat([grid, column], dim=2).flatten(1).t()  # row by row, newline last
        return torch.cat([features[0], rows])

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None, batch_num_images: Any = None,
              image_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with the ``<image>`` rows replaced by the images' tokens, in order."""
        embeds = self.lm.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        found = int(slots.sum())
        if image_features is None and pixel_values is not None:
            if image_sizes is None:
                raise ValueError("pixel_values need image_sizes (the processor returns both)")
            image_features = self.image_features(pixel_values, image_sizes, batch_num_images)
        if image_features is None:
            if found:
                raise ValueError(f"input_ids hold {found} {self.config.image_token} tokens but "
                                 f"no pixel_values were given")
            return embeds
        features = torch.cat(list(image_features)) if len(image_features) else embeds[:0, 0]
        if found != features.shape[0]:
            raise ValueError(
                f"input_ids hold {found} {self.config.image_token} tokens but the images give "
                f"{features.shape[0]} image tokens: build the inputs with the model's processor, "
                f"which writes each image's exact count")
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    # --- the forward pass ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_num_images: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        **lm_options: Any,
    ) -> DecoderOutput:
        """Logits [B, L, vocab] (and the next-token loss when ``labels`` are given).
        ``lm_options`` go to the decoder (``position_ids``, ``cache``, ``logits_to_keep``...)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, batch_num_images,
                                       image_features)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       **lm_options)

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_sizes: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, batch_num_images: Any = None,
                 **kwargs: Any) -> torch.Tensor:
        """Continue the prompts with the KV cache; [B, L + new] ids, prompt included. Options
        are those of :func:`imagefm.models.generation.generate_tokens`."""
        images = {"pixel_values": pixel_values, "image_sizes": image_sizes,
                  "batch_num_images": batch_num_images}
        return self.generate_with(input_ids, attention_mask, images,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def generation_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                          image_sizes: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None, *,
                          batch_num_images: Any = None) -> dict[str, Any]:
        """What the LM's generation loop needs besides the ids: ``inputs_embeds`` with the images
        spliced in. Pass it on to :func:`~imagefm.models.generation.generate_tokens` or
        ``TextStream`` with ``self.lm``."""
        del attention_mask  # positions are plain 1-D ones the decoder derives from the mask
        return {"inputs_embeds": self.embed(input_ids, pixel_values, image_sizes,
                                            batch_num_images)}

    # --- conveniences ---------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision.transformer.gradient_checkpointing = enabled
        self.lm.gradient_checkpointing = enabled
