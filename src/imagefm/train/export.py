"""What a run leaves for users: model checkpoints (``final/``, ``final_ema/``, ``best/``) with
model cards that say what they were trained on.

``best/`` is replaced whole at every improvement: written to a hidden folder beside it, then
renamed into place, so a crash never leaves half a model there. Its ``best.json`` records the
step, the metric and its value.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.checkpoint import atomic_write_text, save_state_dict, write_model_card
from imagefm.hub import parse_hub_id
from imagefm.model_card import CARD_FILE
from imagefm.train.config import TrainConfig
from imagefm.train.stages import is_lora_parameter, merge_lora

BEST_DIR = "best"
BEST_FILE = "best.json"


def save_weights(model: nn.Module, state: dict[str, torch.Tensor] | None,
                 directory: Path) -> None:
    """Save ``model`` (with ``state`` instead of its own weights, if given) to ``directory``.

    Models with ``save_pretrained`` become imagefm checkpoints; to save other weights into one,
    a CPU copy is rebuilt as ``type(model)(model.config, model.card)``. Anything else is saved
    as bare safetensors weights.
    """
    if state is not None and hasattr(model, "save_pretrained"):
        try:
            rebuilt = type(model)(model.config, getattr(model, "card", None))
        except (AttributeError, TypeError):
            rebuilt = None
        if rebuilt is not None:
            rebuilt.load_state_dict(state)
            rebuilt.tokenizer = getattr(model, "tokenizer", None)
            model, state = rebuilt, None
    if state is None and hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        return

    save_state_dict(state if state is not None else model.state_dict(),
                    directory / "model.safetensors")


def write_run_card(model: nn.Module, config: TrainConfig, directory: Path, *,
                   step: int | None = None, eval_results: dict[str, float] | None = None) -> None:
    """The model card of a run's export says what it was trained on and from what (``step``:
    the step it was taken at, when not the last)."""
    if not (directory / CARD_FILE).is_file():
        return  # bare weights: no imagefm checkpoint, no card
    data, model_config = config.data, config.model
    source = data.source + (f" ({data.path})" if data.path else "")
    steps = (f"{step} of {config.train.steps} steps" if step is not None
             else f"{config.train.steps} steps")
    facts: dict[str, Any] = {"training_data": [
        f"{source}: {steps} of {data.batch_size} "
        f"(stage {config.stage.preset}, run {config.run.name})"]}
    hub_id = parse_hub_id(model_config.init) if model_config.init else None
    if hub_id is not None:
        facts["base_model"] = hub_id[0]
    if eval_results:
        facts["eval_results"] = eval_results
    write_model_card(model, directory, **facts)


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_parameter(name) for name, _ in model.named_parameters())


def export_best(model: nn.Module, config: TrainConfig, *, step: int, value: float,
                mode: str, metrics: dict[str, float],
                state: dict[str, torch.Tensor] | None = None) -> Path:
    """Export the model as it is now to ``<run>/best/`` (on the main process only).

    The run goes on, so LoRA updates are merged into a CPU copy, never the live model.
    ``state``: whole weights gathered from a sharded model (FSDP).
    """
    run_dir = config.run_dir
    staged = run_dir / f".{BEST_DIR}.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    if state is None and has_lora(model):
        model = copy.deepcopy(model).cpu()
        merge_lora(model)
    save_weights(model, state, staged)
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN
    write_run_card(model, config, staged, step=step, eval_results=finite)
    record = {"step": step, "metric": config.eval.metric, "value": value, "mode": mode,
              "metrics": finite}
    atomic_write_text(staged / BEST_FILE, json.dumps(record, indent=2) + "\n")
    final = run_dir / BEST_DIR
    replace_directory(staged, final)
    return final


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``best.json`` of a run (None when it has no best model yet)."""
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def replace_directory(staged: Path, final: Path) -> None:
    """Put folder ``staged`` at ``final`` with renames only (the old one moved aside first)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
