"""LoRA on a dual encoder's attention and MLP projections, through ``peft``; merged back into
plain weights so the adapted model saves as an ordinary imagefm checkpoint.

    model = add_lora(model, LoraSettings(rank=8, towers="vision"))   # in place; only LoRA trains
    ...train...
    model = merge_lora(model)                                         # nn.Linear again
    model.save_pretrained("adapted")

Our layers use Hugging Face's names (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``fc1``/
``fc2``), so ``target_modules`` is a list of those names, restricted to a tower with a regular
expression on the module path (``vision.…`` / ``text.…``). ``peft`` wraps each target in a
LoRA layer computing ``W x + (alpha / rank) · B A x``; ``B`` starts at zero, so training
starts from the original model. (``Attention`` runs q/k/v as one fused matmul only for plain
``nn.Linear`` layers, so the wrapped ones are honoured.)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from imagefm.adapt.tune import Batchable, tune
from imagefm.config import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
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


def target_names(model: nn.Module, targets: tuple[str, ...], tower: str) -> list[str]:
    """Full module names under ``tower`` whose last component is in ``targets``."""
    return [name for name, module in model.named_modules()
            if name.startswith(tower + ".") and name.rsplit(".", 1)[-1] in targets
            and isinstance(module, nn.Linear)]


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
    """Wrap the target layers of ``towers`` in LoRA layers; freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'imagefm[adapt]'") from None

    settings = settings or LoraSettings()
    towers = towers or resolve_towers(model, settings)
    pattern = (rf"^({'|'.join(map(re.escape, towers))})\..*\."
               rf"({'|'.join(map(re.escape, settings.targets))})$")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=pattern, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors (``lora_A``/``lora_B``) by name."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules()
               if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


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
    trainable = list(lora_parameters(adapted).values())
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    info = tune(adapted, processor, prompts, train, val, optimizer, steps=settings.steps,
                batch_size=settings.batch_size, eval_every=settings.eval_every,
                seed=settings.seed, text_trains="text" in towers)
    info.update(towers=towers, trainable_parameters=sum(p.numel() for p in trainable),
                rank=settings.rank)
    return merge_lora(adapted).eval(), info
