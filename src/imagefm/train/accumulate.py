"""Gradient accumulation: one optimizer step over ``train.accumulate`` micro-batches that equals
one step over their union (the whole ``data.batch_size``).

Each rank's loader yields micro-batches of ``data.batch_size / (world size * accumulate)`` rows
(``imagefm.train.data.micro_batch_size``); the Trainer hands ``accumulate`` of them at a time to
:func:`accumulated_backward`. Two kinds of loss, two ways to make the step exact:

- Per-example losses (the VLM's next-token loss; any task without ``embed``). The loss of the
  whole batch is the mean over all its loss terms, so each micro-batch's mean loss is weighted
  by its share of them and backpropagated on its own: ``task.loss_weight(batch)`` terms when the
  task says (the VLM task: labelled tokens), else its rows. The weights are counted on the
  host batches before they move to the device (no device sync). Under DDP the gradients are
  all-reduced once, by the last micro-batch's backward (``no_sync`` before it).
- Contrastive losses (tasks with ``embed`` / ``embedding_loss``). Every example of the step is
  compared with every other, so a micro-batch has no loss of its own: the step runs GradCache
  (train/gradcache.py) over all the micro-batches together. They are its chunks, each split
  further into ``train.gradcache_chunk`` rows when that is set. So the two settings combine:
  ``accumulate`` says how many micro-batches make one step's batch (the data, e.g. a loader
  that can only give small batches), ``gradcache_chunk`` the most rows one forward pass with a
  graph holds (the memory). Either alone (or both) gives the full-batch gradients; the
  micro-batches are never concatenated, so they may differ in shape (text padding). Under
  torch.distributed the loss is the distributed loss over every rank's embeddings of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from imagefm.train.batches import batch_rows
from imagefm.train.gradcache import gradcache_chunks_backward, split_batch
from imagefm.train.tasks import Metrics


def is_contrastive(task: Any) -> bool:
    """Whether ``task``'s loss couples the rows of a batch (it then runs under GradCache)."""
    return hasattr(task, "embed") and hasattr(task, "embedding_loss")


def loss_weight(task: Any, batch: dict) -> float:
    """How many loss terms ``batch`` holds: ``task.loss_weight(batch)`` if the task has it,
    else the batch's rows."""
    weigh = getattr(task, "loss_weight", None)
    return float(weigh(batch)) if weigh is not None else float(batch_rows(batch))


def accumulated_backward(model: nn.Module, task: Any, batches: list[dict],
                         weights: list[float], *, contrastive: bool, chunk: int = 0,
                         autocast: Callable[[], AbstractContextManager] = nullcontext,
                         ) -> tuple[torch.Tensor, Metrics]:
    """Accumulate into ``.grad`` the gradient of the loss over all of ``batches`` (one
    optimizer step); return that loss (detached) and the step's metrics.

    ``weights`` are the micro-batches' loss terms (:func:`loss_weight`), for per-example
    losses. ``contrastive``: train with GradCache, in chunks of ``chunk`` rows (0: one chunk
    per micro-batch).
    """
    if contrastive:
        chunks = [part for batch in batches
                  for part in (split_batch(batch, chunk) if chunk else [batch])]
        return gradcache_chunks_backward(model, task, chunks, autocast)
    if len(batches) == 1:  # no accumulation: the plain step
        with autocast():
            loss, metrics = task.loss(model, batches[0])
        loss.backward()
        return loss.detach(), metrics
    total = sum(weights)
    # A micro-batch without loss terms adds nothing (and its mean loss would be 0/0): left out,
    # unless no micro-batch has any, when the whole step is as undefined as the large batch's.
    run = [i for i, w in enumerate(weights) if w > 0] if total > 0 else list(range(len(batches)))
    shares = [weights[i] / total if total > 0 else 1.0 / len(run) for i in run]
    loss_sum: torch.Tensor | float = 0.0
    collected: list[Metrics] = []
    for position, (index, share) in enumerate(zip(run, shares, strict=True)):
        with _gradient_sync(model, enabled=position == len(run) - 1):
            with autocast():
                loss, metrics = task.loss(model, batches[index])
            (loss * share).backward()
        loss_sum = loss_sum + loss.detach().float() * share
        collected.append(metrics)
    return torch.as_tensor(loss_sum), combine_metrics(collected, shares)


def combine_metrics(collected: list[Metrics], shares: list[float]) -> Metrics:
    """One step's metrics from its micro-batches': integer values are counts and add up
    (``label_tokens``), other numbers are averaged with the loss shares."""
    combined: Metrics = {}
    for key in dict.fromkeys(k for metrics in collected for k in metrics):
        values = [(m[key], share) for m, share in zip(collected, shares, strict=True) if key in m]
        first = values[0][0]
        if _is_count(first):
            combined[key] = sum(v for v, _ in values)
        elif isinstance(first, (float, torch.Tensor)):
            weight = sum(share for _, share in values)
            combined[key] = sum(_as_number(v) * share for v, share in values) / weight
        else:
            combined[key] = values[-1][0]
    return combined


def _is_count(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, int) and not isinstance(value, bool)


def _as_number(value: Any) -> Any:
    return value.detach().float() if isinstance(value, torch.Tensor) else value


@contextmanager
def _gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let the wrapper all-reduce gradients in this backward (or not: DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``). Unwrapped models have nothing to switch."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    switch = getattr(model, "set_requires_gradient_sync", None)
    if switch is None:
        yield
        return
    switch(False)
    try:
        yield
    finally:
        switch(True)
