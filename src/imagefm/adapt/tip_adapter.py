"""Tip-Adapter (training-free) and Tip-Adapter-F (fine-tuned cache keys).

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (2022).
The few-shot training images become a key-value cache: keys are their normalised image
embeddings ``K`` ``[N, D]``, values their one-hot labels ``V`` ``[N, C]``. A test embedding
``f`` adds to the zero-shot logits

    alpha · exp(-beta · (1 - f Kᵀ)) V

— each cached image votes for its class with a weight that grows with its similarity to ``f``.
``alpha`` (how much to trust the cache) and ``beta`` (how sharp the similarity is) are searched
on validation data. Tip-Adapter-F makes ``K`` a parameter initialised from the cache and trains
it with cross-entropy on the few-shot set (the values and the zero-shot weights stay fixed),
then searches ``alpha``/``beta`` again. With no shots the cache is empty and the head is
exactly the zero-shot classifier.

Differences from the paper: our features are cached, so there is no augmentation of the
training images; Tip-Adapter-F therefore trains leave-one-out (an image's own key does not
vote for it); the zero-shot logits keep the model's own scale (and SigLIP bias) instead of
a fixed 100, which ``alpha`` absorbs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.adapt.features import FeatureViews
from imagefm.adapt.head import Head, accuracy
from imagefm.adapt.tune import adamw_settings
from imagefm.train.fit import fit
from imagefm.train.optim import build_optimizer


@dataclass(frozen=True)
class TipConfig:
    alphas: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0,
                                               64.0))
    betas: tuple[float, ...] = field(default=(0.5, 1.0, 2.0, 4.0, 5.5, 8.0, 12.0, 16.0))
    # Tip-Adapter-F
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.01  # PyTorch's AdamW default, which the keys have always had
    batch_size: int = 256
    seed: int = 0


def build_cache(zero_shot: Head, train: FeatureViews, alpha: float = 1.0,
                beta: float = 5.5) -> Head:
    """The zero-shot head plus a cache of ``train``'s post-projection features and labels."""
    if zero_shot.feature != "post":
        raise ValueError("Tip-Adapter extends a zero-shot (post-projection) head")
    values = F.one_hot(train.labels, zero_shot.num_classes).float()
    return replace(zero_shot, cache_keys=train.post.clone(), cache_values=values,
                   alpha=alpha, beta=beta)


def search_alpha_beta(head: Head, val: FeatureViews, config: TipConfig
                      ) -> tuple[Head, dict[str, Any]]:
    """``head`` with the (alpha, beta) of best validation accuracy (the smaller alpha on ties)."""
    if head.cache_keys is None or len(head.cache_keys) == 0:
        return head, {"alpha": 0.0, "beta": head.beta,
                      "val_accuracy": accuracy(head.logits(val.post), val.labels)}
    base = val.post @ head.weight.t() + head.bias
    affinity = val.post @ head.cache_keys.t()
    best: tuple[float, float, float] | None = None
    for alpha, beta in itertools.product(sorted(config.alphas), config.betas):
        cache = alpha * torch.exp(-beta * (1 - affinity)) @ head.cache_values
        score = accuracy(base + cache, val.labels)
        if best is None or score > best[0]:
            best = (score, alpha, beta)
    assert best is not None
    score, alpha, beta = best
    return replace(head, alpha=alpha, beta=beta), {"alpha": alpha, "beta": beta,
                                                   "val_accuracy": score}


def tip_adapter(zero_shot: Head, train: FeatureViews, val: FeatureViews,
                config: TipConfig | None = None) -> tuple[Head, dict[str, Any]]:
    """Training-free Tip-Adapter with alpha/beta chosen on ``val``."""
    config = config or TipConfig()
    if len(train) == 0:
        return zero_shot, {"alpha": 0.0, "beta": zero_shot.beta, "shots": 0}
    return search_alpha_beta(build_cache(zero_shot, train), val, config)


def tip_adapter_f(zero_shot: Head, train: FeatureViews, val: FeatureViews,
                  config: TipConfig | None = None) -> tuple[Head, dict[str, Any]]:
    """Tip-Adapter-F: cache keys fine-tuned with cross-entropy on the few-shot set."""
    config = config or TipConfig()
    head, info = tip_adapter(zero_shot, train, val, config)
    if len(train) == 0:
        return head, {**info, "epochs": 0}
    cache = nn.Module()
    cache.keys = nn.Parameter(head.cache_keys.clone())
    # No warm-up and no clipping: a cosine from ``lr`` to zero over every epoch's batches.
    optim = adamw_settings(config.lr, config.weight_decay, eps=1e-4, grad_clip=0.0)
    optimizer = build_optimizer(cache, optim, {"keys": 1.0})
    generator = torch.Generator().manual_seed(config.seed)
    batches = [rows for _ in range(config.epochs)
               for rows in torch.randperm(len(train), generator=generator).split(config.batch_size)]
    # The cache weight during training: the one found for the training-free cache (>0 so the
    # keys get a gradient at all).
    alpha = max(info["alpha"], 1.0)
    base = train.post @ head.weight.t() + head.bias

    def loss(step: int) -> torch.Tensor:
        rows = batches[step - 1]
        # Leave-one-out: an image never votes for itself (it would match its own key
        # perfectly and the loss would teach nothing without augmented views).
        votes = torch.exp(-head.beta * (1 - train.post[rows] @ cache.keys.t()))
        votes = votes.index_put((torch.arange(len(rows)), rows), votes.new_zeros(()))
        return F.cross_entropy(base[rows] + alpha * votes @ head.cache_values,
                               train.labels[rows])

    result = fit(optimizer, optim, len(batches), loss, desc="tip-f")
    tuned = replace(head, cache_keys=cache.keys.detach())
    tuned, found = search_alpha_beta(tuned, val, config)
    return tuned, {**found, "epochs": config.epochs, "train_loss": result.loss}
