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

from torch import nn

from imagefm.train.wise import interpolate_state

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


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
