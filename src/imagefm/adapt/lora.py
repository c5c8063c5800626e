"""LoRA for few-shot adaptation of a dual encoder: the settings of ``imagefm adapt lora``, the
choice of tower, and the training (``adapt/tune.py``); the LoRA layers themselves and their
merge are :mod:`imagefm.models.lora`'s, shared with the training loop's LoRA stage.

    model = add_lora(model, LoraSettings(rank=8, towers="vision"))   # in place; only LoRA trains
    ...train...
    model = merge_lora(model)                                         # nn.Linear again
    model.save_pretrained("adapted")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from imagefm.adapt.tune import Batchable, adamw_settings, tune, warmup_steps
from imagefm.config import ConfigError
from imagefm.models.lora import TARGETS, lora_parameters, merge_lora, target_names
from imagefm.models.lora import add_lora as inject_lora
from imagefm.train.optim import build_optimizer

TOWERS = ("vision", "text")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=TARGETS)
    towers: str = "auto"  # vision | text | both | auto (vision when it has the targets, else text)
    steps: int = 200
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    text_templates: int = 4  # prompts per class while the text tower trains (cost per step)
    eval_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.towers not in (*TOWERS, "both", "auto"):
            raise ConfigError(f"lora.towers must be vision, text, both or auto, got "
                              f"{self.towers!r}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")


def resolve_towers(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The towers LoRA goes into; ``auto`` = vision if it has target layers, else text."""
    if settings.towers == "auto":
        for tower in TOWERS:
            if target_names(model, settings.targets, tower):
                return [tower]
        raise ConfigError(f"no module named {', '.join(settings.targets)} in either tower")
    towers = list(TOWERS) if settings.towers == "both" else [settings.towers]
    for tower in towers:
        if not target_names(model, settings.targets, tower):
            raise ConfigError(f"lora: the {tower} tower has no {', '.join(settings.targets)} "
                              f"linear layers (an external tower?); pick lora.towers=text or "
                              "vision accordingly")
    return towers


def add_lora(model: nn.Module, settings: LoraSettings | None = None,
             towers: list[str] | None = None) -> nn.Module:
    """Wrap the target layers of ``towers`` (default: ``settings.towers`` resolved) in LoRA
    layers; freeze everything else."""
    settings = settings or LoraSettings()
    towers = towers or resolve_towers(model, settings)
    return inject_lora(model, towers, rank=settings.rank, alpha=settings.alpha,
                       dropout=settings.dropout, targets=settings.targets)


def train_lora(model: nn.Module, processor: object, prompts: list[list[str]],
               train: Batchable, val: Batchable, settings: LoraSettings | None = None,
               towers: list[str] | None = None) -> tuple[nn.Module, dict[str, object]]:
    """LoRA-tune a copy of ``model`` on the few-shot set; return it merged, and what happened.

    ``train``/``val`` hold pixels when the image tower is adapted, else cached features.
    ``model`` itself is left untouched.
    """
    settings = settings or LoraSettings()
    towers = towers or resolve_towers(model, settings)
    with torch.random.fork_rng():  # LoRA's A matrices start random: the same every run
        torch.manual_seed(settings.seed)
        adapted = add_lora(copy.deepcopy(model), settings, towers)
    trainable = lora_parameters(adapted)
    config = adamw_settings(settings.lr, settings.weight_decay,
                            warmup_steps=warmup_steps(settings.steps))
    optimizer = build_optimizer(adapted, config, dict.fromkeys(trainable, 1.0))
    info = tune(adapted, processor, prompts, train, val, optimizer, steps=settings.steps,
                batch_size=settings.batch_size, eval_every=settings.eval_every,
                seed=settings.seed, text_trains="text" in towers)
    info.update(towers=towers, trainable_parameters=sum(p.numel() for p in trainable.values()),
                rank=settings.rank)
    return merge_lora(adapted).eval(), info


__all__ = ["TARGETS", "TOWERS", "LoraSettings", "add_lora", "lora_parameters", "merge_lora",
           "resolve_towers", "target_names", "train_lora"]
