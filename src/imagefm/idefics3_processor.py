"""The Idefics3 / SmolVLM processor: conversations + images → ``input_ids``, ``attention_mask``,
``pixel_values``, ``pixel_attention_mask`` exactly as transformers' ``Idefics3Processor`` /
``SmolVLMProcessor`` make them.

Images (:class:`Idefics3ImageProcessor`, settings in
:class:`~imagefm.models.idefics3.Idefics3ImageConfig`):

1. resize so the longest edge is ``longest_edge`` (Lanczos, on 8-bit pixels, as the reference);
2. with splitting: resize again so both sides are multiples of the tile size ``S``, cut
   ``rows × cols`` tiles row by row, then add the whole image squashed to ``S×S`` (the global
   view) — an image that fits one tile is that tile alone (rows = cols = 0); without splitting,
   the image squashed to ``S×S``;
3. ``* rescale_factor`` and ``(x - mean) / std`` in the reference's float arithmetic (a table
   look-up per 8-bit value); a batch is zero-padded to its largest tile count and
   ``pixel_attention_mask`` marks the real pixels.

Text: each ``<image>`` becomes, for an image of rows × cols tiles (F = <fake_token_around_image>)::

    F<row_1_col_1><image>×n F<row_1_col_2><image>×n ... F<row_1_col_c><image>×n \\n
    ...                                                     (one line per row of tiles)
    \\n F<global-img><image>×n F

(no spaces; a single tile: ``F<global-img><image>×n F``), with n = ``image_seq_len``; the
expanded text is tokenized as the reference tokenizes it.

    proc = load_idefics3_processor("SmolVLM-256M-Instruct")     # or Idefics3Processor.for_model
    batch = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is it?"}]}])
    out = model.generate(**batch, max_new_tokens=32)

The reference resizes with torchvision by default in transformers 5 and with PIL in its
``Idefics3ImageProcessorPil`` (and before 5): we match the PIL one exactly; torchvision's Lanczos
differs from PIL's by a grey level here and there (tests/test_idefics3.py bounds it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.chat import ChatTemplate
from imagefm.models.idefics3 import Idefics3, Idefics3Config, Idefics3ImageConfig
from imagefm.vlm_processing import (
    ContentPartsProcessor,
    check_padding_side,
    check_token_id,
    conversation_list,
    eos_text,
    image_sources,
    normalise,
    open_rgb,
    pad_rows,
    require_tokenizer,
    token_text,
)

Messages = Sequence[dict[str, Any]]
MAX_IMAGE_SIZE = 4096  # the reference's cap on either side after the first resize
_RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
               "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest side set to ``longest`` (up or down), the other scaled
    and rounded down, then up to even; both then scaled below 4096. The reference's integer
    arithmetic, step by step."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``tile``: the long side first, the short side
    from the aspect ratio (rounded down), then up to a multiple (the reference's steps)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _table(image: Idefics3ImageConfig) -> np.ndarray:
    """``table[c, v]``: 8-bit value ``v`` of channel ``c`` rescaled (float64, cast to float32)
    and normalised in float32, as the reference computes it."""
    levels = (np.arange(256, dtype=np.float64) * image.rescale_factor).astype(np.float32)
    if not image.normalize:
        return np.ascontiguousarray(np.broadcast_to(levels, (3, 256)))
    mean = np.asarray(image.mean, dtype=np.float32)[:, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((levels[None, :] - mean) / std, dtype=np.float32)


class Idefics3ImageProcessor:
    """Images → tiles, ``pixel_values`` [B, tiles, 3, S, S] and ``pixel_attention_mask``."""

    def __init__(self, image: Idefics3ImageConfig) -> None:
        self.config = image
        self._resample = _RESAMPLING[image.interpolation]
        self._table = _table(image)

    def _resize(self, pil: Image.Image, height: int, width: int) -> Image.Image:
        return pil if pil.size == (width, height) else pil.resize((width, height), self._resample)

    def tiles(self, image: Any) -> tuple[list[np.ndarray], int, int]:
        """The ``uint8`` tiles [S, S, 3] of one image (global view last) and its rows, cols
        (0, 0 when it is a single tile)."""
        c = self.config
        pil = open_rgb(image)
        if c.resize:
            pil = self._resize(pil, *longest_edge_size(pil.height, pil.width, c.longest_edge))
        tile = c.tile_size
        if not c.split:
            return [np.asarray(self._resize(pil, tile, tile))], 0, 0
        pil = self._resize(pil, *tiled_size(pil.height, pil.width, tile))
        if pil.height <= tile and pil.width <= tile:
            return [np.asarray(pil)], 0, 0
        pixels = np.asarray(pil)
        rows, cols = pil.height // tile, pil.width // tile
        crops = [pixels[r * tile:(r + 1) * tile, k * tile:(k + 1) * tile]
                 for r in range(rows) for k in range(cols)]
        return [*crops, np.asarray(self._resize(pil, tile, tile))], rows, cols

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """One tile's ``uint8`` [H, W, 3] pixels → ``float32`` [3, H, W]."""
        return normalise(self._table, pixels)

    def __call__(self, images: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """``images`` per sample (a list of lists) → ``pixel_values``, ``pixel_attention_mask``
        (zero-padded to the batch's largest tile count and size), ``rows``, ``cols``."""
        samples, rows, cols = [], [], []
        for sample in images:
            tiles, sample_rows, sample_cols = [], [], []
            for image in sample:
                crops, r, k = self.tiles(image)
                tiles += crops
                sample_rows.append(r)
                sample_cols.append(k)
            samples.append(tiles)
            rows.append(sample_rows)
            cols.append(sample_cols)
        count = max((len(t) for t in samples), default=0)
        shapes = [t.shape for tiles in samples for t in tiles] or [(0, 0)]
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        values = np.zeros((len(samples), count, 3, height, width), dtype=np.float32)
        mask = np.zeros((len(samples), count, height, width), dtype=np.int64)
        for i, tiles in enumerate(samples):
            for j, tile in enumerate(tiles):
                h, w = tile.shape[:2]
                values[i, j, :, :h, :w] = self.normalize(tile)
                mask[i, j, :h, :w] = 1
        return {"pixel_values": torch.from_numpy(values),
                "pixel_attention_mask": torch.from_numpy(mask), "rows": rows, "cols": cols}


class Idefics3Processor(ContentPartsProcessor):
    """Tokenizer + chat template + image processor of one Idefics3 / SmolVLM model
    (``for_model``, ``from_pretrained``, ``render``, ``prompt`` and decoding:
    :class:`~imagefm.vlm_processing.ContentPartsProcessor`)."""

    architecture = Idefics3.architecture
    config_class = Idefics3Config

    def __init__(self, config: Idefics3Config, tokenizer: Any, chat_template: str | None) -> None:
        require_tokenizer(tokenizer, "an Idefics3 processor")
        for token in (config.image_token, config.fake_image_token, config.global_image_token):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {token!r} token; the model's tokenizer "
                                 f"has it as one whole token")
        check_token_id(tokenizer, config.image_token, config.image_token_id)
        self.config = config
        self.tokenizer = tokenizer  # pieces(): no BOS/EOS added, the template writes its own
        self.image_processor = Idefics3ImageProcessor(config.image)
        self.image_seq_len = config.image_seq_len
        self.bos_token = token_text(tokenizer, config.lm.bos_token_id)
        self.template = ChatTemplate(chat_template, self.bos_token,
                                     eos_text(tokenizer, config.lm), config.image_token)

    # --- text ------------------------------------------------------------------------------------

    def image_text(self, rows: int, cols: int) -> str:
        """What one ``<image>`` becomes for an image of ``rows`` × ``cols`` tiles."""
        c = self.config
        image = c.image_token * self.image_seq_len
        glob = f"{c.fake_image_token}{c.global_image_token}{image}{c.fake_image_token}"
        if rows == 0 and cols == 0:
            return glob
        lines = "".join(
            "".join(f"{c.fake_image_token}<row_{r + 1}_col_{k + 1}>{image}" for k in range(cols))
            + "\n" for r in range(rows))
        return f"{lines}\n{glob}"

    def expand(self, text: str, grids: Sequence[tuple[int, int]]) -> str:
        """``text`` with its ``<image>`` placeholders expanded, one per (rows, cols) in order."""
        pieces = text.split(self.config.image_token)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"the text holds {len(pieces) - 1} {self.config.image_token} "
                             f"placeholder(s) but {len(grids)} image(s) were given for it")
        out = [pieces[0]]
        for (rows, cols), piece in zip(grids, pieces[1:], strict=True):
            out += [self.image_text(rows, cols), piece]
        return "".join(out)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of already expanded ``text``; BOS first when the tokenizer adds one."""
        ids = self.tokenizer.pieces(text)
        bos = self.tokenizer.bos_id
        return ([bos] if add_special_tokens and bos is not None else []) + ids

    # --- batches ---------------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None, *,
                 padding_side: str = "left", add_special_tokens: bool = True
                 ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (+ ``pixel_values``, ``pixel_attention_mask``) for
        prompts already rendered. ``images``: all images of all texts in order of their
        placeholders, or one list per text. Rows are padded on ``padding_side``."""
        check_padding_side(padding_side)
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._split_images(texts, list(images or []))
        batch: dict[str, Any] = {}
        grids: list[list[tuple[int, int]]] = [[] for _ in texts]
        if any(per_text):
            batch = self.image_processor(per_text)
            grids = [list(zip(r, k, strict=True)) for r, k in zip(batch.pop("rows"),
                                                                  batch.pop("cols"), strict=True)]
        rows = [self.encode(self.expand(t, g), add_special_tokens=add_special_tokens)
                for t, g in zip(texts, grids, strict=True)]
        input_ids, mask = pad_rows(rows, self.tokenizer.pad_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": mask, **batch}

    def _split_images(self, texts: list[str], images: list[Any]) -> list[list[Any]]:
        counts = [t.count(self.config.image_token) for t in texts]
        if images and all(isinstance(i, (list, tuple)) for i in images):
            nested = [list(i) for i in images]
        else:
            if len(images) != sum(counts):
                raise ValueError(f"the texts hold {sum(counts)} {self.config.image_token} "
                                 f"placeholder(s) but {len(images)} image(s) were given")
            starts = np.cumsum([0, *counts]).tolist()
            nested = [images[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        if [len(n) for n in nested] != counts:
            raise ValueError(f"the texts hold {counts} {self.config.image_token} placeholder(s) "
                             f"but {[len(n) for n in nested]} image(s) were given for them")
        return nested

    def apply_chat_template(self, conversations: Messages | Sequence[Messages], *,
                            add_generation_prompt: bool = True, padding_side: str = "left",
                            **variables: Any) -> dict[str, torch.Tensor]:
        """Render one conversation (or a list of them) and process it with the images of its
        ``{"type": "image", "image": <path, bytes, PIL image or array>}`` parts (``path`` and
        ``url`` keys are read too). As the reference, no BOS is added when the rendered prompt
        already starts with it."""
        texts, images = [], []
        for messages in conversation_list(conversations):
            texts.append(self.render(messages, add_generation_prompt=add_generation_prompt,
                                     **variables))
            images.append(image_sources(messages, keys=("image", "path", "url")))
        starts_with_bos = bool(self.bos_token) and texts[0].startswith(self.bos_token)
        return self(texts, images, padding_side=padding_side,
                    add_special_tokens=not starts_with_bos)
