"""What every VLM family shares around its decoder: the LLaVA-style
:class:`~imagefm.models.vlm.VLM`, :class:`~imagefm.models.qwen_vl.QwenVL` (Qwen2-VL / Qwen2.5-VL),
:class:`~imagefm.models.llava_onevision.LlavaOneVision` and
:class:`~imagefm.models.idefics3.Idefics3` (SmolVLM).

A family supplies ``vision`` (its tower), ``lm`` (the :class:`~imagefm.models.decoder.DecoderLM`
that generates) and ``generation_inputs``: its processor's outputs → what the decoder's
generation loop needs besides the ids (``inputs_embeds`` with the images spliced in; Qwen-VL's
M-RoPE ``position_ids`` and ``rope_deltas`` too). Generation with the KV cache, the tokenizer and
chat template (kept on ``lm``, so every LM utility works on ``vlm.lm``) and a few conveniences
are then the same for all: the model side of :mod:`imagefm.vlm_runtime`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.checkpoint import save_model
from imagefm.models.decoder import DecoderLM, KVCache


class VLMBase(nn.Module):
    """The shared part of the VLM families (see the module docstring)."""

    architecture: str  # the name imagefm.json records
    lm: DecoderLM
    vision: nn.Module

    # --- what travels with the checkpoint --------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.lm.tokenizer = tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.lm.chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self.lm.chat_template = source

    # --- generation ------------------------------------------------------------------------------

    def generation_inputs(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          **image_inputs: Any) -> dict[str, Any]:
        """What the LM's generation loop needs besides the ids, from the processor's outputs
        (every key it returns is taken). Pass them on to
        :func:`~imagefm.models.generation.generate_tokens` or ``TextStream`` with ``self.lm``."""
        raise NotImplementedError

    @torch.no_grad()
    def generate_with(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      image_inputs: dict[str, Any], **options: Any) -> torch.Tensor:
        """Continue the prompts with the KV cache: :meth:`generation_inputs`, then the LM's
        generation loop; [B, L + new] ids, prompt included. ``options`` are those of
        :func:`imagefm.models.generation.generate_tokens`."""
        from imagefm.models.generation import generate

        prompt = self.generation_inputs(input_ids, attention_mask=attention_mask, **image_inputs)
        return generate(self.lm, input_ids, attention_mask, **prompt, **options)

    # --- conveniences ----------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int, **kwargs: Any) -> KVCache:
        return self.lm.new_cache(batch, capacity, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed_tokens

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write an imagefm checkpoint (weights, config, tokenizer, chat template, and what the
        family adds: a preprocessing card, quantisation counts)."""
        return save_model(self, directory)
