"""Zero-shot classification accuracy of a dual encoder on labelled images.

    result = evaluate_zeroshot(model, processor, samples, {"cat": "고양이", ...}, lang="ko")
    result["top1"], result["per_class"], result["confusion"]

Classes are embedded with :class:`imagefm.apps.zeroshot.ZeroShotClassifier` (templates of the
language + prompt ensembling), images are streamed in batches, and the scores go through
:func:`imagefm.eval.metrics.classification_metrics`. Images that fail to decode, and records
without a label, are skipped and counted (the result's ``skipped`` names the first few).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from imagefm.apps.zeroshot import ZeroShotClassifier, embed_pixels, preprocess_tolerant
from imagefm.data.formats import SkipCounter
from imagefm.data.records import Record
from imagefm.eval.metrics import classification_metrics
from imagefm.eval.templates import ClassNames, resolve_classnames

# (image, label) or (image, label, name): name is used in skip messages.
Sample = tuple[Any, int] | tuple[Any, int, str]


def _batches(samples: Iterable[Sample], size: int) -> Iterable[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_samples(classifier: ZeroShotClassifier, samples: Iterable[Sample],
                  skips: SkipCounter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and labels ``[N]`` of the samples that decode; the rest are counted."""
    skips = skips if skips is not None else SkipCounter()
    rows, labels = [], []
    for batch in _batches(samples, classifier.batch_size):
        names = [s[2] if len(s) > 2 else f"sample #{skips.seen + i}"  # type: ignore[misc]
                 for i, s in enumerate(batch)]
        pixels, kept, errors = preprocess_tolerant(classifier.processor, [s[0] for s in batch],
                                                   names)
        for message in errors:
            skips.add("undecodable image", message)
        if pixels is None:
            continue
        skips.ok(len(kept))
        rows.append(classifier.logits_from_embeddings(embed_pixels(classifier.model, pixels)))
        labels.extend(int(batch[i][1]) for i in kept)
    if not rows:
        raise ValueError(f"no image could be scored ({skips.report()})")
    return torch.cat(rows), torch.tensor(labels, dtype=torch.long)


def evaluate_zeroshot(model: Any, processor: Any, samples: Iterable[Sample],
                      classnames: ClassNames, lang: str = "en",
                      templates: Sequence[str] | None = None, *, name: str = "zeroshot",
                      batch_size: int = 64, ks: Sequence[int] = (1, 5),
                      skips: SkipCounter | None = None) -> dict[str, Any]:
    """Zero-shot accuracy on ``samples`` (``(image, label[, name])``) for classes in ``lang``.

    Returns the metrics of :func:`classification_metrics` plus ``task``, ``name``, ``lang``,
    ``num_templates`` and ``skipped`` (counts and example messages).
    """
    skips = skips if skips is not None else SkipCounter()
    classifier = ZeroShotClassifier(model, processor, classnames, lang, templates,
                                    batch_size=batch_size)
    scores, labels = score_samples(classifier, samples, skips)
    result: dict[str, Any] = {"task": "classification", "name": name, "lang": lang,
                              "num_templates": len(classifier.templates)}
    result.update(classification_metrics(scores, labels, classifier.classnames, ks))
    result["skipped"] = skips.as_dict()
    return result


def labelled_samples(records: Iterable[Record], num_classes: int,
                     skips: SkipCounter) -> Iterable[Sample]:
    """``(image bytes, label, key)`` of records with an image and a label in range."""
    for record in records:
        if record.image is None:
            skips.add("no image", f"{record.key}: record has no image")
        elif record.label is None:
            skips.add("no label", f"{record.key}: record has no label")
        elif not 0 <= record.label < num_classes:
            skips.add("label out of range",
                      f"{record.key}: label {record.label} not in [0, {num_classes})")
        else:
            yield record.image, record.label, record.key


def evaluate_records(model: Any, processor: Any, records: Iterable[Record],
                     classnames: ClassNames, lang: str = "en", **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_zeroshot` on labelled :class:`Record` s (e.g. read from shards)."""
    skips = kwargs.pop("skips", None) or SkipCounter()
    num_classes = len(resolve_classnames(classnames, lang))
    samples = labelled_samples(records, num_classes, skips)
    return evaluate_zeroshot(model, processor, samples, classnames, lang, skips=skips, **kwargs)
