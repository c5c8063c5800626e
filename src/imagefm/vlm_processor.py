"""The VLM processor: conversations + images → ``input_ids``, ``labels``, ``pixel_values``.

Two rules from the design notes live here:

- **Image tokens by contract.** Each ``<image>`` in the text becomes exactly ``image_tokens``
  copies of the image placeholder id; the model fills them and checks the count. A model with
  an audio tower (:mod:`imagefm.models.audio_input`) takes spoken clips the same way: each
  ``<audio>`` becomes ``audio.tokens`` placeholder ids and ``audios`` become log-mel
  ``input_features`` (every clip padded or cut to the model's ``audio.seconds``).
- **Labels while building.** A conversation is rendered turn by turn with the model's chat
  template: the text an assistant turn adds (its words and the end-of-turn marker) gets labels,
  everything else (system, user turns, image tokens, the template's own markup) gets
  ``IGNORE_INDEX``. Nothing is reconstructed afterwards by searching the token ids.

    proc = VLMProcessor.for_model(vlm)
    batch = proc.prompt([[{"role": "user", "content": "<image>\\nWhat colour is it?"}]], [img])
    out = vlm.generate(**batch, max_new_tokens=16)
    example = proc.training_example(messages, image)      # input_ids + labels (lists)
    batch = proc.collate([example, ...])                  # right-padded tensors for training
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagefm.chat import ChatTemplate, content_text, normalize_messages, reply_segments
from imagefm.config import ImageCard
from imagefm.models.decoder import IGNORE_INDEX
from imagefm.vlm_processing import pad_rows

Messages = Sequence[dict[str, Any]]


class ConversationTooLong(ValueError):
    """A training conversation does not fit the model's context (skip it and count it)."""


@dataclass
class Example:
    """One tokenised training conversation (lists, not yet padded)."""

    input_ids: list[int]
    labels: list[int]
    images: int  # how many images it holds


