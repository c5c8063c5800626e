"""Zero-shot image classification with a dual encoder (CLIP / SigLIP).

    from imagefm.apps.zeroshot import ZeroShotClassifier

    clf = ZeroShotClassifier(model, processor, {"cat": "고양이", "dog": "개"}, lang="ko")
    clf.predict(["cat.jpg"])[0].name          # '고양이'

Each class is described by several prompts ("a photo of a {}.", "{}을/를 찍은 사진"...). Their text
embeddings are L2-normalised, averaged and normalised again: the *prompt ensemble* of the CLIP
paper, one unit vector per class. An image's logits are ``scale · cos(image, class) (+ bias)``,
exactly as the model computes them in training.

The embedding helpers here (:func:`embed_texts`, :func:`embed_images`, :func:`ensemble_prompts`)
are shared with evaluation (``imagefm.eval``), so evaluation measures what users run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from imagefm.eval.templates import ClassNames, load_templates, render_all, resolve_classnames


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _model_dtype(model: Any) -> torch.dtype:
    try:
        dtype = next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float32


def check_precision(precision: str, device: torch.device | str = "cpu") -> None:
    """Refuse an unknown precision, or bf16 on a GPU without bfloat16 (before any work)."""
    from imagefm.config import INFERENCE_PRECISIONS, ConfigError, check_choice

    check_choice("precision", precision, INFERENCE_PRECISIONS)
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU has no bfloat16 arithmetic; use fp32")


@contextlib.contextmanager
def inference(model: Any, precision: str = "fp32") -> Iterator[None]:
    """Eval mode and no autograd for the duration; the model's train/eval state is restored.

    ``precision="bf16"`` runs the model under bfloat16 autocast on its device: matrix products
    in bf16, norms and softmax in fp32, weights untouched (an index's model fingerprint still
    matches). Where the hardware has bf16 arithmetic (CPUs with AVX-512 BF16 or AMX, recent
    GPUs) it is much faster; embeddings move by about 1e-4 in cosine (measured on a CPU with
    AVX-512 BF16: docs/benchmarks.md, "Image search").
    """
    check_precision(precision, model_device(model))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    autocast = (torch.autocast(model_device(model).type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        if was_training:
            model.train()


def embed_texts(model: Any, processor: Any, texts: Sequence[str],
                batch_size: int = 256, precision: str = "fp32") -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (float32, on the CPU)."""
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    chunks = [encode_tokens(model, processor(texts=list(texts[start:start + batch_size])),
                            precision)
              for start in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def encode_tokens(model: Any, batch: dict[str, torch.Tensor], precision: str = "fp32"
                  ) -> torch.Tensor:
    """L2-normalised text embeddings ``[B, D]`` (float32, on the CPU) of one tokenized batch.

    Columns that are padding in every row are cut first where the text tower says they cannot
    change its output (``needed_length``: CLIP's causal towers, masked encoders; not SigLIP's,
    which pools the last position): a query of 8 tokens then costs 8 positions, not 77.
    """
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    needed_length = getattr(getattr(model, "text", None), "needed_length", None)
    if needed_length is not None:
        length = needed_length(input_ids, mask)
        input_ids = input_ids[:, :length]
        mask = mask[:, :length] if mask is not None else None
    device = model_device(model)
    with inference(model, precision):
        embeds = model.encode_text(input_ids.to(device),
                                   mask.to(device) if mask is not None else None)
    return F.normalize(embeds.float(), dim=-1).cpu()


def embed_pixels(model: Any, pixel_values: torch.Tensor, precision: str = "fp32"
                 ) -> torch.Tensor:
    """L2-normalised image embeddings ``[B, D]`` of preprocessed pixels (float32, on the CPU)."""
    with inference(model, precision):
        pixels = pixel_values.to(model_device(model), _model_dtype(model))
        return F.normalize(model.encode_image(pixels).float(), dim=-1).cpu()


def embed_images(model: Any, processor: Any, images: Sequence[Any],
                 batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]``; a bad image raises (its name in the message).

    ``images`` are anything the processor takes: paths, encoded bytes, PIL images, arrays.
    """
    if len(images) == 0:
        raise ValueError("no images to embed")
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=list(images[start:start + batch_size]))["pixel_values"]
        chunks.append(embed_pixels(model, pixels, precision))
    return torch.cat(chunks)


def preprocess_tolerant(processor: Any, images: Sequence[Any], names: Sequence[str] | None = None
                        ) -> tuple[torch.Tensor | None, list[int], list[str]]:
    """Preprocess a batch, dropping images that fail to decode instead of failing the batch.

    Returns ``(pixel_values or None, indices of the images kept, error messages)``. The whole
    batch is tried first; only when it fails is each image tried alone, to find the bad ones.
    """
    try:
        return processor(images=list(images))["pixel_values"], list(range(len(images))), []
    except (ValueError, OSError):
        pass
    kept, rows, errors = [], [], []
    for index, image in enumerate(images):
        try:
            rows.append(processor(images=[image])["pixel_values"])
            kept.append(index)
        except (ValueError, OSError) as err:
            name = names[index] if names is not None else f"image #{index}"
            errors.append(f"{name}: {err}")
    return (torch.cat(rows) if rows else None), kept, errors


def ensemble_prompts(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """One unit vector from several prompt embeddings ``[T, D]``: normalise, mean, renormalise."""
    return F.normalize(F.normalize(prompt_embeds.float(), dim=-1).mean(dim=0), dim=-1)


def class_embeddings(model: Any, processor: Any, prompts: Sequence[Sequence[str]],
                     batch_size: int = 256) -> torch.Tensor:
    """Prompt-ensembled class embeddings ``[C, D]``; ``prompts[c]`` describes class ``c``.

    Identical prompts (shared between classes or repeated) are encoded once.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every class needs at least one prompt")
    unique = list(dict.fromkeys(text for group in prompts for text in group))
    row = {text: i for i, text in enumerate(unique)}
    embeds = embed_texts(model, processor, unique, batch_size)
    return torch.stack([ensemble_prompts(embeds[[row[t] for t in group]]) for group in prompts])


def logit_parts(model: Any) -> tuple[float, float]:
    """The model's (scale, bias) that turn cosine similarity into logits (bias 0 for CLIP)."""
    scale = float(model.logit_scale.detach().float().exp())
    bias = getattr(model, "logit_bias", None)
    return scale, (float(bias.detach().float()) if bias is not None else 0.0)


@dataclass
class Prediction:
    """One image's prediction: best class (index, name, probability) and the top-k list."""

    label: int
    name: str
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)


