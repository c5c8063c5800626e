"""The LLaVA-OneVision processor: conversations + images → ``input_ids``, ``pixel_values``,
``image_sizes``, ``batch_num_images`` exactly as transformers' ``LlavaOnevisionProcessor`` makes
them.

An image alone in its conversation is seen at high resolution (AnyRes):

1. pick the best of the model's ``image_grid_pinpoints`` for the image's size
   (:func:`~imagefm.models.llava_onevision.select_best_resolution`);
2. resize the image to fit inside it, keeping the aspect ratio (a side rounded up), and centre it
   on black padding (an odd remainder goes to the bottom / right);
3. cut that into S x S tiles, row by row (S = the tower's image size), and put the whole image
   squashed to S x S in front of them (the base patch);

an image among several in one conversation is padded to a square with the mean colour and
squashed to S x S (one patch). Every patch is resized with PIL (bicubic), ``/255`` and
``(x - mean) / std`` (:mod:`imagefm.data.image`'s float arithmetic, equal to the reference's).
``pixel_values`` is [images, most patches, 3, S, S], zero patches after an image's own.

Text: each ``<image>`` becomes the image's exact token count
(:func:`~imagefm.models.llava_onevision.image_token_count`, which depends on the unpadded feature
shape), images taken in order across the batch.

    proc = OneVisionProcessor.for_model(vlm)       # or convert.llava_onevision's loader
    batch = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is it?"}]}])
    out = vlm.generate(**batch, max_new_tokens=32)

transformers 5 resizes with torchvision by default and with PIL in its
``LlavaOnevisionImageProcessorPil``: we match the PIL one exactly (the torchvision one differs by
a grey level here and there; tests/test_llava_onevision.py bounds it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.chat import ChatTemplate
from imagefm.data.image import _RESAMPLING, _normalisation_table
from imagefm.models.llava_onevision import (
    LlavaOneVision,
    OneVisionConfig,
    image_token_count,
    select_best_resolution,
)
from imagefm.vlm_processing import (
    ContentPartsProcessor,
    check_all_used,
    check_padding_side,
    check_token_id,
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


class OneVisionImageProcessor:
    """Images → ``pixel_values`` [images, patches, 3, S, S] float32, ``image_sizes`` [images, 2]
    (height, width), ``batch_num_images`` [conversations] (see the module docstring)."""

    def __init__(self, config: OneVisionConfig) -> None:
        self.config = config
        self.size = config.tile_size
        self._resample = _RESAMPLING[config.image.interpolation]
        self._table = _normalisation_table(config.image.mean, config.image.std)
        # The square padding of an image among several: the mean colour, truncated to uint8.
        self._fill = tuple(int(m * 255) for m in config.image.mean)

    def _squash(self, image: Image.Image) -> Image.Image:
        size = (self.size, self.size)
        return image if image.size == size else image.resize(size, self._resample)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The base patch and the tiles of an image seen alone (AnyRes)."""
        width, height = image.size
        best_h, best_w = select_best_resolution(height, width, self.config.image_grid_pinpoints)
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:  # the width fills the resolution, the height is rounded up
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), best_w), best_h
        canvas = Image.new("RGB", (best_w, best_h))  # black
        canvas.paste(image.resize((new_w, new_h), self._resample),
                     ((best_w - new_w) // 2, (best_h - new_h) // 2))
        s = self.size
        cut = [canvas.crop((x, y, x + s, y + s)) for y in range(0, best_h, s)
               for x in range(0, best_w, s)]
        return [self._squash(image), *cut]

    def square(self, image: Image.Image) -> Image.Image:
        """An image among several: padded to a square with the mean colour, squashed to S."""
        width, height = image.size
        if width != height:
            side = max(width, height)
            canvas = Image.new("RGB", (side, side), self._fill)
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        return self._squash(image)

    def __call__(self, images: Sequence[Any] | Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """``images`` flat (each its own conversation, so each is tiled) or grouped per
        conversation (a group of several: no tiling), as the reference takes them."""
        groups = ([list(g) for g in images if len(g)]
                  if images and isinstance(images[0], (list, tuple)) else [[i] for i in images])
        patches, sizes = [], []
        for group in groups:
            for image in group:
                pil = open_rgb(image)
                pieces = self.tiles(pil) if len(group) == 1 else [self.square(pil)]
                patches.append(np.stack([normalise(self._table, np.asarray(p)) for p in pieces]))
                sizes.append((pil.height, pil.width))
        most = max(len(p) for p in patches)
        pixel_values = np.zeros((len(patches), most, 3, self.size, self.size), dtype=np.float32)
        for index, stack in enumerate(patches):
            pixel_values[index, :len(stack)] = stack
        return {"pixel_values": torch.from_numpy(pixel_values),
                "image_sizes": torch.tensor(sizes, dtype=torch.long),
                "batch_num_images": torch.tensor([len(g) for g in groups], dtype=torch.long)}


class OneVisionProcessor(ContentPartsProcessor):
    """Tokenizer + chat template + image processor of one LLaVA-OneVision model (``for_model``,
    ``from_pretrained``, ``render``, ``prompt`` and decoding:
    :class:`~imagefm.vlm_processing.ContentPartsProcessor`)."""

    architecture = LlavaOneVision.architecture
    config_class = OneVisionConfig

    def __init__(self, config: OneVisionConfig, tokenizer: Any, chat_template: str | None) -> None:
        require_tokenizer(tokenizer, "a LLaVA-OneVision processor")
        check_token_id(tokenizer, config.image_token, config.image_token_id)
        self.config = config
        self.tokenizer = tokenizer  # pieces(): no BOS/EOS added, the template writes its own
        self.image_processor = OneVisionImageProcessor(config)
        self.template = ChatTemplate(chat_template, "", eos_text(tokenizer, config.lm),
                                     config.image_token)

    def encode(self, text: str, counts: Iterator[int]) -> list[int]:
        """Ids of ``text`` with each ``<image>`` expanded to the next of ``counts`` tokens."""
        config = self.config
        return expand_placeholders(self.tokenizer.pieces(text), {
            config.image_token_id: (counts, config.image_token, "image")})

    def __call__(self, text: str | Sequence[str],
                 images: Sequence[Any] | Sequence[Sequence[Any]] | None = None, *,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (+ ``pixel_values``, ``image_sizes``,
        ``batch_num_images``) for prompts already rendered. ``images``: those of all texts in
        order, flat (each image tiled, as if alone) or one list per text (several in a list: not
        tiled). Rows are padded on ``padding_side`` (left for generation)."""
        check_padding_side(padding_side)
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if images:
            batch = self.image_processor(images)
            tiled = [n == 1 for n in batch["batch_num_images"].tolist() for _ in range(n)]
            counts = [image_token_count(h, w, self.config, tiled=t)
                      for (h, w), t in zip(batch["image_sizes"].tolist(), tiled, strict=True)]
        unused = iter(counts)
        rows = [self.encode(piece, unused) for piece in texts]
        check_all_used(len(counts), unused, "image", self.config.image_token)
        input_ids, mask = pad_rows(rows, self.tokenizer.pad_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": mask, **batch}

    def apply_chat_template(self, conversations: Messages | Sequence[Messages], *,
                            add_generation_prompt: bool = True, padding_side: str = "left",
                            **variables: Any) -> dict[str, torch.Tensor]:
        """Render one conversation (or a list of them) and process it with the images found in
        its ``{"type": "image", "image": <path, bytes, PIL image or array>}`` parts, grouped per
        conversation (a conversation with several images does not tile them)."""
        texts, groups = [], []
        for messages in conversation_list(conversations):
            texts.append(self.render(messages, add_generation_prompt=add_generation_prompt,
                                     **variables))
            groups.append(image_sources(messages))
        return self(texts, groups if any(groups) else None, padding_side=padding_side)
