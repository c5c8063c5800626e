"""Linear probes on cached features: multinomial logistic regression, L2 strength chosen on
validation data; and the zero-shot-initialised head.

    head, info = train_probe(train, val, num_classes)                 # features "pre"/"post"/"auto"
    head, info = train_probe(train, val, num_classes, init=zs_head)   # zero-shot-initialised

The loss is ``mean cross-entropy + λ·‖W − W₀‖²`` (the bias is not penalised), minimised to
convergence with L-BFGS on the whole training set (features are cached, so one step sees
everything). A plain probe starts from and shrinks towards ``W₀ = 0``. The zero-shot-initialised
head starts from and shrinks towards the zero-shot classifier (logit scale × class text
embeddings), so a large ``λ`` gives back zero-shot and a small one a free probe: with one shot
per class the validation data can keep what the text already knew (as in the "LP++" and "WiSE"
lines of work). ``λ`` is the value of a grid with the best validation accuracy, the larger on a
tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from imagefm.adapt.features import FeatureViews
from imagefm.adapt.head import FEATURE_KINDS, Head, accuracy


@dataclass(frozen=True)
class ProbeConfig:
    features: str = "auto"  # pre | post | auto (the better on validation)
    l2_grid: tuple[float, ...] = field(
        default=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0))
    # Extra, stronger values for the zero-shot-initialised head (large λ = zero-shot).
    l2_grid_init: tuple[float, ...] = field(default=(10.0, 100.0))
    max_iter: int = 300

    def __post_init__(self) -> None:
        if self.features not in (*FEATURE_KINDS, "auto"):
            raise ValueError(f"probe.features must be pre, post or auto, got {self.features!r}")
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError("probe.l2_grid needs non-negative values")


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *,
               init_weight: torch.Tensor | None = None, init_bias: torch.Tensor | None = None,
               max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[C, D]`` and bias ``[C]`` minimising ``CE + l2·‖W − init_weight‖²``."""
    x, y = x.float(), y.long()
    anchor = (init_weight.float().clone() if init_weight is not None
              else x.new_zeros(num_classes, x.shape[1]))
    weight = anchor.clone().requires_grad_(True)
    bias = (init_bias.float().clone() if init_bias is not None
            else x.new_zeros(num_classes)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  tolerance_grad=1e-6, tolerance_change=1e-9,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + l2 * (weight - anchor).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def train_probe(train: FeatureViews, val: FeatureViews, num_classes: int,
                config: ProbeConfig | None = None, *, init: Head | None = None
                ) -> tuple[Head, dict[str, Any]]:
    """The probe with the best validation accuracy over features and ``λ``; returns the head and
    what was chosen (``features``, ``l2``, ``val_accuracy``, the whole ``grid``)."""
    config = config or ProbeConfig()
    if len(train) == 0:
        raise ValueError("a linear probe needs at least one training example")
    if init is not None:  # the text embeddings live in the post-projection space
        kinds = ["post"]
        grid = sorted(set(config.l2_grid) | set(config.l2_grid_init))
    else:
        kinds = ["post", "pre"] if config.features == "auto" else [config.features]
        grid = sorted(set(config.l2_grid))
    best: tuple[float, Head, str, float] | None = None
    tried = []
    for kind in kinds:
        for l2 in reversed(grid):  # strongest first: ties keep the more regularised probe
            weight, bias = fit_linear(
                train.get(kind), train.labels, num_classes, l2,
                init_weight=init.weight if init is not None else None,
                init_bias=init.bias if init is not None else None, max_iter=config.max_iter)
            head = Head(weight, bias, kind)
            score = accuracy(head.logits(val.get(kind)), val.labels)
            tried.append({"features": kind, "l2": l2, "val_accuracy": score})
            if best is None or score > best[0]:
                best = (score, head, kind, l2)
    assert best is not None
    score, head, kind, l2 = best
    return head, {"features": kind, "l2": l2, "val_accuracy": score, "grid": tried}
