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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.chat import ChatTemplate
from imagefm.data.image import (
    _RESAMPLING,
    _array_to_pil,
    _normalisation_table,
    _rgb_array,
    open_image,
)
from imagefm.models.llava_onevision import (
    OneVisionConfig,
    image_token_count,
    select_best_resolution,
)
from imagefm.vlm_runtime import ContentPartsPrompt

Messages = Sequence[dict[str, Any]]


def _pil(image: Any) -> Image.Image:
    """An RGB PIL image from a path, bytes, PIL image or uint8 array."""
    if isinstance(image, np.ndarray):
        rgb = _rgb_array(image)
        return Image.fromarray(rgb) if rgb is not None else open_image(_array_to_pil(image))
    return open_image(image)


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

    def _normalise(self, patch: Image.Image) -> np.ndarray:
        pixels = np.asarray(patch)
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        for channel in range(3):  # table lookup: exactly the reference's float32 values
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel])
        return out

    def __call__(self, images: Sequence[Any] | Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """``images`` flat (each its own conversation, so each is tiled) or grouped per
        conversation (a group of several: no tiling), as the reference takes them."""
        groups = ([list(g) for g in images if len(g)]
                  if images and isinstance(images[0], (list, tuple)) else [[i] for i in images])
        patches, sizes = [], []
        for group in groups:
            for image in group:
                pil = _pil(image)
                pieces = self.tiles(pil) if len(group) == 1 else [self.square(pil)]
                patches.append(np.stack([self._normalise(p) for p in pieces]))
                sizes.append((pil.height, pil.width))
        most = max(len(p) for p in patches)
        pixel_values = np.zeros((len(patches), most, 3, self.size, self.size), dtype=np.float32)
        for index, stack in enumerate(patches):
            pixel_values[index, :len(stack)] = stack
        return {"pixel_values": torch.from_numpy(pixel_values),
                "image_sizes": torch.tensor(sizes, dtype=torch.long),
                "batch_num_images": torch.tensor([len(g) for g in groups], dtype=torch.long)}


class OneVisionProcessor(ContentPartsPrompt):
    """Tokenizer + chat template + image processor of one LLaVA-OneVision model (``prompt`` and
    decoding: :class:`~imagefm.vlm_runtime.ContentPartsPrompt`)."""

    def __init__(self, config: OneVisionConfig, tokenizer: Any, chat_template: str | None) -> None:
        if tokenizer is None:
            raise ValueError("a LLaVA-OneVision processor needs the model's tokenizer")
        if tokenizer.token_to_id(config.image_token) != config.image_token_id:
            raise ValueError(f"the tokenizer maps {config.image_token!r} to "
                             f"{tokenizer.token_to_id(config.image_token)}, the model expects "
                             f"{config.image_token_id}")
        self.config = config
        self.tokenizer = tokenizer  # pieces(): no BOS/EOS added, the template writes its own
        self.image_processor = OneVisionImageProcessor(config)
        eos = config.lm.eos_token_ids
        self.template = ChatTemplate(chat_template, "",
                                     (tokenizer.id_to_token(eos[0]) or "") if eos else "",
                                     config.image_token)

    @classmethod
    def for_model(cls, model: Any) -> OneVisionProcessor:
        return cls(model.config, model.tokenizer, model.chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OneVisionProcessor:
        """The processor of an imagefm LLaVA-OneVision directory, without loading weights."""
        from imagefm.checkpoint import CHAT_TEMPLATE_FILE, CheckpointError, read_meta
        from imagefm.models.llava_onevision import LlavaOneVision
        from imagefm.tokenizer import Tokenizer

        directory = Path(path)
        meta = read_meta(directory)
        if meta.get("architecture") != LlavaOneVision.architecture:
            raise CheckpointError(f"{directory} holds a {meta.get('architecture')!r} model, not "
                                  f"{LlavaOneVision.architecture!r}")
        template = directory / CHAT_TEMPLATE_FILE
        return cls(OneVisionConfig.from_dict(meta["config"]), Tokenizer.from_pretrained(directory),
                   template.read_text(encoding="utf-8") if template.is_file() else None)

    def render(self, messages: Messages, *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The conversation as prompt text, with the model's chat template."""
        return self.template.render(messages, add_generation_prompt=add_generation_prompt,
                                    **variables)

    def encode(self, text: str, counts: Iterator[int]) -> list[int]:
        """Ids of ``text`` with each ``<image>`` expanded to the next of ``counts`` tokens."""
        token = self.config.image_token_id
        ids: list[int] = []
        for index in self.tokenizer.pieces(text):
            if index != token:
                ids.append(index)
                continue
            count = next(counts, None)
            if count is None:
                raise ValueError(f"the text holds more {self.config.image_token} placeholders "
                                 f"than images were given")
            ids.extend([token] * count)
        return ids

    def __call__(self, text: str | Sequence[str],
                 images: Sequence[Any] | Sequence[Sequence[Any]] | None = None, *,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (+ ``pixel_values``, ``image_sizes``,
        ``batch_num_images``) for prompts already rendered. ``images``: those of all texts in
        order, flat (each image tiled, as if alone) or one list per text (several in a list: not
        tiled). Rows are padded on ``padding_side`` (left for generation)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
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
        left = sum(1 for _ in unused)
        if left:
            raise ValueError(f"{len(counts)} image(s) were given but the text holds "
                             f"{len(counts) - left} {self.config.image_token} placeholder(s)")
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), None) if padding_side == "left" else slice(len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask, **batch}

    def apply_chat_template(self, conversations: Messages | Sequence[Messages], *,
                            add_generation_prompt: bool = True, padding_side: str = "left",
                            **variables: Any) -> dict[str, torch.Tensor]:
        """Render one conversation (or a list of them) and process it with the images found in
        its ``{"type": "image", "image": <path, bytes, PIL image or array>}`` parts, grouped per
        conversation (a conversation with several images does not tile them)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        texts, groups = [], []
        for messages in conversations:
            texts.append(self.render(messages, add_generation_prompt=add_generation_prompt,
                                     **variables))
            group = []
            for message in messages:
                content = message["content"]
                for part in content if isinstance(content, list) else []:
                    if part.get("type") == "image":
                        if part.get("image") is None:
                            raise ValueError("an image part needs its picture under 'image'")
                        group.append(part["image"])
            groups.append(group)
        return self(texts, groups if any(groups) else None, padding_side=padding_side)
