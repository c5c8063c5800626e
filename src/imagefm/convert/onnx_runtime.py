"""Exported ONNX graphs run by onnxruntime, behind the methods of a :class:`DualEncoder` that
imagefm's apps and evaluation call (``encode_image``, ``encode_text``, ``logit_scale``,
``logit_bias``, ``card``, ``tokenizer``, ``config.model_type``).

    model = OnnxDualEncoder("export/")              # or int8=True for the *.int8.onnx graphs
    run_suite(model, model.processor(), "colour")   # the same evaluation as the torch model

So evaluation measures the exported files themselves, e.g. what int8 costs
(:mod:`imagefm.eval.onnx_int8`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from imagefm.checkpoint import CheckpointError
from imagefm.config import ImageCard
from imagefm.convert.onnx_export import CARD_FILE, CARD_FORMAT


def read_card(directory: str | Path) -> dict[str, Any]:
    """The ``preprocess.json`` of an export directory."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not an imagefm ONNX export directory")
    card = json.loads(path.read_text(encoding="utf-8"))
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: format {card.get('format')!r} is not {CARD_FORMAT!r}")
    return card


def image_card(card: dict[str, Any]) -> ImageCard:
    """The :class:`ImageCard` that ``preprocess.json``'s image section describes."""
    image = card["image"]
    return ImageCard(image_size=image["size"], resize_mode=image["resize"]["mode"],
                     interpolation=image["resize"]["interpolation"], mean=tuple(image["mean"]),
                     std=tuple(image["std"]))


class OnnxDualEncoder:
    """The two graphs of an export directory as a dual encoder (inference only, CPU by default).

    ``int8=True`` runs the ``*.int8.onnx`` graphs. ``providers`` are onnxruntime execution
    providers (default: the CPU one); ``threads`` caps onnxruntime's intra-op threads.
    """

    def __init__(self, directory: str | Path, *, int8: bool = False,
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.meta = read_card(self.directory)
        key = "int8_file" if int8 else "file"
        graphs = self.meta["graphs"]
        if key not in graphs["image"]:
            raise CheckpointError(f"{self.directory} has no int8 graphs: export with int8=")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(self.directory / graphs["image"][key]),
                                                  options, providers=providers)
        self.text_session = ort.InferenceSession(str(self.directory / graphs["text"][key]),
                                                 options, providers=providers)
        self.int8 = int8
        self.card = image_card(self.meta)
        self.config = SimpleNamespace(model_type=self.meta["model_type"])
        logits = self.meta["logits"]
        self.logit_scale = torch.tensor(logits["log_logit_scale"])
        self.logit_bias = (torch.tensor(logits["logit_bias"])
                           if logits["logit_bias"] is not None else None)
        self.tokenizer = None
        if self.meta["text"].get("tokenizer"):
            from imagefm.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_pretrained(self.directory)

    def processor(self) -> Any:
        """The :class:`imagefm.processor.Processor` of this export (its card and tokenizer)."""
        from imagefm.processor import Processor

        return Processor(self.card, self.tokenizer)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] (not normalised), as ``DualEncoder.encode_image``."""
        pixels = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        return torch.from_numpy(self.image_session.run(None, {"pixel_values": pixels})[0])

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings [B, D] (not normalised), as ``DualEncoder.encode_text``; a missing
        ``attention_mask`` means every token is real."""
        ids = input_ids.detach().cpu().long().numpy()
        mask = (np.ones_like(ids) if attention_mask is None
                else attention_mask.detach().cpu().long().numpy())
        feed = {"input_ids": ids, "attention_mask": mask}
        return torch.from_numpy(self.text_session.run(None, feed)[0])

    def eval(self) -> OnnxDualEncoder:  # the apps put a model in eval mode: nothing to do here
        return self

    def __repr__(self) -> str:
        return f"OnnxDualEncoder({str(self.directory)!r}, int8={self.int8})"
