"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022):

    θ(α) = (1 − α) · θ_zero-shot + α · θ_fine-tuned

α = 0 is the original model, α = 1 the fine-tuned one; in between the model often keeps most
of the fine-tuned accuracy on the target and most of the zero-shot accuracy elsewhere. α is
chosen on validation data: the best target accuracy among the α whose reference (zero-shot,
"what the model knew") accuracy stays within ``max_drop`` of the original's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def interpolate_state(zero_shot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − α)·zero_shot + α·finetuned`` for every floating tensor (others must be equal).

    Written as the two products summed, so α = 0 and α = 1 give the endpoints bit for bit.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if zero_shot.keys() != finetuned.keys():
        missing = sorted(set(zero_shot) ^ set(finetuned))
        raise ValueError(f"the two models have different weights: {missing[:5]}")
    mixed = {}
    for name, theta0 in zero_shot.items():
        theta1 = finetuned[name]
        if theta0.shape != theta1.shape:
            raise ValueError(f"{name}: shapes {tuple(theta0.shape)} and {tuple(theta1.shape)}")
        if theta0.is_floating_point():
            mixed[name] = ((1.0 - alpha) * theta0.float() + alpha * theta1.float()).to(
                theta0.dtype)
        elif torch.equal(theta0, theta1):
            mixed[name] = theta0.clone()
        else:
            raise ValueError(f"{name}: non-float tensors differ; cannot interpolate")
    return mixed


def wise_ft(zero_shot: nn.Module, finetuned: nn.Module, alpha: float) -> nn.Module:
    """A new model with the interpolated weights (both inputs untouched)."""
    mixed = copy.deepcopy(zero_shot)
    mixed.load_state_dict(interpolate_state(zero_shot.state_dict(), finetuned.state_dict(),
                                            alpha))
    return mixed.eval()


def choose_alpha(zero_shot: nn.Module, finetuned: nn.Module,
                 target: Callable[[nn.Module], float],
                 reference: Callable[[nn.Module], float] | None = None,
                 alphas: Sequence[float] = ALPHAS, max_drop: float = 0.02
                 ) -> tuple[float, list[dict[str, Any]]]:
    """The α of best ``target`` accuracy whose ``reference`` accuracy is at most ``max_drop``
    below α = 0's (any α without a reference). Both callables score on validation data.

    Returns α and the curve ``[{alpha, target, reference}]``.
    """
    curve = []
    for alpha in sorted(set(alphas) | {0.0}):
        model = wise_ft(zero_shot, finetuned, alpha)
        curve.append({"alpha": alpha, "target": target(model),
                      "reference": reference(model) if reference is not None else None})
    floor = curve[0]["reference"] - max_drop if reference is not None else None
    allowed = [c for c in curve if floor is None or c["reference"] >= floor - 1e-9]
    best = max(allowed, key=lambda c: (c["target"], -c["alpha"]))
    return best["alpha"], curve
