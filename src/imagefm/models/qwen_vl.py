"""Qwen2-VL and Qwen2.5-VL: a native-resolution vision tower feeding a Qwen2 decoder with M-RoPE
positions. The two differ in the vision tower only (Qwen2.5-VL: RMSNorm, gated MLP, window
attention; see :mod:`imagefm.models.qwen2_vl_vision`), which its config describes.

    pixel_values, image_grid_thw ─► QwenVisionTower ─► image tokens [sum(t*h*w)/4, width] ─┐
    input_ids ─► embed_tokens ─► [<|image_pad|> rows replaced by the image tokens, in order] ◄┘
              ─► rope_index: 3-D positions [3, B, L] ─► DecoderLM (M-RoPE) ─► logits

Image tokens by contract: the processor (:mod:`imagefm.qwen_vl_processor`) expands each image's
``<|vision_start|><|image_pad|><|vision_end|>`` into ``t*h*w / merge²`` pad tokens; the model fills
them with that image's tokens and refuses a count that does not match. Videos likewise:
``pixel_values_videos`` and ``video_grid_thw`` (t temporal patches of two frames each) through
the same tower into the ``<|video_pad|>`` rows (:mod:`imagefm.qwen_vl_video`).

M-RoPE positions (:func:`rope_index`): a text token has the same position in all three rows (so
text alone is ordinary 1-D rotary); an image's tokens get (temporal, row, column) positions offset
by where the image starts, and the text after it continues at the image's largest position + 1.
A prompt with images therefore uses fewer positions than tokens; the difference per row
(``rope_deltas``) is stored on the KV cache so every generated token's position is its index
plus that delta, as in the reference.

Interface as transformers' ``Qwen2VLForConditionalGeneration`` (and ``Qwen2_5_VL...``):
``vlm(input_ids=, pixel_values=, image_grid_thw=, attention_mask=).logits`` and
``vlm.generate(**batch, max_new_tokens=...)``; logits and greedy tokens equal it
(tests/test_qwen2_vl.py). One difference: for a padded batch *without* images the reference
counts positions over the padding, we count real tokens only (a padded row computes what it
would alone), as generation does in both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from imagefm.config import (
    CLIP_MEAN_STD,
    INTERPOLATIONS,
    ConfigError,
    check_choice,
    from_dict,
)
from imagefm.models.decoder import DecoderLM, DecoderOutput, KVCache
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.qwen2_vl_vision import QwenVisionConfig, QwenVisionTower
from imagefm.models.qwen_vl_rope import mrope_index
from imagefm.models.vlm_base import VLMBase

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class QwenImageConfig:
    """How the processor turns an image into patches (the reference's preprocessor_config.json):
    resize so both sides are multiples of ``patch_size * merge_size`` and the pixel count lies in
    [``min_pixels``, ``max_pixels``] (``smart_resize``), then ``/255`` and ``(x - mean) / std``."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN_STD[0]
    std: tuple[float, float, float] = CLIP_MEAN_STD[1]

    def __post_init__(self) -> None:
        check_choice("image.interpolation", self.interpolation, INTERPOLATIONS)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"image.min_pixels ({self.min_pixels}) must be > 0 and at most "
                              f"image.max_pixels ({self.max_pixels})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("image.mean and image.std need three values, std > 0")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


@dataclass(frozen=True)
class QwenVideoConfig(QwenImageConfig):
    """How the processor turns video frames into patches (the reference's video processor
    settings, :mod:`imagefm.qwen_vl_video`): every frame resized as one image (its own pixel
    bounds), ``fps`` the frame rate assumed for frames given without one (the reference's
    default), ``max_video_tokens`` > 0 caps each frame's pixels at an even share of that many
    tokens (the reference's ``cap_pixels_per_frame``; 0 = no cap)."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    fps: float = 24.0
    max_video_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps <= 0 or self.max_video_tokens < 0:
            raise ConfigError("video.fps must be > 0 and video.max_video_tokens >= 0")
        object.__setattr__(self, "fps", float(self.fps))


@dataclass(frozen=True)
class QwenVLConfig:
    """Everything that shapes a Qwen2-VL or Qwen2.5-VL model; saved in imagefm.json.
    ``model_type`` names the Hugging Face model to export to."""

    vision: QwenVisionConfig
    lm: DecoderConfig
    image: QwenImageConfig = QwenImageConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token: str = "<|image_pad|>"
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"
    model_type: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl
    video: QwenVideoConfig = QwenVideoConfig()
    video_token: str = "<|video_pad|>"
    # Qwen2.5-VL: video frames on an absolute time axis (M-RoPE temporal positions per second);
    # None: the temporal position counts temporal patches (Qwen2-VL). See models/qwen_vl_rope.py.
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        check_choice("qwen_vl.model_type", self.model_type, MODEL_TYPES)
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ConfigError(f"qwen_vl.tokens_per_second must be > 0 or None, got "
                              f"{self.tokens_per_second}")
        if self.vision.out_width != self.lm.width:
            raise ConfigError(f"vision.out_width ({self.vision.out_width}) must equal the LM's "
                              f"width ({self.lm.width})")
        if not self.lm.mrope_section:
            raise ConfigError("Qwen2-VL's language model needs lm.mrope_section (M-RoPE)")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.lm.vocab_size:
                raise ConfigError(f"qwen_vl.{name} = {getattr(self, name)} is not a token of "
                                  f"the LM's vocabulary of {self.lm.vocab_size}")

    @property
    def merge_size(self) -> int:
        return self.vision.merge_size

    def image_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        """LM positions one image of patch grid (t, h, w) occupies."""
        t, h, w = grid_thw
        return t * h * w // self.merge_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenVLConfig:
        data = dict(data)
        vision = QwenVisionConfig.from_dict(data.pop("vision"))
        lm = DecoderConfig.from_dict(data.pop("lm"))
        image = from_dict(QwenImageConfig, dict(data.pop("image", {})), "image")
        video = from_dict(QwenVideoConfig, dict(data.pop("video", {})), "video")
        return from_dict(cls, {**data, "vision": vision, "lm": lm, "image": image,
                               "video": video}, "qwen_vl")

    def replace(self, **changes: Any) -> QwenVLConfig:
        return dataclasses.replace(self, **changes)


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *,
               image_token_id: int, merge_size: int,
               attention_mask: torch.Tensor | None = None,
               video_grid_thw: torch.Tensor | None = None,
               second_per_grid_ts: torch.Tensor | None = None,
               video_token_id: int | None = None,
               tokens_per_second: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, L] and rope deltas [B] (see the module docstring; videos and
    Qwen2.5-VL's absolute time: :mod:`imagefm.models.qwen_vl_rope`).

    Images (and videos) are taken in order from their grids as their pad tokens are met, row
    after row; each must have exactly its ``t*h*w / merge²`` pad tokens. Padding
    (``attention_mask`` 0) is skipped and gets position 0.
    """
    return mrope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                       image_token_id=image_token_id, video_token_id=video_token_id,
                       merge_size=merge_size, tokens_per_second=tokens_per_second,
                       attention_mask=attention_mask)


