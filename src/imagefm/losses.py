"""Contrastive image–text losses: CLIP softmax (InfoNCE) and SigLIP sigmoid.

Both take L2-normalised features of matching pairs (row ``i`` of the image features belongs with
row ``i`` of the text features) and an already-exponentiated ``logit_scale``.

Under ``torch.distributed`` each rank passes its *local* batch and the loss sees the *global* batch
(every rank must pass the same local batch size). The scaling is chosen so that the usual DDP
recipe is exact:

    every rank calls ``loss.backward()`` on its own loss and the parameter gradients are then
    AVERAGED over ranks (what ``DistributedDataParallel`` does)
    ==> the averaged gradients equal those of one process computing the loss on the global batch,
        and the mean of the per-rank loss values equals the global loss.

Why this holds, with ``W`` ranks, local batch ``n`` and global batch ``N = W * n``: each rank's
loss ``L_r`` is a mean over its own ``n`` rows of per-row terms, and the global loss is the mean
over all ``N`` rows, so ``L = (1/W) * sum_r L_r``. A rank's features reach other ranks through a
collective whose backward pass sends the gradient home and sums it there, so the gradient that
lands on rank ``s``'s features is ``sum_r dL_r/dfeat_s``. Averaging over ranks then gives
``(1/W) * sum_r dL_r/dtheta = dL/dtheta`` for tower weights as well as for the replicated
``logit_scale`` / ``logit_bias``. No extra factor of ``W`` is needed anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

LossName = Literal["clip", "siglip"]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    distributed: bool | None = None,
    gather_with_grad: bool = True,
    local_loss: bool = True,
) -> torch.Tensor:
    """CLIP softmax contrastive loss: mean of image→text and text→image cross-entropy.

    ``logits = logit_scale * image_features @ text_features.T``; the target of row ``i`` is
    column ``i``. Features must be L2-normalised, shape ``(batch, dim)``.

    Distributed (``distributed=None`` auto-detects an initialised process group with more than
    one rank) — the features of all ranks are gathered so every image is contrasted with every
    text of the global batch:

    - ``local_loss=True``: only this rank's rows are computed (local images vs all texts, local
      texts vs all images, targets offset by ``rank * local_batch``), so memory is
      O(local_batch * global_batch). Each rank returns the mean over its own rows.
    - ``local_loss=False``: every rank computes the full global ``N x N`` loss (same value on
      every rank).
    - ``gather_with_grad=True``: gathered features carry gradients back to their owning rank.
      With either ``local_loss`` setting, DDP's gradient averaging then yields exactly the
      single-process gradient of the global batch (see the module docstring).
    - ``gather_with_grad=False`` (cheaper backward, as open_clip's default): gathered copies are
      detached. With ``local_loss=False`` the rank's own slice is re-inserted with its gradient,
      so after DDP averaging the ``logit_scale`` gradient is exact but tower gradients are the
      global ones divided by ``world_size`` (same direction). With ``local_loss=True`` the
      gradient through other ranks' rows is dropped: only an approximation of the global loss.
    """
    _check_pair(image_features, text_features)
    if not _use_distributed(distributed):
        logits_per_image = logit_scale * image_features @ text_features.T
        targets = torch.arange(image_features.shape[0], device=image_features.device)
        return _symmetric_cross_entropy(logits_per_image, logits_per_image.T, targets)

    rank, local_batch = dist.get_rank(), image_features.shape[0]
    all_images = _gather_rows(image_features, with_grad=gather_with_grad, local_loss=local_loss)
    all_texts = _gather_rows(text_features, with_grad=gather_with_grad, local_loss=local_loss)
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        offset = rank * local_batch
        targets = torch.arange(offset, offset + local_batch, device=image_features.device)
    else:
        logits_per_image = logit_scale * all_images @ all_texts.T
        logits_per_text = logits_per_image.T
        targets = torch.arange(all_images.shape[0], device=image_features.device)
    return _symmetric_cross_entropy(logits_per_image, logits_per_text, targets)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    distributed: bool | None = None,
) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss.

    ``logits = logit_scale * image_features @ text_features.T + logit_bias``, label ``+1`` on the
    diagonal (matching pairs) and ``-1`` elsewhere;
    ``loss = -sum(logsigmoid(label * logits)) / local_batch``  (sum over the whole matrix).

    Distributed (``distributed=None`` auto-detects): text features travel round a ring — each of
    ``world_size - 1`` steps sends the block held so far to the right neighbour and receives one
    from the left — and each received block adds its negative-only term against the local
    images. Memory stays O(local_batch^2) per step; gradients flow back round the ring to the
    rank that owns each text block.

    Scale: each rank divides by its LOCAL batch ``n``, whereas the global loss divides by
    ``N = world_size * n``; hence ``global = mean over ranks of the rank losses``, and DDP's
    gradient AVERAGING gives exactly the single-process global-batch gradients (features,
    ``logit_scale`` and ``logit_bias``) with no further factor.
    """
    _check_pair(image_features, text_features)
    loss = _sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias, True)
    if not _use_distributed(distributed):
        return loss

    world_size, rank = dist.get_world_size(), dist.get_rank()
    left, right = (rank - 1) % world_size, (rank + 1) % world_size
    received = text_features
    for _ in range(world_size - 1):
        received = _SendRightReceiveLeft.apply(received, left, right)
        # Blocks from other ranks hold no matching pair for our images: negatives only.
        loss = loss + _sigmoid_block_loss(image_features, received, logit_scale, logit_bias, False)
    return loss


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
             input_lengths: torch.Tensor | None = None, *, blank: int = 0) -> torch.Tensor:
    """Connectionist temporal classification loss of frame ``logits`` [B, T, classes] against
    padded ``targets`` [B, S] (the first ``target_lengths[b]`` of row b count), over all T frames
    unless ``input_lengths`` says otherwise. Each row's negative log-likelihood is divided by its
    target length, then averaged (``F.ctc_loss``'s ``mean``), in fp32 even under autocast; a row
    whose target cannot fit its frames gives 0, not inf (``zero_infinity``)."""
    if logits.ndim != 3 or targets.ndim != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"ctc_loss: logits [B, T, classes] and targets [B, S], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    batch, frames = logits.shape[:2]
    if input_lengths is None:
        input_lengths = torch.full((batch,), frames, dtype=torch.long)
    with torch.autocast(logits.device.type, enabled=False):
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, classes]
        return F.ctc_loss(log_probs, targets.long(), input_lengths.long().cpu(),
                          target_lengths.long().cpu(), blank=blank, reduction="mean",
                          zero_infinity=True)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": clip_loss, "siglip": siglip_loss}


