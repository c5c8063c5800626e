"""What the content-part VLM processors share (Qwen2-VL, LLaVA-OneVision, Idefics3 / SmolVLM):
their common base class and the steps that are the same in every family.

Each family's processor (``qwen_vl_processor``, ``onevision_processor``, ``idefics3_processor``)
keeps what is its own: how an image becomes pixels and how many placeholder tokens it takes.
What it takes from here:

- :class:`ContentPartsProcessor`: ``for_model``, ``from_pretrained`` (an imagefm directory),
  ``render`` (the chat template), and :meth:`~imagefm.vlm_runtime.ChatProcessor.prompt` and
  decoding for the runtime (:mod:`imagefm.vlm_runtime`);
- the constructor's checks (:func:`require_tokenizer`, :func:`check_token_id`) and the token
  texts a chat template writes (:func:`token_text`, :func:`eos_text`);
- ``apply_chat_template``'s reading of conversations (:func:`conversation_list`,
  :func:`content_parts`, :func:`image_sources`);
- a batch's pieces: :func:`open_rgb`, :func:`normalise` (the reference's float32 values by table
  look-up), placeholder expansion (:func:`expand_placeholders`, :func:`check_all_used`) and
  padding (:func:`check_padding_side`, :func:`pad_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.chat import IMAGE_TOKEN, ChatTemplate, with_image_parts
from imagefm.data.image import _array_to_pil, _rgb_array, open_image

Messages = Sequence[dict[str, Any]]


class ContentPartsProcessor:
    """Base of the processors whose ``apply_chat_template`` takes content parts with the
    pictures in them, as the reference's do; ``prompt`` puts the runtime's conversations in
    that shape first (:func:`imagefm.chat.with_image_parts`). A subclass sets ``architecture``
    (the model's, as imagefm.json records it) and ``config_class``, builds ``template`` in its
    constructor ``(config, tokenizer, chat_template)`` and implements ``apply_chat_template``."""

    image_marker = IMAGE_TOKEN
    architecture: str
    config_class: Any
    tokenizer: Any
    template: ChatTemplate

    @classmethod
    def for_model(cls, model: Any) -> Any:
        return cls(model.config, model.tokenizer, model.chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Any:
        """The processor of an imagefm directory of this family, without loading weights."""
        from imagefm.checkpoint import CHAT_TEMPLATE_FILE, CheckpointError, read_meta
        from imagefm.tokenizer import Tokenizer

        directory = Path(path)
        meta = read_meta(directory)
        if meta.get("architecture") != cls.architecture:
            raise CheckpointError(f"{directory} holds a {meta.get('architecture')!r} model, not "
                                  f"{cls.architecture!r}")
        template = directory / CHAT_TEMPLATE_FILE
        return cls(cls.config_class.from_dict(meta["config"]), Tokenizer.from_pretrained(directory),
                   template.read_text(encoding="utf-8") if template.is_file() else None)

    def render(self, messages: Messages, *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The conversation as prompt text, with the model's chat template."""
        return self.template.render(messages, add_generation_prompt=add_generation_prompt,
                                    **variables)

    def apply_chat_template(self, conversations: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prompt(self, conversations: Sequence[Messages], images: Sequence[Any] = ()
               ) -> dict[str, torch.Tensor]:
        """Left-padded generation prompts of ``conversations`` and their ``images`` in order
        (string content marks an image with ``<image>``; one image per conversation and no
        mark: it goes first in the first user turn)."""
        return self.apply_chat_template(with_image_parts(conversations, images,
                                                         marker=self.image_marker))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids)

    def batch_decode(self, rows: Any) -> list[str]:
        return [self.decode(row) for row in rows]


# --- the constructor: tokenizer checks and template tokens ---------------------------------------

def require_tokenizer(tokenizer: Any, processor: str) -> None:
    """Refuse a missing tokenizer; ``processor`` names it in the message ("a Qwen2-VL
    processor")."""
    if tokenizer is None:
        raise ValueError(f"{processor} needs the model's tokenizer")


def check_token_id(tokenizer: Any, token: str, expected: int) -> None:
    """Refuse a tokenizer that maps a placeholder ``token`` to another id than the model's."""
    found = tokenizer.token_to_id(token)
    if found != expected:
        raise ValueError(f"the tokenizer maps {token!r} to {found}, the model expects {expected}")


def token_text(tokenizer: Any, index: int | None) -> str:
    """The text of token ``index`` ("" for none): what a chat template writes for it."""
    return (tokenizer.id_to_token(index) or "") if index is not None else ""


def eos_text(tokenizer: Any, lm: Any) -> str:
    """The text of the LM's first EOS token, the chat template's ``eos_token`` ("" for none)."""
    return token_text(tokenizer, lm.eos_token_ids[0] if lm.eos_token_ids else None)


# --- conversations → their pictures --------------------------------------------------------------

def conversation_list(conversations: Messages | Sequence[Messages]) -> Sequence[Messages]:
    """One conversation (a list of messages) or a list of them, as a list of them."""
    if conversations and isinstance(conversations[0], dict):
        return [conversations]  # type: ignore[list-item]
    return conversations  # type: ignore[return-value]


def content_parts(messages: Messages, kind: str) -> list[dict[str, Any]]:
    """The ``{"type": kind, ...}`` parts of one conversation's list contents, in order."""
    return [part for message in messages
            for part in (message["content"] if isinstance(message["content"], list) else [])
            if part.get("type") == kind]


def image_sources(messages: Messages, keys: Sequence[str] = ("image",)) -> list[Any]:
    """The pictures of one conversation's image parts, in order: what each holds under the
    first of ``keys`` it has; an image part without a picture is refused."""
    sources = []
    for part in content_parts(messages, "image"):
        source = next((part[k] for k in keys if part.get(k) is not None), None)
        if source is None:
            raise ValueError("an image part needs its picture under 'image'")
        sources.append(source)
    return sources


# --- images --------------------------------------------------------------------------------------

def open_rgb(image: Any) -> Image.Image:
    """An RGB PIL image from a path, bytes, PIL image or ``uint8`` array."""
    if isinstance(image, np.ndarray):
        rgb = _rgb_array(image)
        return Image.fromarray(rgb) if rgb is not None else open_image(_array_to_pil(image))
    return open_image(image)


def normalise(table: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``uint8`` pixels [H, W, C] → ``float32`` [C, H, W] through ``table[c, value]``: one
    gather per pixel, exactly the reference's float32 values."""
    out = np.empty((len(table), *pixels.shape[:2]), dtype=np.float32)
    for channel in range(len(table)):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


# --- text: placeholders and padding --------------------------------------------------------------

def expand_placeholders(ids: Iterable[int],
                        counts: Mapping[int, tuple[Iterator[int], str, str]]) -> list[int]:
    """``ids`` with each placeholder id repeated as often as the next of its token counts says.
    ``counts``: placeholder id → (token counts of the given images or videos in order, the
    placeholder's text, what it stands for: "image"); more placeholders than counts is refused."""
    out: list[int] = []
    for index in ids:
        if index not in counts:
            out.append(index)
            continue
        source, token, what = counts[index]
        count = next(source, None)
        if count is None:
            raise ValueError(f"the text holds more {token} placeholders than {what}s were given")
        out.extend([index] * count)
    return out


def check_all_used(given: int, rest: Iterator[Any], what: str, token: str) -> None:
    """Refuse ``given`` images (or videos) of which some, ``rest``, no placeholder took."""
    left = sum(1 for _ in rest)
    if left:
        raise ValueError(f"{given} {what}(s) were given but the text holds {given - left} "
                         f"{token} placeholder(s)")


def check_padding_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids as one ``input_ids`` [B, longest] padded with ``pad_id`` on ``padding_side``
    (left for generation) and its ``attention_mask`` (1 on the ids)."""
    check_padding_side(padding_side)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), None) if padding_side == "left" else slice(len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return input_ids, mask
