"""What running a VLM needs, whatever its family: the one path that chat, captions, the server
and evaluation take for LLaVA-style VLMs, Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision and
Idefics3 / SmolVLM alike.

    processor = chat_processor(model)                # the family's ChatProcessor
    batch = processor.prompt([messages], [image])    # messages + images → input_ids, pixels...
    out = model.generate(**batch, max_new_tokens=32, eos_token_id=eos)   # batched, greedy
    extra = generation_inputs(model, batch)          # or, to stream one reply: images → embeds
    TextStream(model.lm, model.lm.tokenizer, batch["input_ids"], **extra, eos_token_id=eos)

Each family implements two small interfaces:

- :class:`ChatProcessor` (``imagefm.vlm_processor``, ``qwen_vl_processor``,
  ``onevision_processor``, ``idefics3_processor``): ``prompt(conversations, images)`` renders
  conversations with the model's chat template and expands each image into the family's
  placeholder tokens (a string content marks an image with ``image_marker``, ``<image>``);
  left-padded, for generation. The last three share their base class and common steps
  (:mod:`imagefm.vlm_processing`).
- :class:`ChatVLM` (``models/vlm.py``, ``qwen_vl.py``, ``llava_onevision.py``, ``idefics3.py``):
  ``generation_inputs(**batch)`` runs the vision tower once and gives what the decoder's
  generation loop needs besides the ids (``inputs_embeds``; Qwen-VL's M-RoPE ``position_ids`` and
  ``rope_deltas`` too); ``lm`` is that decoder and carries the tokenizer and the chat template.

So what ends a reply (:func:`imagefm.chat.chat_stops` of ``model.lm``: EOS ids and the template's
end-of-turn marker) and how a streamed reply is decoded (``model.lm.tokenizer``, never half a
UTF-8 character: :class:`~imagefm.models.generation.TextStream`) are the same in every family.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Messages = Sequence[dict[str, Any]]

# A model's ``architecture`` → its processor class (imported when first needed).
PROCESSORS = {
    "vlm": "imagefm.vlm_processor:VLMProcessor",
    "qwen2_vl": "imagefm.qwen_vl_processor:QwenVLProcessor",
    "llava_onevision": "imagefm.onevision_processor:OneVisionProcessor",
    "idefics3": "imagefm.idefics3_processor:Idefics3Processor",
}


@runtime_checkable
class ChatProcessor(Protocol):
    """Conversations + images → the model's inputs, for one VLM family."""

    image_marker: str  # what stands for an image in string content ("<image>")
    tokenizer: Any

    def prompt(self, conversations: Sequence[Messages], images: Sequence[Any] = ()
               ) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` of the conversations rendered for
        generation, plus the image tensors the model takes; ``images`` are those of all the
        conversations, in order. One image per conversation and no marker: each goes first in
        its conversation's first user turn."""
        ...


@runtime_checkable
class ChatVLM(Protocol):
    """A VLM's model: ``generate(**batch)`` and, for streaming, ``generation_inputs``."""

    architecture: str
    lm: Any  # the DecoderLM that generates: tokenizer, chat template, EOS ids
    vision: torch.nn.Module

    def generation_inputs(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          **image_inputs: Any) -> dict[str, Any]:
        """What :func:`~imagefm.models.generation.generate_tokens` needs besides the ids, with
        ``self.lm``; takes everything :meth:`ChatProcessor.prompt` returns."""
        ...

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


def is_vlm(model: Any) -> bool:
    """True for a model of one of the VLM families."""
    return getattr(model, "architecture", None) in PROCESSORS


def chat_processor(model: Any) -> ChatProcessor:
    """The processor of ``model``'s family, built from the model (its config, tokenizer and
    chat template): what ``imagefm.load_processor`` reads from the model's directory."""
    spec = PROCESSORS.get(getattr(model, "architecture", None) or "")
    if spec is None:
        raise TypeError(f"a {type(model).__name__} is not a vision-language model (known: "
                        f"{', '.join(PROCESSORS)})")
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name).for_model(model)


def to_model(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` on the model's device, its float tensors (pixels) in the vision tower's dtype."""
    lm = model.lm
    device = lm.embed_tokens.weight.device
    dtype = next(model.vision.parameters()).dtype
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def generation_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The model's :meth:`ChatVLM.generation_inputs` of a processor batch (moved with
    :func:`to_model`), the vision tower run once without autograd."""
    batch = to_model(model, batch)
    with torch.inference_mode():
        return model.generation_inputs(**batch)


def decode_replies(model: Any, new_ids: torch.Tensor, eos_ids: Sequence[int],
                   stop_strings: Sequence[str] = ()) -> list[str]:
    """Each row of generated ids [B, N] as reply text: cut at its first end token, decoded
    with the LM's tokenizer, cut at the first stop string, stripped."""
    tokenizer, ends = model.lm.tokenizer, set(eos_ids)
    texts = []
    for row in new_ids.tolist():
        end = next((i for i, token in enumerate(row) if token in ends), len(row))
        text = tokenizer.decode(row[:end])
        for stop in stop_strings:
            text = text.split(stop)[0]
        texts.append(text.strip())
    return texts
