"""The Qwen2-VL processor: conversations + images → ``input_ids``, ``pixel_values``,
``image_grid_thw`` exactly as transformers' ``Qwen2VLProcessor`` makes them.

Images keep (about) their own size and aspect ratio:

1. ``smart_resize``: round both sides to multiples of 28 (patch 14 × merge 2), then scale so the
   pixel count lies in [``min_pixels``, ``max_pixels``], keeping the aspect ratio as well as the
   rounding allows;
2. resize with PIL (bicubic), ``/255`` and ``(x - mean) / std`` (CLIP's), in the reference's float
   arithmetic (:mod:`imagefm.data.image`);
3. patchify: 14x14 patches, ordered 2x2 block by 2x2 block, each row the C, T, P, P values of one
   patch where the two frames T of a still image are the same picture; ``image_grid_thw`` is
   (1, height / 14, width / 14) per image.

Text: each ``<|image_pad|>`` (the chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` for an image) becomes ``t*h*w / 4`` pad tokens for
its image, in order, so the model can fill them and check the count. Videos (lists of frames)
go the same way through :mod:`imagefm.qwen_vl_video` and ``<|video_pad|>``.

    proc = QwenVLProcessor.for_model(vlm)          # or convert.qwen2_vl.load_qwen2_vl_processor
    batch = proc.apply_chat_template([[{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is it?"}]}]])
    out = vlm.generate(**batch, max_new_tokens=32)

The reference resizes with torchvision by default in transformers 5 and with PIL in its
``Qwen2VLImageProcessorPil`` (and before 5): we match the PIL one exactly; torchvision's bicubic
differs from PIL's by a grey level here and there (tests/test_qwen2_vl.py bounds it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from imagefm.chat import ChatTemplate
from imagefm.data.image import _RESAMPLING, _normalisation_table
from imagefm.models.qwen_vl import QwenVL, QwenVLConfig
from imagefm.qwen_vl_video import QwenVLVideoProcessor, smart_resize
from imagefm.vlm_processing import (
    ContentPartsProcessor,
    check_all_used,
    check_padding_side,
    check_token_id,
    content_parts,
    conversation_list,
    eos_text,
    expand_placeholders,
    image_sources,
    normalise,
    open_rgb,
    pad_rows,
    require_tokenizer,
)

Messages = Sequence[dict[str, Any]]


class QwenVLImageProcessor:
    """Images → (``pixel_values`` [sum(h*w), C*T*P*P] float32, ``image_grid_thw`` [images, 3])."""

    def __init__(self, config: QwenVLConfig) -> None:
        vision, image = config.vision, config.image
        self.patch, self.merge = vision.patch_size, vision.merge_size
        self.temporal, self.channels = vision.temporal_patch_size, vision.in_channels
        self.min_pixels, self.max_pixels = image.min_pixels, image.max_pixels
        self._resample = _RESAMPLING[image.interpolation]
        self._table = _normalisation_table(image.mean, image.std)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels,
                            self.max_pixels)

    def pixels(self, image: Any) -> np.ndarray:
        """The resized ``uint8`` RGB pixels [H, W, 3] of a path, bytes, PIL image or array."""
        pil = open_rgb(image)
        height, width = self.target_size(pil.height, pil.width)
        if (width, height) != pil.size:
            pil = pil.resize((width, height), self._resample)
        return np.asarray(pil)

    def patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Normalised patch rows of one image, in the tower's order, and its (t, h, w) grid."""
        height, width, _ = pixels.shape
        p, m, t, c = self.patch, self.merge, self.temporal, self.channels
        normed = normalise(self._table, pixels)  # [C, H, W]
        gh, gw = height // p, width // p
        blocks = normed.reshape(c, gh // m, m, p, gw // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return frames.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows, grids = [], []
        for image in images:
            patches, grid = self.patchify(self.pixels(image))
            rows.append(patches)
            grids.append(grid)
        return {"pixel_values": torch.from_numpy(np.concatenate(rows)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


class QwenVLProcessor(ContentPartsProcessor):
    """Tokenizer + chat template + image processor of one Qwen2-VL model (``for_model``,
    ``from_pretrained``, ``render``, ``prompt`` and decoding:
    :class:`~imagefm.vlm_processing.ContentPartsProcessor`)."""

    architecture = QwenVL.architecture
    config_class = QwenVLConfig

    def __init__(self, config: QwenVLConfig, tokenizer: Any, chat_template: str | None) -> None:
        require_tokenizer(tokenizer, "a Qwen2-VL processor")
        check_token_id(tokenizer, config.image_token, config.image_token_id)
        self.config = config
        self.tokenizer = tokenizer  # pieces(): no BOS/EOS added, the template writes its own
        self.image_processor = QwenVLImageProcessor(config)
        self.video_processor = QwenVLVideoProcessor(config)
        placeholder = config.vision_start_token + config.image_token + config.vision_end_token
        self.template = ChatTemplate(chat_template, "", eos_text(tokenizer, config.lm),
                                     placeholder)

    def encode(self, text: str, grids: Iterator[tuple[int, int, int]],
               video_grids: Iterator[tuple[int, int, int]] | None = None) -> list[int]:
        """Ids of ``text`` with each ``<|image_pad|>`` expanded for the next of ``grids`` (and
        each ``<|video_pad|>`` for the next of ``video_grids``)."""
        config = self.config
        counts = {config.image_token_id: (map(config.image_tokens, grids), config.image_token,
                                          "image"),
                  config.video_token_id: (map(config.image_tokens, video_grids or iter(())),
                                          config.video_token, "video")}
        return expand_placeholders(self.tokenizer.pieces(text), counts)

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None,
                 videos: Sequence[Any] | None = None, *,
                 fps: float | Sequence[float | None] | None = None,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (+ ``pixel_values``,
        ``image_grid_thw``) for prompts already rendered; ``images`` are those of all texts, in
        order. Rows are padded on ``padding_side`` (left for generation). ``videos`` (each a
        list of frames or a [T, H, W, C] array, :mod:`imagefm.qwen_vl_video`) add
        ``pixel_values_videos``, ``video_grid_thw`` and, for Qwen2.5-VL, ``second_per_grid_ts``
        from ``fps`` (one rate, or one per video; default ``config.video.fps``)."""
        check_padding_side(padding_side)
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict[str, torch.Tensor] = {}
        grids: list[tuple[int, int, int]] = []
        if images:
            batch = self.image_processor(list(images))
            grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
        video_grids = self._add_videos(batch, videos, fps)
        unused, unused_videos = iter(grids), iter(video_grids)
        rows = [self.encode(piece, unused, unused_videos) for piece in texts]
        check_all_used(len(grids), unused, "image", self.config.image_token)
        check_all_used(len(video_grids), unused_videos, "video", self.config.video_token)
        input_ids, mask = pad_rows(rows, self.tokenizer.pad_id, padding_side)
        types = ((input_ids == self.config.image_token_id).long()
                 + 2 * (input_ids == self.config.video_token_id).long()) * mask
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types,
                **batch}

    def _add_videos(self, batch: dict[str, torch.Tensor], videos: Sequence[Any] | None,
                    fps: float | Sequence[float | None] | None) -> list[tuple[int, int, int]]:
        """Put the videos' tensors into ``batch`` (as the reference: ``second_per_grid_ts`` for
        Qwen2.5-VL only); their grids, in order."""
        if not videos:
            return []
        config = self.config
        check_token_id(self.tokenizer, config.video_token, config.video_token_id)
        out = self.video_processor(list(videos), fps)
        seconds = out.pop("second_per_grid_ts")
        if config.model_type == "qwen2_5_vl":
            out["second_per_grid_ts"] = seconds
        batch.update(out)
        return [tuple(g) for g in out["video_grid_thw"].tolist()]

    def apply_chat_template(self, conversations: Messages | Sequence[Messages], *,
                            add_generation_prompt: bool = True, padding_side: str = "left",
                            **variables: Any) -> dict[str, torch.Tensor]:
        """Render one conversation (or a list of them) and process it with the images found in
        its ``{"type": "image", "image": <path, bytes, PIL image or array>}`` parts and the
        videos of its ``{"type": "video", "video": <frames or [T, H, W, C] array>, "fps": ...}``
        parts (``fps`` optional)."""
        texts, images, videos, rates = [], [], [], []
        for messages in conversation_list(conversations):
            texts.append(self.render(messages, add_generation_prompt=add_generation_prompt,
                                     **variables))
            images += image_sources(messages)
            for part in content_parts(messages, "video"):
                if part.get("video") is None:
                    raise ValueError("a video part needs its frames under 'video'")
                videos.append(part["video"])
                rates.append(part.get("fps"))
        return self(texts, images, videos, fps=rates, padding_side=padding_side)
