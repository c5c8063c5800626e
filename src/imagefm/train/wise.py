"""WiSE-FT's weight interpolation (Wortsman et al., "Robust fine-tuning of zero-shot models",
CVPR 2022): ``θ(α) = (1 − α)·θ_start + α·θ_trained``.

Here because training uses it too (``stage.wise_alpha``: a run's exported weights are its
trained weights interpolated with those it started from); :mod:`imagefm.adapt.wise_ft` builds
the adaptation method (choosing α on validation data) on the same function.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagefm.checkpoint import read_safetensors, save_state_dict
from imagefm.config import ConfigError


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


START_FILE = "wise-start.safetensors"


def starting_weights(model: torch.nn.Module, run_dir: Path, fresh: bool,
                     write: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights a run starts from, kept in ``run_dir`` so a resumed run
    interpolates with the same ones: taken from ``model`` (and written, when ``write``) on a
    fresh run, read back on a resumed one."""
    path = Path(run_dir) / START_FILE
    if not fresh:
        if not path.is_file():
            raise ConfigError(f"stage.wise_alpha: {path} is missing (the run was started without "
                              "stage.wise_alpha, so its starting weights were not kept)")
        return dict(read_safetensors(path).items())
    start = {name: p.detach().cpu().clone() for name, p in model.named_parameters()
             if p.requires_grad}
    if write:
        save_state_dict(start, path)
    return start


@torch.no_grad()
def apply_wise(model: torch.nn.Module, start: dict[str, torch.Tensor], alpha: float) -> int:
    """Set ``model``'s weights named in ``start`` to ``(1 − α)·start + α·current``, in place;
    returns how many tensors changed."""
    params = dict(model.named_parameters())
    missing = sorted(set(start) - set(params))
    if missing:
        raise ConfigError(f"stage.wise_alpha: the model has no {missing[:3]} (the starting "
                          "weights belong to another model)")
    current = {name: params[name].detach().cpu() for name in start}
    mixed = interpolate_state(start, current, alpha)
    for name, value in mixed.items():
        params[name].copy_(value.to(params[name].device))
    return len(mixed)
