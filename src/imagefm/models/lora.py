"""LoRA layers (through ``peft``) in any of our models, and merging them back into plain weights.

    add_lora(model, ["vision"], rank=8)    # in place: q/k/v/o, fc1/fc2 under vision.* wrapped
    ...train (only the LoRA tensors require grad)...
    merge_lora(model)                      # nn.Linear again: saves as an ordinary checkpoint

Our layers use Hugging Face's names (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``fc1``/
``fc2``, ``gate_proj``/``up_proj``/``down_proj``), so the targets are a list of those names,
restricted to parts of the model (``vision``, ``text``, ``lm``…) by a regular expression on the
module path. ``peft`` wraps each target in a LoRA layer computing ``W x + (alpha / rank) · B A x``;
``B`` starts at zero, so training starts from the original model. (``Attention`` runs q/k/v as
one fused matmul only for plain ``nn.Linear`` layers, so the wrapped ones are honoured.)

Both the training loop's LoRA stage (``train/stages.py``) and few-shot adaptation
(``adapt/lora.py``) use this module; it knows neither.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


def is_lora_parameter(name: str) -> bool:
    """Whether ``name`` is a LoRA tensor (``….lora_A.…`` / ``….lora_B.…``)."""
    return ".lora_A." in name or ".lora_B." in name


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors (``lora_A``/``lora_B``) by name."""
    return {name: p for name, p in model.named_parameters() if is_lora_parameter(name)}


def target_names(model: nn.Module, targets: Sequence[str], prefix: str) -> list[str]:
    """Full names of the ``nn.Linear`` modules under ``prefix`` whose last component is in
    ``targets``."""
    return [name for name, module in model.named_modules()
            if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in targets
            and isinstance(module, nn.Linear)]


def add_lora(model: nn.Module, prefixes: Sequence[str], rank: int = 4, alpha: float = 8.0,
             dropout: float = 0.0, targets: Sequence[str] = TARGETS) -> nn.Module:
    """Wrap the ``targets`` linears under ``prefixes`` in LoRA layers, in place; freeze every
    other parameter. Returns ``model``."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'imagefm[adapt]'") from None

    pattern = (rf"^({'|'.join(map(re.escape, prefixes))})\..*\."
               rf"({'|'.join(map(re.escape, targets))})$")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=pattern, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back (in place);
    every parameter requires grad again."""
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
