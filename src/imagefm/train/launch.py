"""From a config to a finished run: build the model, task and data, then run the Trainer.

    python -m imagefm.train config.yaml train.steps=300 model.preset=tiny [--resume]
    torchrun --nproc-per-node 4 -m imagefm.train config.yaml
    imagefm train config.yaml train.steps=300
    torchrun --nproc-per-node 4 -m imagefm train config.yaml   # with the CLI's evaluators

``imagefm train`` adds the evaluators of :mod:`imagefm.eval.training` (zero-shot, retrieval on
``eval.data``); ``python -m imagefm.train`` evaluates the held-out loss only (train/ imports no
evaluator).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError, DualEncoderConfig, ImageCard, merge_nested, preset
from imagefm.train import distributed
from imagefm.train.asr import ctc_task
from imagefm.train.config import TrainConfig, load_config
from imagefm.train.data import (
    HELD_OUT_SOURCES,
    LoaderFactory,
    get_data_source,
    micro_batch_size,
)
from imagefm.train.distributed import DistInfo
from imagefm.train.evaluation import Evaluator, check_something_to_evaluate
from imagefm.train.points import ulip_task
from imagefm.train.presets import MODEL_PRESETS
from imagefm.train.stages import apply_stage, merge_lora
from imagefm.train.tasks import ContrastiveTask, Task, VLMTask
from imagefm.train.trainer import Trainer, seed_everything


def build_model(config: TrainConfig) -> nn.Module:
    """A fresh model from ``model.preset`` (+ ``model.config`` overrides) or ``model.init``,
    with ``model.preprocess`` replacing fields of its image card."""
    model = _preset_or_init(config)
    if config.model.preprocess:
        card = getattr(model, "card", None)
        if not isinstance(card, ImageCard):
            raise ConfigError(f"model.preprocess: a {type(model).__name__} has no image card")
        known = [f.name for f in dataclasses.fields(ImageCard)]
        unknown = sorted(set(config.model.preprocess) - set(known))
        if unknown:
            raise ConfigError(f"model.preprocess: unknown card field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
        model.card = dataclasses.replace(card, **config.model.preprocess)  # validated by ImageCard
    return model


def _preset_or_init(config: TrainConfig) -> nn.Module:
    if config.model.init is not None:
        if config.model.config:
            raise ConfigError("model.config overrides apply to presets only; with model.init the "
                              "architecture comes from the checkpoint")
        from imagefm.loading import load

        return load(config.model.init).train()
    if config.model.preset in MODEL_PRESETS:
        module_name, _, attr = MODEL_PRESETS[config.model.preset].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        return builder(config.model.preset, config.model.config, config.model.pretrained)
    from imagefm.convert.towers import PRESET_TOWERS, build_dual_encoder

    data = merge_nested(preset(config.model.preset).to_dict(), config.model.config)
    towers = PRESET_TOWERS.get(config.model.preset, {}) if config.model.pretrained else {}
    return build_dual_encoder(DualEncoderConfig.from_dict(data), towers)


# The ``architecture`` of every VLM family the vlm task trains (LLaVA-style, Qwen2-VL and
# Qwen2.5-VL, LLaVA-OneVision, Idefics3 / SmolVLM).
VLM_ARCHITECTURES = ("vlm", "qwen2_vl", "llava_onevision", "idefics3")


def build_task(config: TrainConfig, model: nn.Module) -> Task:
    """The task named by ``task.name``; ``task.loss=auto`` follows the model's type."""
    if config.task.name == "ulip":
        return ulip_task(config, model)
    if config.task.name == "asr_ctc":
        return ctc_task(config, model)
    is_vlm = getattr(model, "architecture", None) in VLM_ARCHITECTURES
    if config.task.name == "vlm":
        if not is_vlm:
            raise ConfigError(f"task.name = vlm needs a VLM checkpoint in model.init; "
                              f"{config.model.init} holds a {type(model).__name__}")
        return VLMTask()
    if is_vlm:
        raise ConfigError("model.init holds a VLM: train it with task.name=vlm")
    loss = config.task.loss
    if loss == "auto":
        loss = getattr(getattr(model, "config", None), "model_type", "clip")
    return ContrastiveTask(loss, max_logit_scale=config.task.max_logit_scale,
                           gather_with_grad=config.task.gather_with_grad,
                           local_loss=config.task.local_loss)


# Makes the evaluators for a run: ``(config, model) -> [evaluator(model) -> {"eval/...": x}]``
# (imagefm.eval.training.training_evaluators is the one `imagefm train` uses).
EvaluatorFactory = Callable[[TrainConfig, nn.Module], Sequence[Evaluator]]


