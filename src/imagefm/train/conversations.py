"""``data.source = conversations``: fine-tune a VLM on your own conversation files.

    data:
      source: conversations
      path: chats.jsonl              # LLaVA and/or OpenAI format (imagefm.data.conversations)
      batch_size: 8
      options: {images: photos/, length_group: 16}

Every VLM family trains from the same files; a :class:`Codec` per family knows the rest:

- ``vlm`` (LLaVA-style), ``qwen2_vl`` (Qwen2-VL / Qwen2.5-VL), ``llava_onevision``, ``idefics3``
  (SmolVLM): how an image expands into placeholder tokens (a fixed count; the grid of its native
  resolution; AnyRes tiles; tiles + a global view) and which pixel tensors the model takes
  (``pixel_values`` [images, 3, S, S]; patches of all images concatenated + ``image_grid_thw``;
  tiles per image + ``image_sizes`` + ``batch_num_images``; tiles per conversation +
  ``pixel_attention_mask``).
- Labels are placed while the conversation is built (:func:`imagefm.chat.reply_segments`): the
  model's chat template renders it turn by turn, and only the assistant's replies (and their
  end-of-turn marker) get labels; prompts, system text, markup and image tokens get -100.

Before training, every conversation is scanned once: its images are decoded (a missing or
corrupt image skips the conversation and is counted), it is tokenised, and one too long for the
context is skipped and counted; the summary is printed. A malformed file stops the run before it
starts, with a one-line message naming the line.

Batches are **length-grouped**, not packed: each epoch is shuffled by (seed, epoch), cut into
groups of ``length_group`` batches whose conversations are sorted by token count, and the batches
are shuffled again, so rows of a batch have similar lengths (little padding) while every batch
is still a random draw. Packing several conversations into one row would need attention that
stops at their borders and positions (M-RoPE for Qwen2-VL) that restart in each; the decoder
takes a padding mask only, so packing without that machinery would let conversations attend to
each other. Deterministic given the epoch (exact resume); ranks take slices of each global batch.

Everything is held in memory; for more conversations than that, ``data.source =
conversation-stream`` (:mod:`imagefm.train.conversation_stream`) reads the same files, streamed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.chat import reply_segments
from imagefm.config import ConfigError
from imagefm.data.conversations import (
    Conversation,
    MissingImage,
    open_conversation_image,
    read_conversations,
)
from imagefm.data.formats import RecordError, SkipCounter
from imagefm.data.image import ImageDecodeError
from imagefm.models.decoder import IGNORE_INDEX
from imagefm.train.config import TrainConfig
from imagefm.train.data import LoaderFactory, check_options, micro_batch_size, register_data_source
from imagefm.train.distributed import DistInfo
from imagefm.vlm_processor import ConversationTooLong, Example

Size = tuple[int, int]  # (height, width) of a decoded image


class Codec:
    """What differs between VLM families when training on conversations (see the docstring).

    ``example(conversation, sizes)`` gives ``input_ids`` and ``labels`` from the images' sizes
    alone, so a conversation is measured without making its pixels; ``pixels(groups)`` makes
    the pixel tensors of a batch from its images, one list per conversation.
    """

    string_content = False  # the template wants text with placeholders, not content parts

    def __init__(self, model: Any, processor: Any) -> None:
        self.processor = processor
        self.template = processor.template
        self.image_token_id = model.config.image_token_id
        self.image_token = model.config.image_token
        self.context_length = model.config.lm.context_length
        self.pad_id = processor.tokenizer.pad_id

    # --- per family --------------------------------------------------------------------------

    def image_infos(self, sizes: Sequence[Size]) -> list[Any]:
        """What each image expands with (its grid, token count...), in order."""
        return list(sizes)

    def image_token_count(self, infos: Sequence[Any]) -> int:
        """Placeholder tokens the images of a conversation occupy in all."""
        raise NotImplementedError

    def encode(self, text: str, infos: Iterator[Any]) -> list[int]:
        """Ids of a piece of rendered text, its image placeholders expanded with ``infos``."""
        raise NotImplementedError

    def pixels(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------

    def prefix(self, rendered_start: str) -> list[int]:
        """Ids the processor puts before the rendered text (a BOS some families add)."""
        return []

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        if self.string_content:
            return conversation.text_messages(self.image_token)
        return conversation.messages

    def example(self, conversation: Conversation, sizes: Sequence[Size]) -> Example:
        """``input_ids`` and ``labels`` (replies only) of a conversation whose images have
        ``sizes``. Raises ConversationTooLong past the context, ValueError when unusable."""
        infos = self.image_infos(sizes)
        segments = reply_segments(self.template, self.messages(conversation))
        ids = self.prefix(segments[0][0] if segments else "")
        labels = [IGNORE_INDEX] * len(ids)
        pending = iter(infos)
        for text, is_reply in segments:
            piece = self.encode(text, pending)
            ids += piece
            labels += piece if is_reply else [IGNORE_INDEX] * len(piece)
        expected = self.image_token_count(infos)
        if ids.count(self.image_token_id) != expected:
            raise ValueError(f"{len(sizes)} image(s) need {expected} image tokens but the chat "
                             f"template wrote {ids.count(self.image_token_id)}")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError("the conversation has no assistant reply to learn from")
        if len(ids) > self.context_length:
            raise ConversationTooLong(f"{len(ids)} tokens exceed the context of "
                                      f"{self.context_length}")
        return Example(ids, labels, len(sizes))


class LlavaCodec(Codec):
    """LLaVA-style :class:`~imagefm.models.vlm.VLM`: each ``<image>`` is ``image_tokens`` ids."""

    string_content = True

    def image_token_count(self, infos: Sequence[Any]) -> int:
        return len(infos) * self.processor.image_tokens

    def encode(self, text: str, infos: Iterator[Any]) -> list[int]:
        return self.processor.encode(text)

    def pixels(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.processor.images([i for g in groups for i in g])}


class QwenVLCodec(Codec):
    """Qwen2-VL / Qwen2.5-VL: each image keeps its resolution; t*h*w/merge² pad tokens."""

    def image_infos(self, sizes: Sequence[Size]) -> list[Any]:
        patch = self.processor.image_processor.patch
        grids = []
        for height, width in sizes:
            h, w = self.processor.image_processor.target_size(height, width)
            grids.append((1, h // patch, w // patch))
        return grids

    def image_token_count(self, infos: Sequence[Any]) -> int:
        return sum(self.processor.config.image_tokens(grid) for grid in infos)

    def encode(self, text: str, infos: Iterator[Any]) -> list[int]:
        return self.processor.encode(text, infos)

    def pixels(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        return self.processor.image_processor([i for g in groups for i in g])


class OneVisionCodec(Codec):
    """LLaVA-OneVision: an image alone in its conversation is tiled (AnyRes), one among several
    is one square patch."""

    def image_infos(self, sizes: Sequence[Size]) -> list[Any]:
        from imagefm.models.llava_onevision import image_token_count

        config = self.processor.config
        return [image_token_count(h, w, config, tiled=len(sizes) == 1) for h, w in sizes]

    def image_token_count(self, infos: Sequence[Any]) -> int:
        return sum(infos)

    def encode(self, text: str, infos: Iterator[Any]) -> list[int]:
        return self.processor.encode(text, infos)

    def pixels(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        return self.processor.image_processor([g for g in groups if g])


class Idefics3Codec(Codec):
    """Idefics3 / SmolVLM: an image is rows x cols tiles plus a global view, ``image_seq_len``
    tokens each; the tokenizer's BOS comes first when the template does not write it."""

    def image_infos(self, sizes: Sequence[Size]) -> list[Any]:
        from imagefm.idefics3_processor import longest_edge_size, tiled_size

        c = self.processor.config.image
        grids = []
        for height, width in sizes:  # the geometry of Idefics3ImageProcessor.tiles
            if c.resize:
                height, width = longest_edge_size(height, width, c.longest_edge)
            if c.split:
                height, width = tiled_size(height, width, c.tile_size)
            fits = height <= c.tile_size and width <= c.tile_size
            grids.append((0, 0) if not c.split or fits
                         else (height // c.tile_size, width // c.tile_size))
        return grids

    def image_token_count(self, infos: Sequence[Any]) -> int:
        return sum((r * k + 1) * self.processor.image_seq_len for r, k in infos)

    def prefix(self, rendered_start: str) -> list[int]:
        bos, text = self.processor.tokenizer.bos_id, self.processor.bos_token
        return [bos] if bos is not None and not (text and rendered_start.startswith(text)) else []

    def encode(self, text: str, infos: Iterator[Any]) -> list[int]:
        grids = [next(infos) for _ in range(text.count(self.image_token))]
        return self.processor.tokenizer.pieces(self.processor.expand(text, grids))

    def pixels(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.image_processor(groups)
        return {k: v for k, v in batch.items() if k not in ("rows", "cols")}


def codec_for(model: nn.Module, source: str = "conversations") -> Codec:
    """The codec of ``model``'s family (its ``architecture``), with the model's processor
    (``source``: the data source that asks, for the message when the model is no VLM)."""
    architecture = getattr(model, "architecture", None)
    if architecture == "vlm":
        from imagefm.vlm_processor import VLMProcessor

        return LlavaCodec(model, VLMProcessor.for_model(model))
    if architecture == "qwen2_vl":
        from imagefm.qwen_vl_processor import QwenVLProcessor

        return QwenVLCodec(model, QwenVLProcessor.for_model(model))
    if architecture == "llava_onevision":
        from imagefm.onevision_processor import OneVisionProcessor

        return OneVisionCodec(model, OneVisionProcessor.for_model(model))
    if architecture == "idefics3":
        from imagefm.idefics3_processor import Idefics3Processor

        return Idefics3Codec(model, Idefics3Processor.for_model(model))
    raise ConfigError(f"data.source = {source} trains a VLM (LLaVA-style, Qwen2-VL, "
                      f"LLaVA-OneVision, Idefics3); model.init holds a {type(model).__name__}")


def collate(codec: Codec, rows: Sequence[tuple[Example, list[Any]]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` + the family's pixel tensors."""
    length = max(len(e.input_ids) for e, _ in rows)
    input_ids = torch.full((len(rows), length), codec.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (example, _) in enumerate(rows):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    groups = [images for _, images in rows]
    if any(groups):
        batch.update(codec.pixels(groups))
    return batch


def load_images(conversation: Conversation) -> list[Any]:
    return [open_conversation_image(source) for source in conversation.images]


def _skip_reason(err: Exception) -> str:
    if isinstance(err, MissingImage):
        return "missing image"
    if isinstance(err, ImageDecodeError):
        return "corrupt image"
    return "too long" if isinstance(err, ConversationTooLong) else "unusable"


def conversation_example(codec: Codec, conversation: Conversation,
                         images: list[Any] | None = None) -> tuple[Example, list[Any]]:
    """The tokenised example of ``conversation`` and its decoded images (``images`` when given,
    else loaded from its sources): a row for :func:`collate`. Raises ``RecordError`` (reason
    ``missing image``, ``corrupt image``, ``too long`` or ``unusable``) when it cannot train."""
    try:
        if images is None:
            images = load_images(conversation)
        example = codec.example(conversation, [(i.height, i.width) for i in images])
    except (MissingImage, ImageDecodeError, ValueError) as err:
        raise RecordError(_skip_reason(err), f"{conversation.where}: {err}") from None
    return example, images


class ConversationBatches:
    """Length-grouped batches of tokenised conversations (see the module docstring)."""

    def __init__(self, codec: Codec, conversations: Sequence[Conversation], *, batch_size: int,
                 length_group: int = 16, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if length_group < 1:
            raise ConfigError(f"data.options.length_group must be >= 1 (1: no length grouping), "
                              f"got {length_group}")
        self.codec, self.batch_size, self.length_group = codec, batch_size, length_group
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skips = SkipCounter()
        self.items: list[Conversation] = []
        self.lengths: list[int] = []
        for conversation in conversations:  # the scan: decode, tokenise, measure
            try:
                example, _ = conversation_example(codec, conversation)
            except RecordError as err:
                self.skips.add(err.reason, str(err))
                continue
            self.skips.ok()
            self.items.append(conversation)
            self.lengths.append(len(example.input_ids))
        if len(self.items) < batch_size:
            raise ConfigError(f"the conversations give {len(self.items)} usable, fewer than one "
                              f"batch of {batch_size}; {self.skips.report()}")

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches as lists of conversation indices."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.items)).tolist()
        span = self.batch_size * self.length_group
        if self.length_group > 1:  # longest first within each group (a stable sort)
            order = [i for start in range(0, len(order), span)
                     for i in sorted(order[start:start + span], key=lambda i: -self.lengths[i])]
        batches = [order[i:i + self.batch_size]
                   for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches)).tolist()]

    def __call__(self, epoch: int) -> Iterator[dict]:
        local = self.batch_size // self.world_size
        for batch in self.plan(epoch):
            rows = []
            for index in batch[self.rank * local:(self.rank + 1) * local]:
                try:
                    rows.append(conversation_example(self.codec, self.items[index]))
                except RecordError as err:
                    # Readable at the scan, not now (the file changed): counted, and replaced
                    # below by a repeat so every rank keeps its share of the batch.
                    self.skips.add(err.reason, str(err))
            if not rows:
                continue
            rows += [rows[i % len(rows)] for i in range(local - len(rows))]
            yield collate(self.codec, rows)


OPTIONS = ("images", "paths", "length_group", "seed")


def conversations_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source = conversations``: the files of ``data.path`` (+ ``options.paths``),
    images relative to ``options.images`` (default: each file's folder)."""
    options = dict(config.data.options)
    check_options("conversations", options, OPTIONS)
    paths = ([config.data.path] if config.data.path else []) + list(options.pop("paths", []))
    if not paths:
        raise ConfigError("data.source = conversations needs data.path (a .json or .jsonl "
                          "conversation file)")
    micro_rows = micro_batch_size(config, info) * info.world_size  # all ranks
    images = options.pop("images", None)
    conversations: list[Conversation] = []
    for path in paths:
        try:
            conversations += read_conversations(path, images)
        except FileNotFoundError:
            raise ConfigError(f"data.path: no conversation file {path}") from None
    options.setdefault("seed", config.run.seed)
    batches = ConversationBatches(codec_for(model), conversations,
                                  batch_size=micro_rows, rank=info.rank,
                                  world_size=info.world_size, **options)
    if info.is_main:
        print(f"conversations: {len(batches.items)} to train on; {batches.skips.report()}")
    return batches


register_data_source("conversations", conversations_source)
