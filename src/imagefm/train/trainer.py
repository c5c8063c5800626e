"""The one training loop. It knows nothing of CLIP: a Task turns a batch into (loss, metrics).

    trainer = Trainer(model, ContrastiveTask("clip"), config, make_loader)
    trainer.fit()            # -> the run folder

One step: batch -> device -> task loss (under autocast; GradCache when configured) -> backward
-> gradient norm (clipped) -> skip if non-finite, else optimizer step + task.after_step + EMA
-> scheduler -> metrics, progress bar, checkpoint every ``run.checkpoint_every`` steps.
With ``train.host_sync=log`` (auto on CUDA) nothing of a step is read back to the host: the
fused AdamW skips a non-finite step on the device, and loss, gradient norm and skipped steps
are read once per ``run.log_every`` steps.

``make_loader(epoch)`` returns an iterable of batch dicts for that epoch (a DataLoader works
too). For an exact ``run.resume`` it must be deterministic given the epoch: the Trainer records
(epoch, batches consumed) and, on resume, re-creates that epoch's loader and skips the batches
already trained on. Every step is one batch; ``train.steps`` counts batches, including any
skipped for a non-finite loss.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from imagefm.checkpoint import write_model_card
from imagefm.config import ConfigError
from imagefm.hub import parse_hub_id
from imagefm.model_card import CARD_FILE
from imagefm.train import distributed
from imagefm.train import state as run_state
from imagefm.train.config import TrainConfig
from imagefm.train.gradcache import gradcache_backward
from imagefm.train.metrics import MetricsLogger
from imagefm.train.optim import ExponentialMovingAverage, build_optimizer, build_scheduler
from imagefm.train.stages import apply_stage, merge_lora
from imagefm.train.state import Progress, restore_rng
from imagefm.train.tasks import Task

LoaderFactory = Callable[[int], Iterable[dict]]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class Trainer:
    """Trains ``model`` on ``task`` with the settings of ``config`` (see TrainConfig)."""

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig,
                 make_loader: LoaderFactory | Iterable[dict]) -> None:
        self.config, self.task = config, task
        self.make_loader = as_loader_factory(make_loader)
        self.dist = distributed.current()
        self.device = distributed.resolve_device(config.run.device, self.dist)
        self.autocast_dtype = resolve_precision(config.train.precision, self.device)
        self.run_dir = config.run_dir
        self.gradcache = config.train.gradcache_chunk > 0
        if self.gradcache and not hasattr(task, "embed"):
            raise ConfigError(f"train.gradcache_chunk needs a task with embed/embedding_loss; "
                              f"{type(task).__name__} has none")

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
                                    tensorboard=config.run.tensorboard)
        self._rng_to_restore: dict[str, Any] | None = None

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train until ``train.steps``; return the run folder."""
        self._start_run()
        steps, progress = self.config.train.steps, self.progress
        bar = self._progress_bar()
        last_saved = progress.step if progress.step else None
        clock = time.perf_counter()
        try:
            batches = self._batches() if progress.step < steps else iter(())
            for epoch, index, batch in batches:
                if self._rng_to_restore is not None:  # a resumed run: continue the random streams
                    restore_rng(self._rng_to_restore)
                    self._rng_to_restore = None
                record = self.train_step(batch)
                progress.step += 1
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                samples = record.pop("samples")
                progress.samples += samples
                now = time.perf_counter()  # the step's time includes waiting for its batch
                elapsed, clock = max(now - clock, 1e-9), now
                record.update(epoch=epoch, samples_per_s=samples / elapsed)
                self._report(record, bar, samples)
                if progress.step % self.config.run.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = progress.step
                    clock = time.perf_counter()  # saving is not part of the next step's speed
                if progress.step >= steps:
                    break
        finally:
            bar.close()
        if last_saved != progress.step:
            self.save_checkpoint()
        self.export()
        self.logger.close()
        return self.run_dir

    def train_step(self, batch: dict) -> dict[str, Any]:
        """One optimizer step on one batch; returns the step's metrics."""
        batch = to_device(batch, self.device)
        self.wrapped.train()
        if self.gradcache:
            loss, metrics = gradcache_backward(self.wrapped, self.task, batch,
                                               self.config.train.gradcache_chunk, self._autocast)
        else:
            with self._autocast():
                loss, metrics = self.task.loss(self.wrapped, batch)
            loss.backward()  # DDP / FSDP average the gradients over ranks here...
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
                "samples": batch_rows(batch) * self.dist.world_size, **extra}

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

    def _autocast(self):
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
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(f"step {step}: non-finite loss {loss_value} / gradient norm "
                       f"{grad_norm}; step skipped ({progress.skipped_steps} so far)")
        if progress.bad_steps_in_row > limit:
            raise TrainingError(
                f"{progress.bad_steps_in_row} non-finite losses in a row (step "
                f"{step}); stopping. Lower optim.lr, raise optim.warmup_steps, try "
                f"train.precision=fp32 or check the data; train.max_bad_steps={limit} sets how "
                f"many are tolerated. Resume from the last checkpoint with run.resume=true.")

    def _report(self, record: dict[str, Any], bar, samples: int = 0) -> None:
        bar.update(1)
        if self.deferred_sync:
            since, counted = self._window
            self._window = (since, counted + samples)
            self._pending.append(record)
            if self.progress.step % self.config.run.log_every:
                return
            record = self._flush()
        if record["loss"] is not None and math.isfinite(record["loss"]):
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            samples_s=f"{record['samples_per_s']:.0f}", refresh=False)
        if self.progress.step % self.config.run.log_every == 0:
            self.logger.log(record)

    # --- data ------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index in epoch, batch) forever, skipping batches a resumed run already did."""
        epoch, skip = self.progress.epoch, self.progress.batch_in_epoch
        while True:
            produced = 0
            for index, batch in enumerate(self.make_loader(epoch)):
                produced += 1
                if index >= skip:
                    yield epoch, index, batch
            if produced == 0:
                raise TrainingError(f"make_loader({epoch}) yielded no batches: the data source "
                                    f"is empty (or smaller than one batch)")
            epoch, skip = epoch + 1, 0

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
        exported model is an ordinary one.
        """
        merge_lora(self.model)
        # Gathering sharded weights is a collective: every rank takes part, rank 0 writes.
        fsdp = distributed.is_fsdp(self.model)
        weights = run_state.full_model_state(self.model) if fsdp else None
        ema = self.ema.state_dict() if self.ema is not None else None
        if self.dist.is_main:
            save_weights(self.model, weights, self.run_dir / "final")
            if ema is not None:
                save_weights(self.model, ema, self.run_dir / "final_ema")
            for name in ("final", "final_ema") if ema is not None else ("final",):
                self._write_card(self.run_dir / name)
            self.logger.plot()
        distributed.barrier()

    def _write_card(self, directory: Path) -> None:
        """The model card of a finished run says what it was trained on and from what."""
        if not (directory / CARD_FILE).is_file():
            return  # bare weights: no imagefm checkpoint, no card
        data, model = self.config.data, self.config.model
        source = data.source + (f" ({data.path})" if data.path else "")
        facts: dict[str, Any] = {"training_data": [
            f"{source}: {self.config.train.steps} steps of {data.batch_size} "
            f"(stage {self.config.stage.preset}, run {self.config.run.name})"]}
        hub_id = parse_hub_id(model.init) if model.init else None
        if hub_id is not None:
            facts["base_model"] = hub_id[0]
        write_model_card(self.model, directory, **facts)

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

def as_loader_factory(source: LoaderFactory | Iterable[dict]) -> LoaderFactory:
    """Accept ``make_loader(epoch)`` or a re-iterable such as a DataLoader."""
    if callable(source) and not hasattr(source, "__iter__"):
        return source

    def make_loader(epoch: int) -> Iterable[dict]:
        # Loaders that reshuffle per epoch say so with set_epoch (imagefm.data's loaders),
        # DataLoaders through their sampler (DistributedSampler).
        for owner in (source, getattr(source, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        return source

    return make_loader


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported (``auto``/``bf16``), None for fp32."""
    if choice == "fp32":
        return None
    supported = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if choice == "bf16" and not supported:
        raise ConfigError("train.precision=bf16 but this GPU has no bfloat16; use fp32")
    return torch.bfloat16 if supported else None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


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


def save_weights(model: nn.Module, state: dict[str, torch.Tensor] | None,
                 directory: Path) -> None:
    """Save ``model`` (with ``state`` instead of its own weights, if given) to ``directory``.

    Models with ``save_pretrained`` become imagefm checkpoints; to save other weights into one,
    a CPU copy is rebuilt as ``type(model)(model.config, model.card)``. Anything else is saved
    as bare safetensors weights.
    """
    if state is not None and hasattr(model, "save_pretrained"):
        try:
            copy = type(model)(model.config, getattr(model, "card", None))
        except (AttributeError, TypeError):
            copy = None
        if copy is not None:
            copy.load_state_dict(state)
            copy.tokenizer = getattr(model, "tokenizer", None)
            model, state = copy, None
    if state is None and hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        return
    from imagefm.checkpoint import save_state_dict

    save_state_dict(state if state is not None else model.state_dict(),
                    directory / "model.safetensors")


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