def run(config: TrainConfig, *, evaluators: EvaluatorFactory | None = None,
        callbacks: Sequence[Any] = ()) -> Path:
    """Train as ``config`` says (under torchrun too); return the run folder.

    With ``eval.every > 0`` the run is evaluated during training: ``eval/loss`` on ``eval.data``
    (read by the data source, see :func:`eval_data_config`) and the metrics of the evaluators
    ``evaluators(config, model)`` makes; ``callbacks`` see every evaluation (train/evaluation.py).
    """
    started_here = not distributed.current().enabled
    info = distributed.init_distributed(config.run.device)
    try:
        micro_batch_size(config, info)  # fail before building anything
        seed_everything(config.run.seed)  # the same initial weights on every rank
        model = build_model(config)
        task = build_task(config, model)
        found: Sequence[Evaluator] = ()
        eval_loader = None
        if config.eval.every > 0:  # before the training data, which may take long to read
            eval_loader = build_eval_loader(config, model, info)
            found = list(evaluators(config, model)) if evaluators is not None else []
            check_something_to_evaluate(config, eval_loader is not None, bool(found))
        make_loader = get_data_source(config.data.source)(config, model, info)
        return Trainer(model, task, config, make_loader, eval_loader=eval_loader,
                       evaluators=found, callbacks=callbacks).fit()
    finally:
        if started_here:
            distributed.teardown()


def eval_data_config(config: TrainConfig) -> TrainConfig:
    """The config the data source builds held-out batches from: ``data.path = eval.data``,
    ``data.source = eval.source`` (or data.source), ``data.batch_size = eval.batch_size`` (or
    data.batch_size), no accumulation. ``data.options`` go with data.source only: another
    source starts without any. A source that reads held-out data its own way (in order, no
    augmentation: ``register_data_source(..., held_out_option=True)``) gets ``held_out: true``."""
    data, evaluation = config.data, config.eval
    source = evaluation.source or data.source
    options = dict(data.options) if source == data.source else {}
    get_data_source(source)  # imports the modules that register the built-in sources
    if source in HELD_OUT_SOURCES:
        options["held_out"] = True
    held_out = dataclasses.replace(
        data, path=evaluation.data, source=source,
        batch_size=evaluation.batch_size or data.batch_size, options=options)
    return dataclasses.replace(config, data=held_out,
                               train=dataclasses.replace(config.train, accumulate=1))


def build_eval_loader(config: TrainConfig, model: nn.Module, info: DistInfo
                      ) -> LoaderFactory | None:
    """Held-out batches from ``eval.data`` (None without it)."""
    if config.eval.data is None:
        return None
    held_out = eval_data_config(config)
    try:
        return get_data_source(held_out.data.source)(held_out, model, info)
    except ConfigError as err:  # the source speaks of data.*: here it is the held-out data
        raise ConfigError(f"eval.data = {config.eval.data!r} (held-out data): {err}") from None


def model_from_checkpoint(checkpoint: str | Path, *, merge: bool = True) -> nn.Module:
    """The model of a run checkpoint (``<run>/checkpoints/step_*.pt``), rebuilt as its run built
    it (the config saved in it: ``model.init`` must still be there) with the stage applied, so
    LoRA layers exist to take its LoRA tensors. ``merge`` folds them into plain layers: the
    outputs stay the same and the model saves as an ordinary checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    apply_stage(model, config.stage)
    model.load_state_dict(state["model"])
    if merge:
        merge_lora(model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m imagefm.train``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m imagefm.train",
                                     description="Train a model from a YAML/TOML config.")
    parser.add_argument("config", help="config file (.yaml/.toml), or a first key=value override")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    try:
        return train_from_args(args.config, args.overrides, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def train_from_args(config_path: str | None, overrides: list[str], *, resume: bool = False,
                    evaluators: EvaluatorFactory | None = None) -> int:
    """Load and validate the config, then run it. Shared by the CLI (with its evaluators) and
    ``python -m imagefm.train`` (held-out ``eval/loss`` only: train/ imports no evaluator)."""
    overrides = list(overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).is_file():
        overrides.insert(0, config_path)  # no file given: defaults plus overrides
        config_path = None
    if resume:
        overrides.append("run.resume=true")
    config = load_config(config_path, overrides)
    run_dir = run(config, evaluators=evaluators)
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(f"run finished: {run_dir}")
    return 0
