"""Tasks own their loss; the Trainer only calls them.

A task is any object with

    loss(model, batch) -> (loss tensor, {name: float-able metric})
    after_step(model) -> None          # optional: e.g. clamp a temperature after each update
    loss_weight(batch) -> number       # optional: the loss terms a batch's mean loss is over
                                       # (default: its rows; gradient accumulation weighs by it)

Tasks that also split the loss into an embedding step and a loss-over-embeddings step,

    embed(model, batch) -> Embeddings  (per-row tensors + tensors shared by all rows)
    embedding_loss(embeddings) -> (loss, metrics)

can run under GradCache (``imagefm.train.gradcache``), which trains large contrastive batches
in small chunks with exactly the full-batch gradients.

``model`` is whatever the Trainer holds: possibly wrapped in DistributedDataParallel, so tasks
call ``model(...)`` (DDP synchronises gradients only through its forward) and read parameters
from the forward's outputs, never from attributes of a wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from imagefm.losses import clip_loss, siglip_loss
from imagefm.models.decoder import IGNORE_INDEX

Metrics = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    """What the Trainer needs from a task."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Metrics]: ...


@dataclass
class Embeddings:
    """The output of ``embed``: ``rows`` have one row per example (concatenated across GradCache
    chunks); ``shared`` are the same for every chunk (a temperature, a bias)."""

    rows: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor | None] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class ContrastiveTask:
    """CLIP (softmax) or SigLIP (sigmoid) image–text contrastive training of a dual encoder.

    Batches are dicts with ``pixel_values``, ``input_ids`` and optionally ``attention_mask``.
    Dual encoders of other modalities (speech–text, point cloud–text) train with this same task:
    their batches hold the non-text input under the model's ``media_key`` (``input_features``,
    ``points``) and their forward returns a ``DualEncoderOutput`` whose ``image_embeds`` are
    that input's embeddings.
    Under ``torch.distributed`` the loss is computed over the global batch (see
    ``imagefm.losses``). After each step ``logit_scale`` is clamped to ``log(max_logit_scale)``,
    as CLIP does, so the temperature cannot run away.
    """

    def __init__(self, loss: str = "clip", *, max_logit_scale: float = 100.0,
                 gather_with_grad: bool = True, local_loss: bool = True) -> None:
        if loss not in ("clip", "siglip"):
            raise ValueError(f"ContrastiveTask(loss={loss!r}): choose 'clip' or 'siglip'")
        self.loss_name = loss
        self.max_log_scale = math.log(max_logit_scale)
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def embed(self, model: nn.Module, batch: dict) -> Embeddings:
        key = getattr(unwrap(model), "media_key", "pixel_values")
        out = model(batch[key], batch["input_ids"], batch.get("attention_mask"))
        return Embeddings(rows={"image": out.image_embeds, "text": out.text_embeds},
                          shared={"logit_scale": out.logit_scale, "logit_bias": out.logit_bias})

    def embedding_loss(self, embeddings: Embeddings) -> tuple[torch.Tensor, Metrics]:
        image, text = embeddings.rows["image"], embeddings.rows["text"]
        scale, bias = embeddings.shared["logit_scale"], embeddings.shared.get("logit_bias")
        # The loss in fp32 even under bf16 autocast: logits of a large batch need the precision.
        with torch.autocast(image.device.type, enabled=False):
            image, text, scale = image.float(), text.float(), scale.float()
            if self.loss_name == "clip":
                loss = clip_loss(image, text, scale, gather_with_grad=self.gather_with_grad,
                                 local_loss=self.local_loss)
                if bias is not None and bias.requires_grad:
                    # The softmax loss ignores a bias, but DDP insists every trainable parameter
                    # gets a gradient: give it an exact zero.
                    loss = loss + 0.0 * bias.float()
            else:
                if bias is None:
                    raise ValueError("the siglip loss needs a model with a logit_bias "
                                     "(set model.init_logit_bias, e.g. -10)")
                loss = siglip_loss(image, text, scale, bias.float())
        metrics = {"logit_scale": scale.detach()}
        if bias is not None:
            metrics["logit_bias"] = bias.detach()
        return loss, metrics

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return self.embedding_loss(self.embed(model, batch))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        log_scale = getattr(unwrap(model), "logit_scale", None)
        if isinstance(log_scale, torch.Tensor):
            log_scale.clamp_(max=self.max_log_scale)


class VLMTask:
    """Next-token loss of a VLM on the labelled tokens (assistant replies) of each batch.

    Batches are dicts with ``input_ids``, ``labels`` (``IGNORE_INDEX`` where nothing is
    learned), ``attention_mask`` and the family's image inputs (``pixel_values``, plus
    ``image_grid_thw`` for Qwen2-VL, ``image_sizes`` for LLaVA-OneVision...), as
    :meth:`imagefm.vlm_processor.VLMProcessor.collate` and :mod:`imagefm.train.conversations`
    build them; every key but ``labels`` goes to the model by name.
    """

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Metrics]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        out = model(**inputs, labels=batch["labels"])
        return out.loss, {"label_tokens": self.loss_weight(batch)}

    def loss_weight(self, batch: dict) -> torch.Tensor:
        """The loss terms of ``batch``, over which its loss is the mean: the labelled tokens
        that are predicted (labels shift by one inside the loss). Gradient accumulation
        weights each micro-batch by them (train/accumulate.py)."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
