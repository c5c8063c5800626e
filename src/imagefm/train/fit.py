"""A small optimisation loop for short fits inside an app: few-shot adaptation (LoRA, full
fine-tuning, CoOp's context, Tip-Adapter-F's cache keys).

    optimizer = build_optimizer(module, config, lr_mults)
    result = fit(optimizer, config, steps, loss_fn, evaluate=val_accuracy, eval_every=25)

It is the Trainer's step in miniature, from the same pieces (``train/optim.py``): the
cosine-with-warmup schedule of ``build_scheduler`` (``config.warmup_steps``,
``config.min_lr_ratio``), global-norm gradient clipping at ``config.grad_clip`` (0: off). What
it adds for fits judged on held-out data: ``evaluate`` runs at step 0, every ``eval_every``
steps and at the last step, and the weights with the best score (the earliest on ties) are put
back at the end. What it leaves out: data loaders, checkpoints, distributed training,
mixed precision — a few hundred steps on cached data need none of them (a real training run
is the Trainer's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from imagefm.train.config import OptimConfig
from imagefm.train.distributed import clip_grad_norm_on_device
from imagefm.train.optim import build_scheduler

# Fits this long (or longer) show a progress bar (on a terminal) unless told otherwise.
PROGRESS_FROM_STEPS = 100


@dataclass
class FitResult:
    steps: int  # optimizer steps taken
    loss: float  # the last step's loss
    best_step: int = 0  # the step whose weights were kept (0: the starting weights)
    best_score: float | None = None  # evaluate() at best_step; None without evaluate
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, score)
    seconds: float = 0.0


def fit(optimizer: torch.optim.Optimizer, config: OptimConfig, steps: int,
        loss_fn: Callable[[int], torch.Tensor], *,
        evaluate: Callable[[], float] | None = None, eval_every: int = 0,
        progress: bool | None = None, desc: str = "fit") -> FitResult:
    """Take ``steps`` optimizer steps on ``loss_fn(step)`` (step = 1 … steps).

    ``loss_fn`` draws its own batch and returns a scalar loss; it runs with gradients enabled
    (and should put the model in training mode if that matters). With ``evaluate`` (a score,
    higher is better; it runs under ``torch.no_grad``), the parameters of ``optimizer`` end at
    their best-scoring values. ``progress``: a tqdm bar; ``None`` = for fits of
    ``PROGRESS_FROM_STEPS`` steps or more, on a terminal only.
    """
    started = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = build_scheduler(optimizer, config, steps)

    def score() -> float:
        with torch.no_grad():
            return float(evaluate())  # type: ignore[misc]

    result = FitResult(steps=0, loss=float("nan"))
    best_state: list[torch.Tensor] | None = None
    if evaluate is not None:
        result.best_score = score()
        result.history.append((0, result.best_score))
        best_state = [p.detach().clone() for p in params]
    show = (None if steps >= PROGRESS_FROM_STEPS else False) if progress is None else progress
    bar = tqdm(total=steps, desc=desc, leave=False, disable=None if show is None else not show)
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(step)
            loss.backward()
        if config.grad_clip > 0:
            clip_grad_norm_on_device(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.update()
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            value = score()
            result.history.append((step, value))
            assert result.best_score is not None
            if value > result.best_score:
                result.best_score, result.best_step = value, step
                best_state = [p.detach().clone() for p in params]
            bar.set_postfix(score=f"{value:.3f}", best=f"{result.best_score:.3f}")
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, best_state, strict=True):
                p.copy_(saved)
    result.steps, result.loss = steps, float(loss.detach())
    result.seconds = time.perf_counter() - started
    return result
