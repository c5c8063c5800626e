"""GradCache: contrastive batches larger than memory, with exactly the full-batch gradients.

A contrastive loss couples every example with every other, so it cannot be split into
independent micro-batches. But it depends on the model only through the embeddings (and the
shared temperature/bias). So (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup"):

1. embed the whole batch chunk by chunk WITHOUT a graph (activation memory of one chunk);
2. compute the loss over all embeddings and backpropagate to the embeddings only: this caches
   dL/d(embedding) for every row (and dL/d(shared tensor));
3. re-run each chunk WITH a graph and backpropagate its cached embedding gradients; parameter
   gradients accumulate chunk by chunk. By the chain rule their sum is the full-batch gradient.

The shared tensors (e.g. ``exp(logit_scale)``) are the same in every chunk, so their cached
gradient is pushed through one chunk's graph only.

Under torch.distributed the loss of step 2 is the distributed loss over gathered embeddings, so
each rank's cached gradients already include the other ranks' terms. The re-runs then make
several backward passes per step, which DistributedDataParallel's reducer does not expect; the
Trainer therefore does not wrap the model in DDP under GradCache and averages gradients itself
afterwards (``imagefm.train.distributed.average_gradients``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from imagefm.train.tasks import Embeddings, Metrics


def split_batch(batch: dict, chunk_size: int) -> list[dict]:
    """Split every tensor (and list) in ``batch`` into chunks of ``chunk_size`` rows."""
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch entries have different numbers of rows: {sorted(sizes)}")
    total = sizes.pop()
    return [{k: (v[start:start + chunk_size] if isinstance(v, (torch.Tensor, list, tuple))
                 else v) for k, v in batch.items()}
            for start in range(0, total, chunk_size)]


def gradcache_backward(
    model: nn.Module,
    task,
    batch: dict,
    chunk_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, Metrics]:
    """Accumulate the full-batch gradient of ``task``'s loss into ``.grad``; return loss, metrics.

    ``task`` needs ``embed(model, batch) -> Embeddings`` and ``embedding_loss(Embeddings)``.
    ``autocast`` makes the mixed-precision context; both passes use it, so the re-run
    reproduces the cached embeddings.
    """
    return gradcache_chunks_backward(model, task, split_batch(batch, chunk_size), autocast)


def gradcache_chunks_backward(
    model: nn.Module,
    task,
    chunks: list[dict],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, Metrics]:
    """:func:`gradcache_backward` over a batch given as its ``chunks`` (the micro-batches of an
    accumulated step, which need not have the same shapes: only their embeddings are joined)."""
    # 1. Embeddings of every chunk, without a graph.
    with torch.no_grad(), autocast():
        cached = [task.embed(model, chunk) for chunk in chunks]

    # 2. The loss over the whole batch; gradients stop at the embeddings (they are leaves).
    rows = {k: torch.cat([c.rows[k] for c in cached]).requires_grad_() for k in cached[0].rows}
    shared = {k: (v.detach().requires_grad_() if v is not None else None)
              for k, v in cached[0].shared.items()}
    loss, metrics = task.embedding_loss(Embeddings(rows, shared))
    loss.backward()
    row_grads = {k: v.grad.split([len(c.rows[k]) for c in cached]) for k, v in rows.items()
                 if v.grad is not None}
    shared_grads = {k: v.grad for k, v in shared.items() if v is not None and v.grad is not None}

    # 3. Re-run each chunk with a graph and push the cached gradients through it.
    for index, chunk in enumerate(chunks):
        with autocast():
            embedded = task.embed(model, chunk)
        outputs, grads = [], []
        for key, grad in row_grads.items():
            outputs.append(embedded.rows[key])
            grads.append(grad[index])
        if index == 0:
            for key, grad in shared_grads.items():
                outputs.append(embedded.shared[key])
                grads.append(grad)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    return loss.detach(), metrics
