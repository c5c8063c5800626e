"""The one training loop. It knows nothing of CLIP: a Task turns a batch into (loss, metrics).

    trainer = Trainer(model, ContrastiveTask("clip"), config, make_loader,
                      eval_loader=held_out, evaluators=[zero_shot], callbacks=[pruner])
    trainer.fit()            # -> the run folder

One step: ``train.accumulate`` micro-batches -> device -> task loss (under autocast; GradCache
for contrastive tasks when chunked or accumulated, train/accumulate.py) -> backward -> gradient
norm (clipped) -> skip if non-finite, else optimizer step + task.after_step + EMA -> scheduler
-> metrics, progress bar (samples/s, ETA, the latest evaluation), an evaluation every
``eval.every`` steps (train/evaluation.py: held-out loss, evaluators, ``best/``, early
stopping, callbacks), a checkpoint every ``run.checkpoint_every`` steps.
With ``train.host_sync=log`` (auto on CUDA) nothing of a step is read back to the host: the
fused AdamW skips a non-finite step on the device, and loss, gradient norm and skipped steps
are read once per ``run.log_every`` steps.

``make_loader(epoch)`` returns an iterable of micro-batch dicts for that epoch (a DataLoader
works too; the protocol is in train/data.py and train/batches.py). For an exact ``run.resume``
it must be deterministic given the epoch: the Trainer records (epoch, micro-batches consumed)
and, on resume, re-creates that epoch's loader and starts after the micro-batches already
trained on. ``train.steps`` counts optimizer steps, including any skipped for a non-finite
loss; a step may take micro-batches from two epochs.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from imagefm.config import ConfigError
from imagefm.train import distributed
from imagefm.train import state as run_state
from imagefm.train.accumulate import accumulated_backward, is_contrastive, loss_weight
from imagefm.train.batches import (
    LoaderFactory,
    as_loader_factory,
    batch_rows,
    epoch_batches,
    to_device,
)
from imagefm.train.config import TrainConfig
from imagefm.train.errors import StopTraining, TrainingError
from imagefm.train.evaluation import Evaluation, Evaluator
from imagefm.train.export import save_weights, write_run_card
from imagefm.train.metrics import MetricsLogger
from imagefm.train.optim import ExponentialMovingAverage, build_optimizer, build_scheduler
from imagefm.train.stages import apply_stage, merge_lora
from imagefm.train.state import Progress, restore_rng
from imagefm.train.tasks import Task
from imagefm.train.wise import apply_wise, starting_weights

__all__ = ["LoaderFactory", "StopTraining", "Trainer", "TrainingError", "as_loader_factory",
           "batch_rows", "save_weights", "seed_everything", "to_device"]


class Trainer:
    """Trains ``model`` on ``task`` with the settings of ``config`` (see TrainConfig).

    ``eval_loader``: held-out batches for ``eval/loss``; ``evaluators``: ``evaluator(model) ->
    {"eval/...": value}``; ``callbacks``: objects with ``on_evaluate(trainer, step, metrics)``
    (train/evaluation.py).
    """

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig,
                 make_loader: LoaderFactory | Iterable[dict], *,
                 eval_loader: LoaderFactory | Iterable[dict] | None = None,
                 evaluators: Sequence[Evaluator] = (), callbacks: Sequence[Any] = ()) -> None:
        self.config, self.task = config, task
        self.make_loader = as_loader_factory(make_loader)
        self.evaluation = Evaluation(
            config, as_loader_factory(eval_loader) if eval_loader is not None else None,
            evaluators, callbacks)
        self.dist = distributed.current()
        self.device = distributed.resolve_device(config.run.device, self.dist)
        self.autocast_dtype = resolve_precision(config.train.precision, self.device)
        self.run_dir = config.run_dir
        # Contrastive steps run GradCache when chunked, or when accumulated over micro-batches.
        self.gradcache = is_contrastive(task) and (config.train.gradcache_chunk > 0
                                                   or config.train.accumulate > 1)
        if config.train.gradcache_chunk > 0 and not is_contrastive(task):
            raise ConfigError(f"train.gradcache_chunk needs a task with embed/embedding_loss; "
                              f"{type(task).__name__} has none")
        if self.gradcache and self.dist.enabled and config.train.strategy == "fsdp":
            raise ConfigError("contrastive training with train.accumulate > 1 or "
                              "train.gradcache_chunk runs GradCache, which needs "
                              "train.strategy=ddp")

        lr_mults = apply_stage(model, config.stage)  # freezing happens before any wrapping
        if config.model.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        self.model = model.to(self.device)  # the bare model: saving, EMA, after_step
        if config.model.compile:
            self.model.compile()  # in place: state-dict names stay the same
        # What the task calls, and parameters whose gradients no wrapper averages over ranks.
        self.wrapped, self.unsynced = self._wrap(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config.optim, lr_mults)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.train.steps)
        self.ema = (ExponentialMovingAverage(self.model, config.train.ema_decay)
                    if config.train.ema_decay > 0 else None)
        self.deferred_sync = self._resolve_host_sync(config.train.host_sync)
        self._pending: list[dict[str, Any]] = []  # records not yet read back (host_sync=log)
        self._window = (time.perf_counter(), 0)  # (since, samples) of the pending records
        self.progress = Progress()
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main,
                                    tensorboard=config.run.tensorboard, wandb=config.run.wandb,
                                    wandb_project=config.run.wandb_project,
                                    config=config.to_dict())
        self._rng_to_restore: dict[str, Any] | None = None
        self._wise_start: dict[str, torch.Tensor] | None = None  # stage.wise_alpha's start
        self._bar: Any = None
        self._postfix: dict[str, str] = {}

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train until ``train.steps`` (or a clean stop); return the run folder."""
        try:
            self._start_run()
            self._train()
        finally:
            self.logger.close()  # also when a callback's exception (e.g. a pruned trial) ends it
        return self.run_dir

    def _train(self) -> None:
        steps, progress = self.config.train.steps, self.progress
        self._bar = self._progress_bar()
        start = last_saved = progress.step if progress.step else None
        clock = time.perf_counter()
        stopped = False
        try:
            micro_batches = self._batches() if progress.step < steps else iter(())
            while progress.step < steps:
                group = list(itertools.islice(micro_batches, self.config.train.accumulate))
                if self._rng_to_restore is not None:  # a resumed run: continue the random streams
                    restore_rng(self._rng_to_restore)
                    self._rng_to_restore = None
                record = self.train_step([batch for _, _, batch in group])
                progress.step += 1
                epoch, index, _ = group[-1]
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                samples = record.pop("samples")
                progress.samples += samples
                now = time.perf_counter()  # the step's time includes waiting for its batches
                elapsed, clock = max(now - clock, 1e-9), now
                record.update(epoch=epoch, samples_per_s=samples / elapsed)
                self._report(record, samples)
                if self.evaluation.due(progress.step):
                    self.evaluate()
                if progress.step % self.config.run.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = progress.step
                if self.evaluation.last_step == progress.step or last_saved == progress.step:
                    clock = time.perf_counter()  # not part of the next step's speed
        except StopTraining as reason:
            stopped = True
            self._say(f"stopping at step {progress.step}: {reason}")
        finally:
            self._bar.close()
        if (not stopped and progress.step != start and self.evaluation.enabled
                and self.evaluation.last_step != progress.step):
            try:
                self.evaluate()  # the end of the run is always evaluated
            except StopTraining:
                pass  # the run ends here anyway
        if last_saved != progress.step:
            self.save_checkpoint()
        self.export()

    def evaluate(self) -> dict[str, float]:
        """Evaluate now (every rank must call this); raises StopTraining to end the run."""
        metrics = self.evaluation.evaluate(self)
        shown = metrics.get(self.config.eval.metric)
        if shown is not None and self._bar is not None:
            self._postfix[self.config.eval.metric.replace("/", "_")] = f"{shown:.4g}"
            self._bar.set_postfix(self._postfix, refresh=False)
        return metrics

    def train_step(self, batch: dict | list[dict]) -> dict[str, Any]:
        """One optimizer step on one batch, or on a list of ``train.accumulate``
        micro-batches; returns the step's metrics."""
        batches = [batch] if isinstance(batch, dict) else list(batch)
        # Per-example losses weigh accumulated micro-batches by their loss terms, counted on
        # the host batches (no device sync).
        weights = ([loss_weight(self.task, b) for b in batches]
                   if len(batches) > 1 and not self.gradcache else [1.0] * len(batches))
        batches = [to_device(b, self.device) for b in batches]
        self.wrapped.train()
        # DDP / FSDP average the gradients over ranks in the (last) backward...
        loss, metrics = accumulated_backward(
            self.wrapped, self.task, batches, weights, contrastive=self.gradcache,
            chunk=self.config.train.gradcache_chunk, autocast=self.autocast)
        distributed.average_gradients(self.unsynced)  # ...except these
        if self.deferred_sync:
            loss_value, grad_norm, bad = self._optimizer_step_on_device(loss)
            # Stepped unconditionally (no host branch): a skipped step left the weights as they
            # were, so the clamp changes nothing and the EMA moves towards the same weights.
            stepped, extra = True, {"bad": bad, **metrics}
        else:
            loss_value = distributed.mean_over_ranks(loss.detach().float()).item()
            grad_norm = self._clip_gradients()
            stepped = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if stepped:
                self.optimizer.step()
                self.progress.bad_steps_in_row = 0
            else:
                self._count_bad_step(loss_value, grad_norm)
            extra = {"skipped_steps": self.progress.skipped_steps,
                     **{k: _as_float(v) for k, v in metrics.items()}}
        if stepped:
            after_step = getattr(self.task, "after_step", None)
            if after_step is not None:
                after_step(self.wrapped)
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        # The base learning rate of this step (groups scale it by their stage multiplier).
        lr = self.config.optim.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.step()
        return {"step": self.progress.step + 1, "loss": loss_value, "lr": lr,
                "grad_norm": grad_norm,
                "samples": sum(batch_rows(b) for b in batches) * self.dist.world_size, **extra}

    def _optimizer_step_on_device(self, loss: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip and step without reading anything back (``train.host_sync=log``): the fused
        AdamW skips a non-finite step itself (``found_inf``). Returns loss, gradient norm and
        the non-finite flag as device tensors, which :meth:`_flush` reads a window at a time."""
        loss_value = distributed.mean_over_ranks(loss.detach().float())
        grad_norm = distributed.clip_grad_norm_on_device(
            self.params, self.config.optim.grad_clip or math.inf)
        bad = ~(torch.isfinite(loss_value) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        return loss_value, grad_norm, bad

    def _flush(self) -> dict[str, Any] | None:
        """Read the pending records back (one sync), count their skipped steps (stopping the
        run after too many in a row) and return the last one, host values only."""
        if not self._pending:
            return None
        tensors = [(k, v) for r in self._pending for k, v in r.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1]
        values = torch.stack([v.detach().float().reshape(()) for _, v in tensors]).tolist() \
            if tensors else []
        read = iter(values)
        since, samples = self._window
        throughput = samples / max(time.perf_counter() - since, 1e-9)
        records, self._pending = self._pending, []
        self._window = (time.perf_counter(), 0)
        for record in records:
            for key, value in record.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    record[key] = next(read)
            if record.pop("bad"):
                self._count_bad_step(record["loss"], record["grad_norm"], record["step"])
            else:
                self.progress.bad_steps_in_row = 0
            record["skipped_steps"] = self.progress.skipped_steps
            record["samples_per_s"] = throughput  # the window's: its steps ran unsynchronised
        return records[-1]

    # --- pieces of a step ------------------------------------------------------------------------

    def _resolve_host_sync(self, choice: str) -> bool:
        fused = bool(self.optimizer.defaults.get("fused"))
        if choice == "log" and not fused:
            raise ConfigError("train.host_sync=log needs the fused AdamW, which these parameters "
                              "cannot use (FSDP-sharded?): set train.host_sync=step")
        return choice == "log" or (choice == "auto" and fused and self.device.type == "cuda")

    def autocast(self):
        """The mixed-precision context of training (and of the held-out loss)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _clip_gradients(self) -> float:
        """The global gradient norm (clipped to ``optim.grad_clip`` when that is > 0)."""
        return distributed.clip_grad_norm(self.params, self.config.optim.grad_clip or math.inf)

    def _count_bad_step(self, loss_value: float, grad_norm: float,
                        step: int | None = None) -> None:
        progress, limit = self.progress, self.config.train.max_bad_steps
        step = progress.step + 1 if step is None else step
        progress.skipped_steps += 1
        progress.bad_steps_in_row += 1
        self._say(f"step {step}: non-finite loss {loss_value} / gradient norm {grad_norm}; step "
                  f"skipped ({progress.skipped_steps} so far)")
        if progress.bad_steps_in_row > limit:
            raise TrainingError(
                f"{progress.bad_steps_in_row} non-finite losses in a row (step "
                f"{step}); stopping. Lower optim.lr, raise optim.warmup_steps, try "
                f"train.precision=fp32 or check the data; train.max_bad_steps={limit} sets how "
                f"many are tolerated. Resume from the last checkpoint with run.resume=true.")

    def _say(self, message: str) -> None:
        """A line for the user (rank 0), printed above the progress bar."""
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    def _report(self, record: dict[str, Any], samples: int = 0) -> None:
        bar = self._bar
        bar.update(1)
        if self.deferred_sync:
            since, counted = self._window
            self._window = (since, counted + samples)
            self._pending.append(record)
            if self.progress.step % self.config.run.log_every:
                return
            record = self._flush()
        if record["loss"] is not None and math.isfinite(record["loss"]):
            # tqdm shows the ETA of train.steps; samples/s counts every rank's micro-batches.
            self._postfix.update(loss=f"{record['loss']:.4f}",
                                 samples_s=f"{record['samples_per_s']:.0f}")
            bar.set_postfix(self._postfix, refresh=False)
        if self.progress.step % self.config.run.log_every == 0:
            self.logger.log(record)

    # --- data ------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index in epoch, micro-batch) forever, from where a resumed run stopped;
        under torch.distributed every rank ends each epoch together."""
        return epoch_batches(self.make_loader, self.progress.epoch, self.progress.batch_in_epoch)

    # --- run folder, checkpoints, export ---------------------------------------------------------

    def _start_run(self) -> None:
        """Create the run folder, save the config, resume or refuse to overwrite a run."""
        checkpoint = run_state.latest_checkpoint(self.run_dir)
        if checkpoint is not None and not self.config.run.resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume "
                              f"(run.resume=true) to continue it, or choose another run.name")
        distributed.barrier()  # every rank has looked before rank 0 writes anything
        if self.dist.is_main:
            from imagefm.checkpoint import atomic_write_text

            if checkpoint is not None:
                self._say_what_changed(self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "config.yaml", self.config.to_yaml())
        seed_everything(self.config.run.seed + self.dist.rank)
        if checkpoint is not None:
            self.progress, self._rng_to_restore, _ = run_state.load_run_state(
                checkpoint, model=self.wrapped, optimizer=self.optimizer,
                scheduler=self.scheduler, ema=self.ema)
            self.logger.keep_until(self.progress.step)
            if self.dist.is_main:
                print(f"resumed {self.run_dir} at step {self.progress.step} "
                      f"(epoch {self.progress.epoch}, batch {self.progress.batch_in_epoch})")
        elif self.config.run.resume and self.dist.is_main:
            print(f"run.resume: no checkpoint in {self.run_dir}; starting from step 0")
        if self.config.stage.wise_alpha is not None:  # kept before the first step
            self._wise_start = starting_weights(self.model, self.run_dir, checkpoint is None,
                                                write=self.dist.is_main)

    def _say_what_changed(self, saved: Path) -> None:
        """A resumed run continues exactly only with the settings it was started with; name the
        ones that differ (a new ``train.steps`` re-plans the learning-rate schedule from here)."""
        try:
            before = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError):
            return
        changes = [(key, old, new) for key, old, new
                   in changed_settings(before, self.config.to_dict()) if key != "run.resume"]
        if changes:
            print("resuming with changed settings: "
                  + "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes))
            if any(key == "train.steps" or key.startswith("optim.") for key, _, _ in changes):
                print("  the learning-rate schedule is re-planned over the new settings from "
                      "this step, so the run will differ from one uninterrupted run")

    def save_checkpoint(self) -> Path:
        """Write a run checkpoint for the current step (every rank must call this)."""
        self._flush()  # host_sync=log: skipped steps counted before they are saved
        path = run_state.save_run_state(
            run_state.checkpoint_path(self.run_dir, self.progress.step), model=self.wrapped,
            optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
            progress=self.progress, config=self.config.to_dict(),
            keep_last=self.config.run.keep_last)
        self.logger.plot()
        return path

    def export(self) -> None:
        """Save the final weights as a model checkpoint: ``final/`` (and ``final_ema/``).

        LoRA updates are merged into the weights first (in place: the run is over), so the
        exported model is an ordinary one; with ``stage.wise_alpha`` the weights are first
        interpolated with those the run started from (WiSE-FT).
        """
        merge_lora(self.model)
        alpha = self.config.stage.wise_alpha
        if alpha is not None and self._wise_start is not None:
            count = apply_wise(self.model, self._wise_start, alpha)
            self._say(f"stage.wise_alpha: final/ = {1 - alpha:g} x starting + {alpha:g} x "
                      f"trained weights ({count} tensors)")
        # Gathering sharded weights is a collective: every rank takes part, rank 0 writes.
        fsdp = distributed.is_fsdp(self.model)
        weights = run_state.full_model_state(self.model) if fsdp else None
        ema = self.ema.state_dict() if self.ema is not None else None
        if self.dist.is_main:
            save_weights(self.model, weights, self.run_dir / "final")
            if ema is not None:
                save_weights(self.model, ema, self.run_dir / "final_ema")
            for name in ("final", "final_ema") if ema is not None else ("final",):
                write_run_card(self.model, self.config, self.run_dir / name)
            self.logger.plot()
        distributed.barrier()

    @property
    def checkpoints(self) -> list[Path]:
        return run_state.list_checkpoints(self.run_dir)

    # --- set-up helpers --------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        if not self.dist.enabled:
            return model, []
        if self.gradcache:  # several backward passes per step: we average gradients ourselves
            distributed.broadcast_parameters(model)
            return model, [p for p in model.parameters() if p.requires_grad]
        return distributed.wrap_model(model, self.config.train.strategy, self.device)

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.config.train.steps, initial=self.progress.step, unit="step",
                    disable=not (self.dist.is_main and self.config.run.progress),
                    dynamic_ncols=True, desc=self.config.run.name)


# --- helpers -------------------------------------------------------------------------------------

def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported (``auto``/``bf16``), None for fp32."""
    if choice == "fp32":
        return None
    supported = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if choice == "bf16" and not supported:
        raise ConfigError("train.precision=bf16 but this GPU has no bfloat16; use fp32")
    return torch.bfloat16 if supported else None


def changed_settings(before: Any, after: Any, prefix: str = ""
                     ) -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, after)`` for every leaf that differs between two config dicts."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in dict.fromkeys([*before, *after])
                for change in changed_settings(before.get(key), after.get(key),
                                               f"{prefix}{key}.")]
    return [] if before == after else [(prefix.rstrip("."), before, after)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
