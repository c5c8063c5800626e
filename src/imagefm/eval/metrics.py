"""Ranking metrics from score matrices: top-k accuracy, per-class accuracy, confusion, recall@K.

Everything is built on one primitive, :func:`positive_ranks`: for each query (a row of scores) and
its set of correct candidates, the 0-based rank of the best correct candidate.

Ties count against the model. The rank is the number of *wrong* candidates scoring at least as
high as the best correct one, i.e. the position the correct answer gets when ties are broken in
the worst order. A model that gives every candidate the same score therefore scores 0 at top-1
(not 100 %, as a best-case rule would give, nor a value that depends on candidate order, as
``torch.topk`` would). NaN scores are treated as -inf: a NaN correct candidate is never found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """0-based rank of each row's best positive among its negatives (ties pessimistic).

    ``scores`` is ``[Q, N]`` (query × candidate), ``positives`` a boolean ``[Q, N]`` marking the
    correct candidates of each query; every row needs at least one. Rows are processed in chunks
    so a large similarity matrix never needs a second full-size temporary.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} "
                         "must be the same [queries, candidates] shape")
    positives = positives.to(device=scores.device, dtype=torch.bool)
    empty = (~positives.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{len(empty)} queries have no correct candidate "
                         f"(first rows: {empty[:5].tolist()})")
    ranks = []
    for start in range(0, scores.shape[0], chunk_size):
        block = scores[start:start + chunk_size].float()
        block = torch.nan_to_num(block, nan=float("-inf"))
        pos = positives[start:start + chunk_size]
        best = block.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((block >= best) & ~pos).sum(dim=1))
    return torch.cat(ranks).cpu()


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose rank is below ``k``, for each ``k``."""
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"labels must be in [0, {num_classes}); got {labels[bad[:5]].tolist()} "
                         f"at positions {bad[:5].tolist()}")
    return labels


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of the true class of each row of ``scores [N, C]`` (see :func:`positive_ranks`)."""
    labels = _check_labels(labels, scores.shape[1])
    if len(labels) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {len(labels)} labels")
    one_hot = torch.zeros(scores.shape, dtype=torch.bool)
    one_hot[torch.arange(len(labels)), labels] = True
    return positive_ranks(scores.cpu(), one_hot)


def predictions(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 predictions consistent with pessimistic ties.

    The true class when it ranks first; otherwise the best-scoring wrong class (one that ties
    or beats it). So the confusion matrix diagonal always equals the top-1 hits.
    """
    scores = torch.nan_to_num(scores.float().cpu(), nan=float("-inf"))
    labels = _check_labels(labels, scores.shape[1])
    ranks = label_ranks(scores, labels)
    wrong = scores.clone()
    wrong[torch.arange(len(labels)), labels] = float("-inf")
    return torch.where(ranks == 0, labels, wrong.argmax(dim=1))


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    labels = _check_labels(labels, num_classes)
    predicted = _check_labels(predicted, num_classes)
    flat = labels * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                           ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy, per-class and mean per-class top-1 accuracy, and the confusion matrix.

    ``top{k}`` is reported only for ``k`` below the number of classes (otherwise it is always 1).
    ``per_class`` is aligned with ``classes``; a class without examples gets ``None``.
    """
    num_classes = len(classes)
    if scores.dim() != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores {tuple(scores.shape)} do not match {num_classes} classes")
    labels = _check_labels(labels, num_classes)
    ranks = label_ranks(scores, labels)
    confusion = confusion_matrix(predictions(scores, labels), labels, num_classes)
    support = confusion.sum(dim=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None
                 for c in range(num_classes)]
    seen = [a for a in per_class if a is not None]
    result: dict = {"n": len(labels), "num_classes": num_classes, "classes": list(classes),
                    "chance": 1.0 / num_classes}
    for k, value in recall_at_k(ranks, [k for k in ks if k < num_classes or k == 1]).items():
        result[f"top{k}"] = value
    result["mean_per_class"] = sum(seen) / len(seen)
    result["per_class"] = per_class
    result["support"] = support.tolist()
    result["confusion"] = confusion.tolist()
    return result
