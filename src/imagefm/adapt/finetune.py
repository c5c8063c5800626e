"""Full fine-tuning with layer-wise learning-rate decay and an optional locked tower.

Layer-wise decay (as in BEiT / ELECTRA fine-tuning): in a tower of ``L`` blocks, block ``i``
trains at ``lr · decay^(L − i)``, what comes before the blocks (patch/token embeddings,
positions) at ``lr · decay^(L + 1)``, and what comes after (final norm, pooling head,
projection) at ``lr``. Early layers hold the most general features; they move least.

``lock`` freezes one tower (``text``: the class embeddings stay the zero-shot ones, the usual
choice for few-shot images; ``vision``: only the text side learns, LiT-style). The temperature
stays fixed. The loop, the zero-shot head as classifier and checkpoint selection on validation
data are :func:`imagefm.adapt.tune.tune`'s.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagefm.adapt.tune import Batchable, tune
from imagefm.config import ConfigError
from imagefm.train.optim import no_decay_names

_BLOCK = re.compile(r"\.(?:blocks|layers)\.(\d+)\.")
TOWER_PREFIXES = {"vision": ("vision.", "image_proj."), "text": ("text.", "text_proj.")}


@dataclass(frozen=True)
class FinetuneConfig:
    lock: str = "text"  # text | vision | none
    lr: float = 5e-4
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    steps: int = 200
    batch_size: int = 32
    text_templates: int = 4  # prompts per class when the text tower trains
    eval_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lock not in ("text", "vision", "none"):
            raise ConfigError(f"finetune.lock must be text, vision or none, got {self.lock!r}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")


def _tower_of(name: str) -> str | None:
    for tower, prefixes in TOWER_PREFIXES.items():
        if name.startswith(prefixes):
            return tower
    return None


def layer_decay_multipliers(model: nn.Module, decay: float,
                            towers: tuple[str, ...] = ("vision", "text")) -> dict[str, float]:
    """``{parameter name: lr multiplier}`` for the parameters of ``towers`` (see module doc)."""
    names = [name for name, _ in model.named_parameters()]
    mults: dict[str, float] = {}
    for tower in towers:
        under = [n for n in names if _tower_of(n) == tower]
        blocks = [(n, _BLOCK.search(n)) for n in under]
        indices = [int(m.group(1)) for _, m in blocks if m]
        depth = max(indices) + 1 if indices else 0
        first_block = next((pos for pos, (_, m) in enumerate(blocks) if m), len(blocks))
        for pos, (name, found) in enumerate(blocks):
            if found:
                mults[name] = decay ** (depth - int(found.group(1)))
            elif pos < first_block and depth:  # registered before the blocks: embeddings
                mults[name] = decay ** (depth + 1)
            else:  # after the blocks (norms, heads, projections), or a tower without blocks
                mults[name] = 1.0
    return mults


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the unlocked towers: one group per (multiplier, decay or not)."""
    towers = tuple(t for t in ("vision", "text") if t != config.lock)
    mults = layer_decay_multipliers(model, config.layer_decay, towers)
    skip_decay = no_decay_names(model)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        param.requires_grad_(name in mults)
        if name not in mults:
            continue
        decay = name not in skip_decay
        group = groups.setdefault((mults[name], decay), {
            "params": [], "lr": config.lr * mults[name],
            "weight_decay": config.weight_decay if decay else 0.0})
        group["params"].append(param)
    if not groups:
        raise ConfigError("finetune: nothing to train (both towers locked?)")
    return torch.optim.AdamW(list(groups.values()), lr=config.lr)


def finetune(model: nn.Module, processor: Any, prompts: list[list[str]], train: Batchable,
             val: Batchable, config: FinetuneConfig | None = None
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``model``; ``model`` itself is left untouched."""
    config = config or FinetuneConfig()
    tuned = copy.deepcopy(model)
    optimizer = build_optimizer(tuned, config)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    info = tune(tuned, processor, prompts, train, val, optimizer, steps=config.steps,
                batch_size=config.batch_size, eval_every=config.eval_every, seed=config.seed,
                text_trains=config.lock != "text")
    for p in tuned.parameters():
        p.requires_grad_(True)
    info.update(trainable_parameters=trainable, lock=config.lock,
                layer_decay=config.layer_decay)
    return tuned.eval(), info
