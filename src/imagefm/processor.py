"""The processor: one object that turns images and texts into model inputs, per the model's card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagefm.config import ImageCard


class Processor:
    """Images → ``pixel_values`` (model card preprocessing); texts → ``input_ids`` + mask."""

    def __init__(self, card: ImageCard, tokenizer: Any | None = None) -> None:
        from imagefm.data.image import ImageProcessor

        self.card = card
        self.image_processor = ImageProcessor(card)
        self.tokenizer = tokenizer

    def __call__(self, images: Any = None, texts: str | list[str] | None = None
                 ) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            batch["pixel_values"] = self.image_processor(images)
        if texts is not None:
            if self.tokenizer is None:
                raise ValueError("this processor has no tokenizer; load one with the model "
                                 "checkpoint or pass tokenizer=")
            batch.update(self.tokenizer(texts))
        return batch

    @classmethod
    def for_model(cls, model: Any) -> Processor:
        return cls(model.card, getattr(model, "tokenizer", None))


def load_processor(path: str | Path, **kwargs: Any) -> Processor:
    """The processor of the checkpoint at ``path`` (any format ``imagefm.load`` reads): a
    :class:`Processor` for dual encoders, a :class:`imagefm.vlm_processor.VLMProcessor` for VLMs."""
    from imagefm.checkpoint import detect_format, read_meta

    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("imagefm", "hf_llava") and _is_vlm(path, fmt):
        from imagefm.vlm_processor import VLMProcessor

        return VLMProcessor.from_pretrained(path)
    if fmt == "imagefm":
        from imagefm.config import from_dict

        meta = read_meta(path)
        card = from_dict(ImageCard, meta["preprocess"], "preprocess")
        tokenizer = None
        if meta.get("tokenizer") is not None:
            from imagefm.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        return Processor(card, tokenizer)
    if fmt == "hf":
        from imagefm.convert.hf import load_hf_processor

        return load_hf_processor(path)
    from imagefm.convert.open_clip import load_open_clip_processor

    return load_open_clip_processor(path, **kwargs)




def _is_vlm(path: Path, fmt: str) -> bool:
    from imagefm.checkpoint import read_meta

    return fmt == "hf_llava" or read_meta(path).get("architecture") == "vlm"
