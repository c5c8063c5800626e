"""AUROC: the probability that a random positive scores above a random negative (ties: ½).

Computed from ranks (the Mann–Whitney U statistic), with tied scores sharing their average
rank, so it equals the area under the ROC curve drawn through every threshold.
"""

from __future__ import annotations

import numpy as np
import torch


def auroc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for binary ``labels``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUROC needs both classes; got {positives} positive and {negatives} "
                         "negative examples")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Ranks 1..N; a group of tied scores gets the mean of the ranks it spans.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))
