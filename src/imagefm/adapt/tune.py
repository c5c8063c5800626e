"""The training of the weight-changing methods (LoRA, full fine-tuning).

The classifier is the model's own zero-shot classifier: logits = ``scale · cos(image, class) +
bias`` with class embeddings from the text tower (prompt-ensembled), trained with
cross-entropy on the few-shot images. Fine-tuning with the zero-shot head rather than a fresh
linear layer keeps image and text in one space, which is what makes weight-space ensembling
(WiSE-FT) and the forgetting check meaningful.

* A tower that trains runs every step: the image tower on the (preprocessed) training pixels,
  the text tower on the class prompts. A frozen one is evaluated once: cached image features,
  fixed class embeddings.
* The temperature (and SigLIP bias) stay fixed, so logits stay calibrated as in zero-shot.
* Batch-norm layers (a convolutional image tower) keep their running statistics: a few dozen
  images would ruin them.
* Checkpoint selection: the trainable weights with the best validation accuracy, evaluated every
  ``eval_every`` steps (step 0 included), are the ones kept.

The loop itself, its schedule (the Trainer's cosine with warm-up) and the checkpoint selection
are :func:`imagefm.train.fit.fit`'s, as for CoOp and Tip-Adapter-F.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.adapt.head import accuracy
from imagefm.apps.zeroshot import class_embeddings, logit_parts, model_device
from imagefm.eval.templates import load_templates, render_all
from imagefm.train.config import OptimConfig
from imagefm.train.fit import fit


@dataclass
class Batchable:
    """Training or validation inputs: pixels when the image tower trains, else its features."""

    labels: torch.Tensor
    pixels: torch.Tensor | None = None  # preprocessed [N, 3, H, W]
    features: torch.Tensor | None = None  # normalised post-projection [N, D]

    def __len__(self) -> int:
        return len(self.labels)


def class_prompts(classnames: Sequence[str], lang: str = "en",
                  templates: int | None = None) -> list[list[str]]:
    """Each class's prompts from the language's first ``templates`` templates (all: None)."""
    chosen = load_templates(lang)[:templates]
    return [render_all(chosen, name, lang) for name in classnames]


class PromptEncoder:
    """Prompt-ensembled class embeddings through the (possibly training) text tower."""

    def __init__(self, model: Any, processor: Any, prompts: list[list[str]]) -> None:
        flat = [p for group in prompts for p in group]
        batch = processor(texts=flat)
        device = model_device(model)
        self.input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        self.attention_mask = mask.to(device) if mask is not None else None
        self.groups = torch.tensor([i for i, g in enumerate(prompts) for _ in g], device=device)
        self.num_classes = len(prompts)

    def __call__(self, model: Any) -> torch.Tensor:
        embeds = F.normalize(model.encode_text(self.input_ids, self.attention_mask).float(), dim=-1)
        sums = torch.zeros(self.num_classes, embeds.shape[1], device=embeds.device)
        sums = sums.index_add(0, self.groups, embeds)
        return F.normalize(sums, dim=-1)  # mean then renormalise == renormalise the sum


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _image_embeds(model: Any, data: Batchable, rows: torch.Tensor | None) -> torch.Tensor:
    if data.pixels is None:
        assert data.features is not None
        feats = data.features if rows is None else data.features[rows]
        return feats.to(model_device(model))
    pixels = data.pixels if rows is None else data.pixels[rows]
    return F.normalize(model.encode_image(pixels.to(model_device(model))).float(), dim=-1)


def _val_accuracy(model: Any, data: Batchable, classes: torch.Tensor, scale: float,
                  bias: float, batch_size: int = 256) -> float:
    with torch.no_grad():
        logits = torch.cat([scale * _image_embeds(model, data, rows) @ classes.t() + bias
                            for rows in torch.arange(len(data)).split(batch_size)])
    return accuracy(logits.cpu(), data.labels)


def adamw_settings(lr: float, weight_decay: float = 0.0, *, warmup_steps: int = 0,
                   eps: float = 1e-8, grad_clip: float = 1.0) -> OptimConfig:
    """The adaptation methods' optimizer as the Trainer's ``OptimConfig``: PyTorch's AdamW
    defaults (betas 0.9/0.999, eps 1e-8), a cosine to zero after ``warmup_steps``."""
    return OptimConfig(lr=lr, weight_decay=weight_decay, betas=[0.9, 0.999], eps=eps,
                       warmup_steps=warmup_steps, min_lr_ratio=0.0, grad_clip=grad_clip)


def warmup_steps(steps: int) -> int:
    """The weight-changing methods warm up over the first 5% of their steps (at least one)."""
    return max(1, steps // 20)


def tune(model: Any, processor: Any, prompts: list[list[str]], train: Batchable,
         val: Batchable, optimizer: torch.optim.Optimizer, *, steps: int, batch_size: int,
         eval_every: int, seed: int = 0, text_trains: bool = False) -> dict[str, Any]:
    """Train ``model``'s parameters in ``optimizer`` with :func:`imagefm.train.fit.fit`: the
    Trainer's cosine schedule with ``warmup_steps(steps)`` of warm-up, gradients clipped to 1.

    Returns ``best_step``, ``val_accuracy`` (of the kept weights), ``history``, ``train_loss``
    and ``seconds``; the model is left with the best weights.
    """
    started = time.perf_counter()
    scale, bias = logit_parts(model)
    encoder = PromptEncoder(model, processor, prompts) if text_trains else None
    fixed = None if text_trains else class_embeddings(model, processor, prompts).clone().to(
        model_device(model))
    generator = torch.Generator().manual_seed(seed)

    def classes() -> torch.Tensor:
        return encoder(model) if encoder is not None else fixed

    def evaluate() -> float:
        model.eval()
        return _val_accuracy(model, val, classes(), scale, bias)

    def loss(step: int) -> torch.Tensor:
        model.train()
        _freeze_batchnorm(model)
        rows = torch.randperm(len(train), generator=generator)[:batch_size]
        logits = scale * _image_embeds(model, train, rows) @ classes().t() + bias
        return F.cross_entropy(logits, train.labels[rows].to(logits.device))

    config = adamw_settings(optimizer.defaults["lr"], warmup_steps=warmup_steps(steps))
    result = fit(optimizer, config, steps, loss, evaluate=evaluate, eval_every=eval_every,
                 desc="tune")
    model.eval()
    return {"best_step": result.best_step, "val_accuracy": result.best_score,
            "history": result.history, "train_loss": result.loss,
            "seconds": time.perf_counter() - started}


def preprocess(processor: Any, images: Sequence[Any], batch_size: int = 256) -> torch.Tensor:
    """Pixels of ``images`` (all must decode: they were decoded once for the feature cache)."""
    return torch.cat([processor(images=list(images[i:i + batch_size]))["pixel_values"]
                      for i in range(0, len(images), batch_size)])
