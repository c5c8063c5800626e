"""One classification head for every adaptation method: features → class logits.

    logits = features @ weightᵀ + bias                               (linear part)
           + alpha · exp(-beta · (1 - features @ cache_keysᵀ)) @ cache_values    (Tip-Adapter)

* zero-shot, CoOp, LoRA, fine-tuning: ``weight`` = logit scale × class text embeddings, ``bias``
  = the model's logit bias (SigLIP) — exactly the zero-shot classifier's logits;
* linear probes: a learned ``weight`` and ``bias``;
* Tip-Adapter: the zero-shot weight plus a cache of few-shot features (keys) and their one-hot
  labels (values); with an empty cache it *is* the zero-shot head.

Features are L2-normalised image embeddings, ``"post"`` (after the model's image projection,
the space of the text embeddings) or ``"pre"`` (the image tower's pooled output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURE_KINDS = ("pre", "post")


@dataclass
class Head:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    feature: str = "post"
    cache_keys: torch.Tensor | None = None  # [N, D], normalised "post" features
    cache_values: torch.Tensor | None = None  # [N, C], one-hot labels
    alpha: float = 0.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.feature not in FEATURE_KINDS:
            raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {self.feature!r}")

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def cache_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Tip-Adapter's cache term ``[B, C]`` (zeros without a cache)."""
        if self.cache_keys is None or self.cache_values is None or len(self.cache_keys) == 0:
            return features.new_zeros(features.shape[0], self.num_classes)
        affinity = features @ self.cache_keys.t()
        return self.alpha * torch.exp(-self.beta * (1 - affinity)) @ self.cache_values

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of normalised features of this head's ``feature`` kind."""
        return features @ self.weight.t() + self.bias + self.cache_logits(features)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for saving (``load_head`` reads them back with :meth:`settings`)."""
        state = {"weight": self.weight, "bias": self.bias}
        if self.cache_keys is not None and self.cache_values is not None:
            state.update(cache_keys=self.cache_keys, cache_values=self.cache_values)
        return {k: v.detach().float().contiguous() for k, v in state.items()}

    def settings(self) -> dict[str, object]:
        return {"feature": self.feature, "alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], settings: dict[str, object]) -> Head:
        return cls(state["weight"], state["bias"], str(settings.get("feature", "post")),
                   state.get("cache_keys"), state.get("cache_values"),
                   float(settings.get("alpha", 0.0)), float(settings.get("beta", 1.0)))


def text_head(class_embeds: torch.Tensor, scale: float, bias: float = 0.0) -> Head:
    """The zero-shot head: ``scale · cos(image, class) + bias`` (normalised class embeddings)."""
    weight = scale * class_embeds.float()
    return Head(weight, torch.full((weight.shape[0],), float(bias)), "post")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (a fraction)."""
    if len(labels) == 0:
        raise ValueError("no examples to score")
    return float((logits.argmax(dim=-1) == labels).float().mean())
