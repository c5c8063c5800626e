"""Stages as data: which parameters train, and at what learning-rate multiplier.

A stage is a list of frozen name prefixes plus per-prefix learning-rate multipliers:

    stage:
      preset: lit                  # adds "vision" to the frozen prefixes (LiT: lock image tower)
      unlock_last_n: {vision: 2}   # ...but thaw its last 2 blocks and whatever follows them
      lr_mult: {text: 1.0, vision: 0.1}

Prefixes match whole name components: ``vision`` matches ``vision.blocks.0.fc1.weight`` but
not ``vision_proj.weight``. A prefix that matches nothing is an error (it is almost always a
typo), reported with the model's top-level module names.
"""

from __future__ import annotations

import re

from torch import nn

from imagefm.config import ConfigError
from imagefm.models.lora import add_lora as inject_lora
from imagefm.models.lora import is_lora_parameter
from imagefm.models.lora import merge_lora as merge_lora_layers
from imagefm.train.config import STAGE_PRESETS, StageConfig

_BLOCK_INDEX = re.compile(r"\.(?:blocks|layers)\.(\d+)\.")


def matches(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under ``prefix`` (on a ``.`` boundary)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def apply_stage(model: nn.Module, stage: StageConfig) -> dict[str, float]:
    """Set ``requires_grad`` per the stage; return ``{name: lr_mult}`` of trainable parameters.

    With ``stage.lora_rank`` > 0, LoRA layers are injected first (``add_lora``); the modules
    they live in are frozen, except for the LoRA tensors themselves.
    """
    frozen = [name for part in STAGE_PRESETS[stage.preset] for name in part_prefixes(model, part)]
    frozen += list(stage.frozen)
    if stage.lora_rank:
        add_lora(model, stage)
        frozen += [m for m in stage.lora_modules if m not in frozen]
    names = [name for name, _ in model.named_parameters()]
    for key, prefixes in (("stage.frozen", frozen), ("stage.lr_mult", list(stage.lr_mult)),
                          ("stage.unlock_last_n", list(stage.unlock_last_n))):
        for prefix in prefixes:
            _require_match(key, prefix, names, model)

    unlocked: set[str] = set()
    for tower, count in stage.unlock_last_n.items():
        if not any(matches(tower, prefix) for prefix in frozen):
            raise ConfigError(f"stage.unlock_last_n.{tower} has no effect: {tower!r} is not "
                              f"frozen (add it to stage.frozen or use stage.preset=lit)")
        unlocked |= last_blocks_and_after(names, tower, count)

    mults: dict[str, float] = {}
    for name, param in model.named_parameters():
        is_frozen = (any(matches(name, p) for p in frozen) and name not in unlocked
                     and not is_lora_parameter(name))
        param.requires_grad_(not is_frozen)
        if not is_frozen:
            mults[name] = _lr_mult(name, stage.lr_mult)
    if not mults:
        raise ConfigError("the stage freezes every parameter: nothing would train")
    return mults


def part_prefixes(model: nn.Module, part: str) -> list[str]:
    """The parameter prefixes of a preset's part (``vision``, ``projector``, ``lm``) in ``model``.

    VLM families name their parts alike (``vision``, ``projector``, ``lm``) except where the
    reference's layout differs: Qwen2-VL's projector is the patch merger inside its vision tower
    (``vision.merger``), so its "vision" is the tower's other modules; LLaVA-OneVision's learned
    ``image_newline`` ends each row of the image tokens the projector hands the LM, so it trains
    with the projector.
    """
    architecture = getattr(model, "architecture", None)
    if architecture == "qwen2_vl" and part in ("vision", "projector"):
        if part == "projector":
            return ["vision.merger"]
        names = [n for n, _ in model.named_parameters() if matches(n, "vision")
                 and not matches(n, "vision.merger")]
        return list(dict.fromkeys(".".join(n.split(".")[:2]) for n in names))
    if architecture == "llava_onevision" and part == "projector":
        return ["projector", "image_newline"]
    return [part]


def last_blocks_and_after(names: list[str], tower: str, count: int) -> set[str]:
    """Names under ``tower`` in its last ``count`` blocks or registered after its blocks.

    "After" uses registration order, so a vision tower's final norm and pooling head thaw with
    its last blocks, while the patch embedding and positions (registered before) stay locked.
    """
    under = [n for n in names if matches(n, tower)]
    indices = [(n, _block_index(n, tower)) for n in under]
    block_ids = [i for _, i in indices if i is not None]
    if not block_ids:
        raise ConfigError(f"stage.unlock_last_n.{tower}: no '.blocks.N.' or '.layers.N.' "
                          f"parameters under {tower!r}")
    first_kept = max(block_ids) + 1 - count
    last_block_position = max(pos for pos, (_, i) in enumerate(indices) if i is not None)
    return {name for pos, (name, i) in enumerate(indices)
            if (i is not None and i >= first_kept) or (i is None and pos > last_block_position
                                                       and count > 0)}


def _block_index(name: str, tower: str) -> int | None:
    found = _BLOCK_INDEX.search(name[len(tower.rstrip(".")):])
    return int(found.group(1)) if found else None


def _lr_mult(name: str, lr_mult: dict[str, float]) -> float:
    best = max((p for p in lr_mult if matches(name, p)), key=len, default=None)
    return 1.0 if best is None else lr_mult[best]


def _require_match(key: str, prefix: str, names: list[str], model: nn.Module) -> None:
    if not any(matches(name, prefix) for name in names):
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"{key}: {prefix!r} matches no parameter of the model; its top-level "
                          f"modules are: {top}")


# --- LoRA (the layers and their merge: imagefm.models.lora) ---------------------------------------

def add_lora(model: nn.Module, stage: StageConfig) -> None:
    """Inject LoRA layers (peft) into the ``lora_targets`` linears under ``lora_modules``."""
    for prefix in stage.lora_modules:
        _require_match("stage.lora_modules", prefix, [n for n, _ in model.named_parameters()],
                       model)
    inject_lora(model, stage.lora_modules, rank=stage.lora_rank, alpha=stage.lora_alpha,
                dropout=stage.lora_dropout, targets=stage.lora_targets)
    if not any(is_lora_parameter(name) for name, _ in model.named_parameters()):
        raise ConfigError(f"stage.lora_targets {stage.lora_targets} match no linear layer under "
                          f"{stage.lora_modules}")


def merge_lora(model: nn.Module) -> bool:
    """Fold LoRA updates back into plain layers (in place); whether there were any."""
    if not any(is_lora_parameter(name) for name, _ in model.named_parameters()):
        return False
    merge_lora_layers(model)
    return True
