"""Evaluation during training: every ``eval.every`` steps and once at the end of the run.

One evaluation measures

- ``eval/loss``: the task's loss on held-out batches (``eval_loader(0)``, whole batches until
  ``eval.limit`` samples), the mean over their loss terms (rows; labelled tokens for a VLM) on
  all ranks together;
- the evaluators' metrics: ``evaluator(model) -> {"eval/...": value}`` on the bare model (eval
  mode, no grad) on rank 0, sent to the other ranks so that every rank decides alike (under
  FSDP every rank runs them: a sharded forward pass is a collective). An evaluator that fails
  is reported and left out: one broken metric does not end a long run.

Then, on every rank: the metrics are logged at the step; ``eval.metric`` is compared with the
best so far (``eval.mode``) and an improvement exports the model to ``<run>/best/``
(``eval.keep_best``; train/export.py); every callback's ``on_evaluate(trainer, step, metrics)``
runs. After ``eval.patience`` evaluations without improvement, or when a callback raises
:class:`StopTraining`, the run ends cleanly (checkpoint and final export, as at the last step);
any other exception from a callback (e.g. ``optuna.TrialPruned``) propagates.

Evaluation does not change the training: the random states are put back afterwards, so a run
trains the same weights with or without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.train import distributed
from imagefm.train.accumulate import loss_weight
from imagefm.train.batches import LoaderFactory, agreed_batches, batch_rows, every_rank, to_device
from imagefm.train.config import TrainConfig
from imagefm.train.errors import StopTraining
from imagefm.train.export import export_best, has_lora
from imagefm.train.state import Progress, capture_rng, full_model_state, restore_rng

if TYPE_CHECKING:
    from imagefm.train.trainer import Trainer

Evaluator = Callable[[nn.Module], dict[str, float]]


def resolve_mode(metric: str, mode: str) -> str:
    """``auto``: lower is better for losses, higher for everything else."""
    if mode != "auto":
        return mode
    return "min" if metric.endswith("loss") else "max"


def improves(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def check_something_to_evaluate(config: TrainConfig, held_out: bool, evaluators: bool) -> None:
    """Refuse ``eval.every > 0`` with neither held-out data nor an evaluator."""
    if config.eval.every > 0 and not held_out and not evaluators:
        raise ConfigError(f"eval.every = {config.eval.every} but there is nothing to evaluate: "
                          f"set eval.data to held-out data (for eval/loss), train with "
                          f"evaluators that suit this model, or set eval.every=0")


class Evaluation:
    """The ``eval`` section at work for one Trainer (see the module docstring)."""

    def __init__(self, config: TrainConfig, eval_loader: LoaderFactory | None,
                 evaluators: Sequence[Evaluator] = (), callbacks: Sequence[Any] = ()) -> None:
        self.settings = config.eval
        self.eval_loader = eval_loader
        self.evaluators = list(evaluators)
        self.callbacks = list(callbacks)
        self.mode = resolve_mode(self.settings.metric, self.settings.mode)
        self.last_step: int | None = None  # the step of the latest evaluation
        self._warned: set[str] = set()
        check_something_to_evaluate(config, eval_loader is not None, bool(self.evaluators))

    @property
    def enabled(self) -> bool:
        return self.settings.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.settings.every == 0

    # --- one evaluation --------------------------------------------------------------------------

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Measure, log, keep the best, call back; raises StopTraining when the run should end
        (on every rank alike)."""
        step, progress = trainer.progress.step, trainer.progress
        metrics = self.measure(trainer)
        self.last_step = step
        trainer.logger.log({"step": step, **metrics})
        stop = self._judge(trainer, progress, step, metrics)
        for callback in self.callbacks:
            hook = getattr(callback, "on_evaluate", None)
            if hook is None:
                continue
            try:
                hook(trainer, step, metrics)
            except StopTraining as request:
                stop = stop or str(request) or f"{type(callback).__name__} stopped the run"
        # A callback may decide on one rank only: then every rank stops.
        if not every_rank(stop is None):
            raise StopTraining(stop or "a callback on another rank stopped the run")
        return metrics

    def measure(self, trainer: Trainer) -> dict[str, float]:
        """``eval/loss`` (with held-out data) and the evaluators' metrics, on every rank."""
        rng = capture_rng()
        try:
            metrics: dict[str, float] = {}
            if self.eval_loader is not None:
                metrics["eval/loss"] = self.held_out_loss(trainer)
            metrics.update(self.run_evaluators(trainer))
            return metrics
        finally:
            trainer.wrapped.train()
            restore_rng(rng)

    def held_out_loss(self, trainer: Trainer) -> float:
        """The task's mean loss over up to ``eval.limit`` held-out samples, all ranks."""
        model, task, device = trainer.wrapped, trainer.task, trainer.device
        world_size = trainer.dist.world_size
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, loss terms)
        seen = [0]  # samples so far, all ranks
        model.eval()
        with torch.no_grad():
            batches = iter(self.eval_loader(0))
            for batch in agreed_batches(batches, lambda: seen[0] < self.settings.limit):
                seen[0] += batch_rows(batch) * world_size
                weight = loss_weight(task, batch)
                # Every rank runs every forward pass (a distributed loss gathers), but a batch
                # without loss terms adds nothing.
                with trainer.autocast():
                    loss, _ = task.loss(model, to_device(batch, device))
                if weight > 0:
                    totals += torch.stack([loss.detach().double() * weight,
                                           totals.new_tensor(weight)])
        loss_sum, terms = distributed.mean_over_ranks(totals).tolist()
        return loss_sum / terms if terms > 0 else math.nan

    def run_evaluators(self, trainer: Trainer) -> dict[str, float]:
        """The evaluators' metrics, computed on rank 0 (every rank under FSDP) and shared."""
        if not self.evaluators:
            return {}
        results: dict[str, float] = {}
        if trainer.dist.is_main or distributed.is_fsdp(trainer.model):
            model = trainer.model
            model.eval()
            with torch.no_grad():
                for evaluator in self.evaluators:
                    try:
                        found = {_eval_name(k): float(v) for k, v in evaluator(model).items()}
                    except Exception as err:  # noqa: BLE001 - a broken metric must not end the run
                        self._say(trainer, f"evaluator {_name(evaluator)} failed at step "
                                           f"{trainer.progress.step} ({type(err).__name__}: "
                                           f"{err}); its metrics are left out")
                        continue
                    results.update(found)
        return distributed.gather_objects(results)[0] if trainer.dist.enabled else results

    # --- best model and early stopping -----------------------------------------------------------

    def _judge(self, trainer: Trainer, progress: Progress, step: int,
               metrics: dict[str, float]) -> str | None:
        """Update the best so far (exporting it); the reason to stop, if it is time."""
        metric = self.settings.metric
        value = metrics.get(metric)
        if value is None:
            if metric not in self._warned:
                self._warned.add(metric)
                self._say(trainer, f"eval.metric = {metric} is not among the evaluation's "
                                   f"metrics ({', '.join(sorted(metrics)) or 'none'}): no best "
                                   f"model is kept and nothing stops early")
            return None
        if improves(value, progress.best_value, self.mode):
            progress.best_value, progress.best_step, progress.evals_since_best = value, step, 0
            if self.settings.keep_best:
                self._export_best(trainer, step, value, metrics)
            return None
        progress.evals_since_best += 1
        patience = self.settings.patience
        if patience and progress.evals_since_best >= patience:
            return (f"early stopping at step {step}: {metric} has not improved on "
                    f"{progress.best_value:.6g} (step {progress.best_step}) in "
                    f"{progress.evals_since_best} evaluations (eval.patience={patience})")
        return None

    def _export_best(self, trainer: Trainer, step: int, value: float,
                     metrics: dict[str, float]) -> None:
        model = trainer.model
        fsdp = distributed.is_fsdp(model)
        if fsdp and has_lora(model):
            self._say(trainer, "eval.keep_best: a sharded (FSDP) model with LoRA layers cannot be "
                               "exported during the run; no best/ is written")
            return
        state = full_model_state(model) if fsdp else None  # a collective: every rank
        if trainer.dist.is_main:
            export_best(model, trainer.config, step=step, value=value, mode=self.mode,
                        metrics=metrics, state=state)
        distributed.barrier()

    def _say(self, trainer: Trainer, message: str) -> None:
        if trainer.dist.is_main:
            from tqdm import tqdm

            tqdm.write(message)


def _eval_name(key: str) -> str:
    return key if key.startswith("eval/") else f"eval/{key}"


def _name(evaluator: Any) -> str:
    return getattr(evaluator, "__name__", None) or type(evaluator).__name__
