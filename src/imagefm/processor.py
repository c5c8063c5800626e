"""The processor: one object that turns images and texts into model inputs, per the model's card."""

from __future__ import annotations

from typing import Any

import torch

from imagefm.config import ImageCard


class Processor:
    """Images → ``pixel_values`` (model card preprocessing); texts → ``input_ids`` + mask.

    A NaFlex card (SigLIP 2, ``resize_mode = "naflex"``) gives ``pixel_values`` as patches
    with ``pixel_attention_mask`` and ``spatial_shapes`` (imagefm.data.naflex).
    """

    def __init__(self, card: ImageCard, tokenizer: Any | None = None) -> None:
        from imagefm.data.image import ImageProcessor
        from imagefm.data.naflex import NaFlexImageProcessor

        self.card = card
        self.image_processor: Any = (NaFlexImageProcessor(card) if card.resize_mode == "naflex"
                                     else ImageProcessor(card))
        self.tokenizer = tokenizer

    def __call__(self, images: Any = None, texts: str | list[str] | None = None
                 ) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            pixels = self.image_processor(images)
            batch.update(pixels if isinstance(pixels, dict) else {"pixel_values": pixels})
        if texts is not None:
            if self.tokenizer is None:
                raise ValueError("this processor has no tokenizer; load one with the model "
                                 "checkpoint or pass tokenizer=")
            batch.update(self.tokenizer(texts))
        return batch

    @classmethod
    def for_model(cls, model: Any) -> Processor:
        return cls(model.card, getattr(model, "tokenizer", None))
