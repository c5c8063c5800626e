"""Run checkpoints: everything needed to continue a run exactly where it stopped.

    <run_dir>/checkpoints/step_00000500.pt

One file per checkpoint, written to a temporary name and renamed (a crash never leaves half a
checkpoint), the newest ``keep_last`` kept. Contents: model, optimizer, scheduler and EMA state,
the progress counters (step, epoch, batch within the epoch, skipped steps), every rank's RNG
states (python, numpy, torch, cuda) and the resolved config. Tensors and plain Python values only,
so it loads with ``torch.load(weights_only=True)``: no pickled code.

Under FSDP the sharded model and optimizer states are gathered whole on rank 0 (every rank must
call ``save_run_state``) and sharded again on load.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.checkpoint import atomic_write
from imagefm.train import distributed
from imagefm.train.tasks import unwrap

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class Progress:
    """Where the run is. ``step`` counts optimizer steps; ``batch_in_epoch`` (micro-)batches of
    ``epoch`` have been consumed. ``best_*``: the evaluation the best model came from, and how
    many evaluations since brought no improvement (early stopping)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    best_value: float | None = None
    best_step: int = 0
    evals_since_best: int = 0


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Run checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


# --- RNG -----------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """This process's random-number-generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples all the way down."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- saving and loading --------------------------------------------------------------------------

def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              ) -> tuple[dict, dict]:
    """Whole (unsharded) state dicts. Under FSDP a collective: every rank must call it."""
    if distributed.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state dict on CPU (under FSDP a collective; rank 0 gets the tensors)."""
    if distributed.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def save_run_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, ema: Any, progress: Progress, config: dict[str, Any],
                   keep_last: int) -> Path:
    """Write a run checkpoint on rank 0 (every rank must call this); prune old ones."""
    model_state, optimizer_state = model_and_optimizer_state(model, optimizer)
    ema_state = ema.state_dict() if ema is not None else None
    rng = distributed.gather_objects(capture_rng())
    if distributed.current().is_main:
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "ema": ema_state,
            "progress": asdict(progress),
            "rng": rng,
            "config": config,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in list_checkpoints(path.parent.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
    distributed.barrier()  # nobody races ahead (and maybe dies) before the file exists
    return path


def load_run_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, ema: Any) -> tuple[Progress, dict[str, Any] | None, dict]:
    """Load a run checkpoint into the given objects.

    Returns the progress, this rank's RNG state (None when the world size changed, so the
    streams cannot be continued) and the config the checkpoint was written with.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if distributed.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError(f"{path} holds no EMA weights but train.ema_decay > 0")
        ema.load_state_dict(state["ema"])
    info = distributed.current()
    rng = state["rng"][info.rank] if len(state["rng"]) == info.world_size else None
    return Progress(**state["progress"]), rng, state["config"]
