from __future__ import annotations

import pytest
import torch

from imagefm.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    positive_ranks,
    predictions,
)
from imagefm.eval.retrieval import retrieval_metrics


def test_recall_at_k_single_caption_per_image_by_hand() -> None:
    # 3 images × 3 texts; text t belongs to image t.
    sim = torch.tensor([[0.9, 0.1, 0.2],    # image 0: its text 0 first           -> rank 0
                        [0.8, 0.3, 0.5],    # image 1: text 1 behind 0 and 2      -> rank 2
                        [0.1, 0.7, 0.6]])   # image 2: text 2 behind text 1       -> rank 1
    out = retrieval_metrics(sim, [0, 1, 2], ks=(1, 2, 3))
    assert out["image_to_text"] == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    # Columns: text 0 -> image 0 (0.9 best) rank 0; text 1 -> image 1 (0.3 < 0.7, > 0.1) rank 1;
    # text 2 -> image 2 (0.6 > 0.2, 0.6 > 0.5) rank 0.
    assert out["text_to_image"] == {"R@1": 2 / 3, "R@2": 1.0, "R@3": 1.0}
    assert out["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 2 / 3 + 1 + 1) / 6)
    assert (out["n_images"], out["n_texts"], out["images_without_captions"]) == (3, 3, 0)


def test_image_to_text_counts_any_caption_and_own_captions_do_not_push_out() -> None:
    # Image 0 has captions 0, 1, 2; image 1 has captions 3, 4.
    owner = [0, 0, 0, 1, 1]
    sim = torch.tensor([
        # image 0: its best caption (2, 0.6) is behind caption 3 (0.9) only -> rank 1.
        [0.1, 0.2, 0.6, 0.9, 0.0],
        # image 1: caption 4 (0.95) first; its other caption 3 is irrelevant -> rank 0.
        [0.5, 0.4, 0.3, 0.1, 0.95],
    ])
    out = retrieval_metrics(sim, owner, ks=(1, 2))
    assert out["image_to_text"] == {"R@1": 0.5, "R@2": 1.0}
    # Text queries: 0 -> img 0 (0.1 < 0.5) rank 1; 1 -> 0.2 < 0.4 rank 1; 2 -> 0.6 > 0.3 rank 0;
    # 3 -> img 1 (0.1 < 0.9) rank 1; 4 -> 0.95 > 0.0 rank 0.
    assert out["text_to_image"] == {"R@1": 2 / 5, "R@2": 1.0}


def test_ties_count_against_the_model() -> None:
    owner = [0, 1, 2]
    flat = torch.ones(3, 3)  # a constant model: every candidate ties
    out = retrieval_metrics(flat, owner, ks=(1, 2, 3))
    assert out["image_to_text"] == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}
    assert out["text_to_image"] == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}
    # A partial tie: image 0's caption ties with one wrong caption -> rank 1, whatever order.
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    assert retrieval_metrics(sim, owner, ks=(1, 2))["image_to_text"] == {"R@1": 2 / 3,
                                                                          "R@2": 1.0}
    swapped = sim[:, [1, 0, 2]]  # same scores, captions in the other order
    assert retrieval_metrics(swapped, [1, 0, 2], ks=(1, 2))["image_to_text"]["R@1"] == 2 / 3


def test_images_without_captions_are_distractors_only() -> None:
    # Image 2 has no caption: not an image query, but it can outrank for text queries.
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.0]])
    out = retrieval_metrics(sim, [0, 1], ks=(1,))
    assert out["images_without_captions"] == 1
    assert out["image_to_text"] == {"R@1": 1.0}
    assert out["text_to_image"] == {"R@1": 0.5}  # text 0 loses to distractor image 2


def test_nan_scores_never_hit_and_bad_inputs_fail_clearly() -> None:
    sim = torch.tensor([[float("nan"), 0.1], [0.0, 0.9]])
    assert retrieval_metrics(sim, [0, 1], ks=(1,))["image_to_text"] == {"R@1": 0.5}
    with pytest.raises(ValueError, match="text → image indices"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        retrieval_metrics(torch.zeros(2, 2), [0, 5])
    with pytest.raises(ValueError, match="no correct candidate"):
        positive_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def _reference_ranks(scores: torch.Tensor, positives: torch.Tensor) -> list[int]:
    """Rank by brute force: sort candidates with wrong ones first among equal scores."""
    ranks = []
    for row, pos in zip(scores.tolist(), positives.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], pos[j]))
        ranks.append(next(i for i, j in enumerate(order) if pos[j]))
    return ranks


def test_positive_ranks_match_a_brute_force_worst_case_sort() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (50, 9), generator=generator).float()  # many ties
    positives = torch.rand(50, 9, generator=generator) < 0.3
    positives[:, 0] |= ~positives.any(dim=1)
    expected = _reference_ranks(scores, positives)
    assert positive_ranks(scores, positives, chunk_size=7).tolist() == expected


def test_classification_metrics_by_hand() -> None:
    classes = ["a", "b", "c", "d", "e", "f"]
    scores = torch.tensor([
        [5.0, 1, 0, 0, 0, 0],  # label 0: hit
        [0.0, 5, 1, 0, 0, 0],  # label 1: hit
        [0.0, 5, 1, 0, 0, 0],  # label 2: rank 1 -> top-5 hit, predicted 1
        [1.0, 1, 1, 1, 1, 0],  # label 5: last -> miss even at top-5, predicted 0 (first max)
        [2.0, 2, 0, 0, 0, 0],  # label 1 tied with class 0 -> miss at top-1, predicted 0
    ])
    labels = torch.tensor([0, 1, 2, 5, 1])
    out = classification_metrics(scores, labels, classes, ks=(1, 5, 10))
    assert out["top1"] == pytest.approx(2 / 5)
    assert out["top5"] == pytest.approx(4 / 5)
    assert "top10" not in out  # k >= classes is always 1, not reported
    assert out["per_class"] == [1.0, 0.5, 0.0, None, None, 0.0]
    assert out["mean_per_class"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert out["chance"] == pytest.approx(1 / 6)
    assert out["support"] == [1, 2, 1, 0, 0, 1]
    expected = torch.zeros(6, 6, dtype=torch.long)
    for true, pred in ((0, 0), (1, 1), (2, 1), (5, 0), (1, 0)):
        expected[true, pred] += 1
    assert out["confusion"] == expected.tolist()
    # The diagonal always equals the top-1 hits, ties included.
    assert sum(out["confusion"][i][i] for i in range(6)) == round(out["top1"] * 5)


def test_predictions_and_confusion_checks() -> None:
    scores = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # Row 0, label 0 tied with class 1: pessimistic -> predicted 1 (argmax alone would say 0).
    assert predictions(scores, torch.tensor([0, 1])).tolist() == [1, 1]
    assert confusion_matrix(torch.tensor([1, 1]), torch.tensor([0, 1]), 2).tolist() == [[0, 1],
                                                                                     [0, 1]]
    with pytest.raises(ValueError, match="labels must be in"):
        classification_metrics(scores, torch.tensor([0, 2]), ["x", "y"])