class QwenVL(VLMBase):
    """Qwen2-VL / Qwen2.5-VL: ``vlm(input_ids, pixel_values, image_grid_thw, attention_mask)``.

    The tokenizer and chat template live on the inner LM (as :class:`~imagefm.models.vlm.VLM`).
    """

    # The name imagefm.json records for both (imagefm.loading maps it back); config.model_type
    # tells them apart.
    architecture = "qwen2_vl"

    def __init__(self, config: QwenVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = QwenVisionTower(config.vision)
        self.lm = DecoderLM(config.lm)

    # --- the forward pass ------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Image tokens of all images, concatenated: [sum(t*h*w) / merge², lm width]."""
        return self.vision(pixel_values, image_grid_thw)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image pad rows replaced by the images' tokens, in order."""
        embeds = self.lm.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        found = int(slots.sum())
        if image_features is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values need image_grid_thw (the processor returns both)")
            image_features = self.image_features(pixel_values, image_grid_thw)
        if image_features is None:
            if found:
                raise ValueError(f"input_ids hold {found} {self.config.image_token} tokens but "
                                 f"no pixel_values were given")
            return embeds
        if found != image_features.shape[0]:
            raise ValueError(
                f"input_ids hold {found} {self.config.image_token} tokens but the images give "
                f"{image_features.shape[0]} image tokens: build the inputs with the model's "
                f"processor, which expands each image into t*h*w/{self.config.merge_size ** 2} "
                f"pad tokens")
        return embeds.masked_scatter(slots[..., None], image_features.to(embeds.dtype))

    def video_features(self, pixel_values_videos: torch.Tensor,
                       video_grid_thw: torch.Tensor) -> torch.Tensor:
        """Video tokens of all videos, concatenated: [sum(t*h*w) / merge², lm width]. The same
        tower as images; each temporal patch (two frames) attends within itself."""
        return self.vision(pixel_values_videos, video_grid_thw)

    def embed_videos(self, embeds: torch.Tensor, input_ids: torch.Tensor,
                     pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """``embeds`` with the video pad rows replaced by the videos' tokens, in order (the
        count checked as for images)."""
        slots = input_ids == self.config.video_token_id
        found = int(slots.sum())
        if pixel_values_videos is None:
            if found:
                raise ValueError(f"input_ids hold {found} {self.config.video_token} tokens but "
                                 f"no pixel_values_videos were given")
            return embeds
        if video_grid_thw is None:
            raise ValueError("pixel_values_videos need video_grid_thw (the processor returns "
                             "both)")
        features = self.video_features(pixel_values_videos, video_grid_thw)
        if found != features.shape[0]:
            raise ValueError(
                f"input_ids hold {found} {self.config.video_token} tokens but the videos give "
                f"{features.shape[0]} video tokens: build the inputs with the model's processor")
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def rope_index(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, *,
                   video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions [3, B, L] and rope deltas [B] of a prompt (see :func:`rope_index`)."""
        config = self.config
        return rope_index(input_ids, image_grid_thw, image_token_id=config.image_token_id,
                          merge_size=config.merge_size, attention_mask=attention_mask,
                          video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                          video_token_id=config.video_token_id,
                          tokens_per_second=config.tokens_per_second)

    def _positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, *,
                   video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """M-RoPE positions and deltas when the prompt holds images or videos; (None, None) for
        text alone, whose positions the decoder derives itself (the same values, without a
        Python loop)."""
        vision = (input_ids == self.config.image_token_id) | (
            input_ids == self.config.video_token_id)
        if image_grid_thw is None and video_grid_thw is None and not bool(vision.any()):
            return None, None
        return self.rope_index(input_ids, image_grid_thw, attention_mask,
                               video_grid_thw=video_grid_thw,
                               second_per_grid_ts=second_per_grid_ts)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **lm_options: Any,
    ) -> DecoderOutput:
        """Logits [B, L, vocab] (and the next-token loss when ``labels`` are given).

        Positions come from :func:`rope_index` unless given; with a ``cache`` that already holds
        the prompt, new tokens continue at their index + the cache's rope deltas.
        ``mm_token_type_ids`` (the reference processor's output) is accepted and not needed:
        image tokens are found by their id. Videos (``pixel_values_videos``, ``video_grid_thw``
        and, for Qwen2.5-VL, ``second_per_grid_ts``) fill the video pad tokens the same way.
        """
        del mm_token_type_ids
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, image_features)
            inputs_embeds = self.embed_videos(inputs_embeds, input_ids, pixel_values_videos,
                                              video_grid_thw)
        prefill = cache is None or cache.length == 0
        if position_ids is None and input_ids is not None and prefill:
            position_ids, deltas = self._positions(input_ids, image_grid_thw, attention_mask,
                                                   video_grid_thw=video_grid_thw,
                                                   second_per_grid_ts=second_per_grid_ts)
            if cache is not None:
                cache.rope_deltas = deltas
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, cache=cache, labels=labels, **lm_options)

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, mm_token_type_ids: torch.Tensor | None = None,
                 pixel_values_videos: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None,
                 second_per_grid_ts: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Continue the prompts with the KV cache; [B, L + new] ids, prompt included. Options
        are those of :func:`imagefm.models.generation.generate_tokens`."""
        del mm_token_type_ids
        images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                  "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw,
                  "second_per_grid_ts": second_per_grid_ts}
        return self.generate_with(input_ids, attention_mask, images,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def generation_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                          image_grid_thw: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None, *,
                          pixel_values_videos: torch.Tensor | None = None,
                          video_grid_thw: torch.Tensor | None = None,
                          second_per_grid_ts: torch.Tensor | None = None,
                          mm_token_type_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """What the LM's generation loop needs besides the ids: ``inputs_embeds`` (images and
        videos spliced in), ``position_ids`` and ``rope_deltas``. Pass them on to
        :func:`~imagefm.models.generation.generate_tokens` or ``TextStream`` with ``self.lm``.
        ``mm_token_type_ids`` is accepted and not needed (as in :meth:`forward`)."""
        del mm_token_type_ids
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        embeds = self.embed_videos(embeds, input_ids, pixel_values_videos, video_grid_thw)
        positions, deltas = self._positions(input_ids, image_grid_thw, attention_mask,
                                            video_grid_thw=video_grid_thw,
                                            second_per_grid_ts=second_per_grid_ts)
        return {"inputs_embeds": embeds, "position_ids": positions, "rope_deltas": deltas}

    # --- conveniences ---------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision.gradient_checkpointing = enabled
        self.lm.gradient_checkpointing = enabled