def get_loss(name: LossName) -> Callable[..., torch.Tensor]:
    """Return the loss function called ``name`` (``"clip"`` or ``"siglip"``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


# --- pieces -------------------------------------------------------------------------------------


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of the same shape (batch, dim), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _use_distributed(distributed: bool | None) -> bool:
    """Whether to run the multi-rank path; a world of one rank needs no communication."""
    initialized = dist.is_available() and dist.is_initialized()
    if distributed and not initialized:
        raise RuntimeError(
            "distributed=True, but torch.distributed has no initialised process group"
        )
    if distributed is False or not initialized:
        return False
    return dist.get_world_size() > 1


def _symmetric_cross_entropy(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, targets)
    return (image_to_text + text_to_image) / 2


def _gather_rows(local: torch.Tensor, *, with_grad: bool, local_loss: bool) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows in rank order."""
    if with_grad:
        return _AllGatherRows.apply(local)
    blocks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(blocks, local.detach().contiguous())
    if not local_loss:
        # Keep a gradient path to our own features, or the full-matrix loss would train nothing.
        blocks[dist.get_rank()] = local
    return torch.cat(blocks, dim=0)


def _sigmoid_block_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    diagonal_is_positive: bool,
) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = -torch.ones_like(logits)
    if diagonal_is_positive:
        labels.diagonal().fill_(1.0)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    """Send ``tensor`` to one rank while receiving a tensor of the same shape from another."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, send_to),
        dist.P2POp(dist.irecv, received, receive_from),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _SendRightReceiveLeft(torch.autograd.Function):
    """One ring step: pass a block to the right neighbour, take the left neighbour's block.

    The gradient of the received block belongs to the left neighbour's input, so backward runs
    the same exchange in the opposite direction.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, left: int, right: int) -> torch.Tensor:  # type: ignore[override]
        ctx.left, ctx.right = left, right
        return _exchange(tensor, send_to=right, receive_from=left)

    @staticmethod
    def backward(ctx, grad_received: torch.Tensor):  # type: ignore[override]
        return _exchange(grad_received, send_to=ctx.left, receive_from=ctx.right), None, None


class _AllGatherRows(torch.autograd.Function):
    """All-gather along the batch dimension whose backward sends each block's gradient home.

    Every rank computes a gradient for every gathered block; the owner needs the SUM of them
    over ranks. Backward all-reduces and keeps its own rows: twice the traffic of a
    reduce-scatter, but supported by every backend (gloo included) and a small tensor beside
    the model's own gradients.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        local = local.contiguous()
        blocks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, local)
        ctx.start = dist.get_rank() * local.shape[0]
        ctx.stop = ctx.start + local.shape[0]
        return torch.cat(blocks, dim=0)

    @staticmethod
    def backward(ctx, grad_all: torch.Tensor):  # type: ignore[override]
        summed = grad_all.clone(memory_format=torch.contiguous_format)  # never edit grad in place
        dist.all_reduce(summed)
        return summed[ctx.start : ctx.stop]