class VLMProcessor:
    """Tokenizer + chat template + image processor for one VLM (see the module docstring)."""

    def __init__(self, card: ImageCard, tokenizer: Any, template: ChatTemplate, *,
                 image_token: str, image_token_id: int, image_tokens: int,
                 context_length: int, pad_id: int = 0, audio: Any = None) -> None:
        from imagefm.data.image import ImageProcessor

        if tokenizer is None:
            raise ValueError("a VLM processor needs the model's tokenizer")
        if tokenizer.token_to_id(image_token) != image_token_id:
            raise ValueError(f"the tokenizer maps {image_token!r} to "
                             f"{tokenizer.token_to_id(image_token)}, the model expects "
                             f"{image_token_id}: add it with tokenizer.add_tokens first")
        self.card = card
        self.image_processor = ImageProcessor(card)
        self.tokenizer = tokenizer
        self.template = template
        self.image_token, self.image_token_id = image_token, image_token_id
        self.image_tokens = image_tokens
        self.context_length = context_length
        self.pad_id = pad_id
        self.audio = audio  # the model's AudioInputConfig, None without an audio tower
        if audio is not None and tokenizer.token_to_id(audio.token) != audio.token_id:
            raise ValueError(f"the tokenizer maps {audio.token!r} to "
                             f"{tokenizer.token_to_id(audio.token)}, the model expects "
                             f"{audio.token_id}")

    @property
    def takes_audio(self) -> bool:
        return self.audio is not None

    @property
    def audio_marker(self) -> str | None:
        """What stands for a spoken clip in string content (None: the model takes no audio)."""
        return self.audio.token if self.audio is not None else None

    @property
    def image_marker(self) -> str:
        """What stands for an image in string content: the image token itself."""
        return self.image_token

    @classmethod
    def for_model(cls, model: Any) -> VLMProcessor:
        return cls.from_parts(model.config, model.card, model.tokenizer, model.chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VLMProcessor:
        """The processor of an imagefm VLM directory, without loading weights (other formats:
        ``imagefm.load_processor``, which detects the format)."""
        from imagefm.checkpoint import CHAT_TEMPLATE_FILE, read_meta
        from imagefm.config import from_dict
        from imagefm.models.vlm import VLMConfig
        from imagefm.tokenizer import Tokenizer

        path = Path(path)
        meta = read_meta(path)
        config = VLMConfig.from_dict(meta["config"])
        card = from_dict(ImageCard, meta["preprocess"], "preprocess")
        tokenizer = Tokenizer.from_pretrained(path)
        template_file = path / CHAT_TEMPLATE_FILE
        source = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls.from_parts(config, card, tokenizer, source)

    @classmethod
    def from_parts(cls, config: Any, card: ImageCard, tokenizer: Any,
                   chat_template: str | None) -> VLMProcessor:
        def text(index: int | None) -> str:
            return (tokenizer.id_to_token(index) or "") if index is not None else ""

        lm = config.lm
        template = ChatTemplate(chat_template, text(lm.bos_token_id),
                                text(lm.eos_token_ids[0] if lm.eos_token_ids else None),
                                config.image_token)
        return cls(card, tokenizer, template, image_token=config.image_token,
                   image_token_id=config.image_token_id, image_tokens=config.image_tokens,
                   context_length=lm.context_length,
                   pad_id=0 if lm.pad_token_id is None else lm.pad_token_id,
                   audio=getattr(config, "audio", None))

    # --- text → ids ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS added: templates write their own) with every image
        placeholder expanded to ``image_tokens`` ids (and every audio one to ``audio.tokens``)."""
        counts = {self.image_token_id: self.image_tokens}
        if self.audio is not None:
            counts[self.audio.token_id] = self.audio.tokens
        ids: list[int] = []
        for index in self.tokenizer.pieces(text):
            ids.extend([index] * counts.get(index, 1))
        return ids

    def render(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def count_images(self, messages: Messages) -> int:
        return sum(content_text(m["content"], self.image_token).count(self.image_token)
                   for m in normalize_messages(messages))

    def training_example(self, messages: Messages) -> Example:
        """``input_ids`` and ``labels`` of a whole conversation, labels on assistant turns only.

        Raises :class:`ConversationTooLong` when it exceeds the context (image tokens are never
        cut in half: the conversation is refused instead).
        """
        messages = normalize_messages(messages)
        ids: list[int] = []
        labels: list[int] = []
        for text, is_reply in reply_segments(self.template, messages):
            piece = self.encode(text)
            ids += piece
            labels += piece if is_reply else [IGNORE_INDEX] * len(piece)
        if not any(label != IGNORE_INDEX for label in labels):
            raise ValueError("the conversation has no assistant turn to learn from")
        if len(ids) > self.context_length:
            raise ConversationTooLong(f"{len(ids)} tokens exceed the context of "
                                      f"{self.context_length}")
        return Example(ids, labels, self.count_images(messages))

    # --- batches ---------------------------------------------------------------------------------

    def images(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor(list(images))

    def audio_features(self, clips: Sequence[Any]) -> torch.Tensor:
        """Log-mel ``input_features`` [clips, n_mels, frames] of waveforms (float arrays at the
        model's sampling rate) or audio files / their bytes (decoded and resampled), each
        padded or cut to ``audio.seconds``."""
        from imagefm.data.audio import load_audio
        from imagefm.models.audio_features import log_mel

        if self.audio is None:
            raise ValueError("this model has no audio tower: it takes no audio")
        rate = self.audio.sampling_rate
        waves = [clip if isinstance(clip, np.ndarray) else
                 load_audio(clip, rate, max_seconds=self.audio.seconds) for clip in clips]
        features, _ = log_mel([np.asarray(w, dtype=np.float32) for w in waves], self.audio.mel)
        return features

    def collate(self, examples: Sequence[Example], images: Sequence[Any] | None = None,
                audios: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (+ ``pixel_values``,
        + ``input_features`` of ``audios``)."""
        length = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if images:
            batch["pixel_values"] = self.images(images)
        if audios:
            batch["input_features"] = self.audio_features(audios)
        return batch

    def prompt(self, conversations: Sequence[Messages], images: Sequence[Any] = (),
               audios: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
        """Left-padded generation prompts (the template's assistant opening appended).

        ``images`` are all the images of all conversations, in order of their placeholders.
        A conversation without a placeholder in its first user turn gets one prepended when
        exactly one image per conversation is given. Content parts become text as in training
        (:meth:`imagefm.data.conversations.Conversation.text_messages`): an image part is the
        image token, followed by a newline when text comes after it. ``audios`` (a model with
        an audio tower) are the spoken clips of all conversations in order of their ``<audio>``
        placeholders (or ``{"type": "audio"}`` / ``input_audio`` parts).
        """
        rows = []
        conversations = [[{**m, "content": self._text(m["content"])}
                          for m in normalize_messages(messages)] for messages in conversations]
        add_images = len(images) == len(conversations) and all(
            self.count_images(c) == 0 for c in conversations)
        for messages in conversations:
            if add_images:
                first = next(i for i, m in enumerate(messages) if m["role"] == "user")
                text = content_text(messages[first]["content"], self.image_token)
                messages[first]["content"] = f"{self.image_token}\n{text}"
            rows.append(self.encode(self.render(messages)))
        placeholders = sum(row.count(self.image_token_id) for row in rows) // self.image_tokens
        if placeholders != len(images):
            raise ValueError(f"the conversations hold {placeholders} image placeholder(s) "
                             f"but {len(images)} image(s) were given")
        clips = (sum(row.count(self.audio.token_id) for row in rows) // self.audio.tokens
                 if self.audio is not None else 0)
        if clips != len(audios):
            raise ValueError(f"the conversations hold {clips} audio placeholder(s) but "
                             f"{len(audios)} clip(s) were given")
        input_ids, mask = pad_rows(rows, self.pad_id, "left")
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            batch["pixel_values"] = self.images(images)
        if audios:
            batch["input_features"] = self.audio_features(audios)
        return batch

    def _text(self, content: str | list[dict[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        pieces = []
        for index, part in enumerate(content):
            following = content[index + 1:index + 2]
            # "<image>\nquestion", "<image>\n<audio>": the layouts training uses.
            newline = "\n" if following and following[0]["type"] in (
                "text", "audio", "input_audio") else ""
            if part["type"] in ("image", "image_url"):
                pieces.append(self.image_token + newline)
            elif part["type"] in ("audio", "input_audio") and self.audio is not None:
                pieces.append(self.audio.token + newline)
            else:
                pieces.append(content_text([part], self.image_token))
        return "".join(pieces)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids)
