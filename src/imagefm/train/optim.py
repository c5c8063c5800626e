"""AdamW with sensible parameter groups, a cosine schedule with warmup, and a weight EMA.

Weight decay pulls weights towards zero; that is wrong for parameters whose scale *is* the point:
norms' gains and shifts, biases, position embeddings, the class token, SigLIP's attention-pool
probe, and the contrastive temperature/bias. Those get no decay (open_clip and big_vision agree).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imagefm.train.config import OptimConfig
from imagefm.train.distributed import full_tensor, shard_like

NO_DECAY_NAMES = ("pos_embed", "class_token", "probe", "logit_scale", "logit_bias")
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                                           nn.modules.batchnorm._BatchNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that must not be weight-decayed."""
    names = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if (isinstance(module, NORM_TYPES) or param.ndim < 2 or name.endswith("bias")
                    or name in NO_DECAY_NAMES):
                names.add(full)
    return names


def param_groups(model: nn.Module, lr_mults: dict[str, float], lr: float,
                 weight_decay: float) -> list[dict]:
    """One AdamW group per (lr multiplier, decay or not); only names in ``lr_mults`` train."""
    skip_decay = no_decay_names(model)
    groups: dict[tuple[float, bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if name not in lr_mults or not param.requires_grad:
            continue
        mult, decay = lr_mults[name], name not in skip_decay
        # FSDP-sharded and plain tensors cannot share a foreach kernel: separate groups.
        sharded = hasattr(param, "device_mesh")
        group = groups.setdefault((mult, decay, sharded), {
            "params": [], "names": [], "lr": lr * mult, "lr_mult": mult,
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    # A stable order, so optimizer state lines up with its parameters after a resume.
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1], k[2]))]


def build_optimizer(model: nn.Module, config: OptimConfig,
                    lr_mults: dict[str, float]) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, grouped by ``param_groups``."""
    groups = param_groups(model, lr_mults, config.lr, config.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # The fused kernel reads every tensor of a step in one go; sharded (DTensor) parameters
    # and devices without the kernel keep the foreach implementation.
    fusable = all(not hasattr(p, "device_mesh") and p.device.type in ("cpu", "cuda")
                  and p.is_floating_point() for p in params)
    fused = config.implementation == "fused" or (
        config.implementation == "auto" and fusable and bool(params))
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             **({"fused": True} if fused else {}))


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int,
                       min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warmup to 1, then a half cosine down to ``min_ratio``.

    Warmup reaches 1 on its last step (never 0 on the first: that step would be wasted).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``cosine_with_warmup`` to every group's own learning rate."""
    def factor(step: int) -> float:
        return cosine_with_warmup(step, config.warmup_steps, total_steps, config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ExponentialMovingAverage:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    Floating-point entries of the state dict are averaged; other buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.detach(), 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors (gathered under FSDP: call it on every rank)."""
        return {k: full_tensor(v).cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for key, value in state.items():
            # Under FSDP the shadow is sharded like the weights; checkpoints hold whole tensors.
            self.shadow[key].copy_(shard_like(value, self.shadow[key]))