class ZeroShotClassifier:
    """Classify images among class names the model was never trained on as labels.

    ``classnames`` is a list of names in ``lang``, ``{"en": [...], "ko": [...]}``, or an
    English → ``lang`` dict. ``templates`` overrides the shipped templates of ``lang``;
    ``prompts`` (one list of prompts per class) overrides templates altogether. Probabilities are
    a softmax over classes for CLIP and independent sigmoids for SigLIP, as each was trained.
    """

    def __init__(self, model: Any, processor: Any | None = None,
                 classnames: ClassNames | None = None, lang: str = "en",
                 templates: Sequence[str] | None = None, *,
                 prompts: Sequence[Sequence[str]] | None = None, batch_size: int = 64) -> None:
        if processor is None:
            from imagefm.processor import Processor

            processor = Processor.for_model(model)
        if classnames is None:
            raise ValueError("ZeroShotClassifier needs classnames")
        self.model = model
        self.processor = processor
        self.lang = lang
        self.batch_size = batch_size
        self.classnames = resolve_classnames(classnames, lang)
        if prompts is not None:
            if len(prompts) != len(self.classnames):
                raise ValueError(f"{len(prompts)} prompt lists for {len(self.classnames)} classes")
            self.templates: list[str] = []
            self.prompts = [list(p) for p in prompts]
        else:
            self.templates = list(templates) if templates is not None else load_templates(lang)
            self.prompts = [render_all(self.templates, name, lang) for name in self.classnames]
        self.class_embeddings = class_embeddings(model, processor, self.prompts)
        model_type = getattr(getattr(model, "config", None), "model_type", "clip")
        self.sigmoid = model_type == "siglip"

    def embed_images(self, images: Any) -> torch.Tensor:
        """Normalised image embeddings ``[N, D]`` (one image or a list)."""
        return embed_images(self.model, self.processor, _as_list(images), self.batch_size)

    def logits_from_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` of normalised image embeddings."""
        scale, bias = logit_parts(self.model)
        return scale * image_embeds.float().cpu() @ self.class_embeddings.t() + bias

    def logits(self, images: Any) -> torch.Tensor:
        """Logits ``[N, C]``: ``scale · cos(image, class) + bias``."""
        return self.logits_from_embeddings(self.embed_images(images))

    def probabilities(self, images: Any) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (softmax for CLIP, sigmoid for SigLIP)."""
        logits = self.logits(images)
        return torch.sigmoid(logits) if self.sigmoid else logits.softmax(dim=-1)

    def predict(self, images: Any, top_k: int = 1) -> list[Prediction]:
        """One :class:`Prediction` per image (a single image gives a list of one)."""
        probs = self.probabilities(images)
        k = max(1, min(top_k, len(self.classnames)))
        values, indices = probs.topk(k, dim=-1)
        out = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            top = [(self.classnames[i], p) for i, p in zip(row_indices, row_values, strict=True)]
            out.append(Prediction(row_indices[0], top[0][0], top[0][1], top))
        return out


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if getattr(images, "ndim", None) == 4:  # a numpy batch [N, H, W, C]
        return list(images)
    return [images]
