"""Evaluators for evaluation during training: the ``eval/...`` metrics besides ``eval/loss``.

    launch.run(config, evaluators=training_evaluators)     # what `imagefm train` does
    [evaluate] = training_evaluators(config, model)
    evaluate(model)  # {"eval/en/i2t_r1": 0.31, ..., "eval/retrieval_r1": 0.29, ...}

For a dual encoder (``task.name = contrastive``) with held-out data in ``eval.data``, one
evaluator measures on those records, per caption language (``eval.langs``, or every language
the captions have):

* image ↔ text retrieval: ``eval/{lang}/i2t_r1`` and ``eval/{lang}/t2i_r1`` (recall@1 with
  the semantics and pessimistic ties of :mod:`imagefm.eval.retrieval`), and
  ``eval/retrieval_r1``, the mean of them all;
* zero-shot classification, when the records have labels with class names
  (``record.label_name``): ``eval/{lang}/zeroshot_top1`` with the prompt templates of that
  language (:mod:`imagefm.eval.templates`, prompt ensembles as
  :class:`imagefm.apps.zeroshot.ZeroShotClassifier`), and ``eval/zeroshot_top1``, their mean.
  The candidates are the classes present in the held-out records. Class names are taken as
  English (the recipes' and the synthetic data's convention); another language gets them from
  the vocabularies the project ships (:func:`class_names_in`), and is left out when a name has
  no translation.

The records are read once, when the evaluator is built: the first ``eval.limit`` whose image
decodes (the bad ones are skipped and counted), images kept as encoded bytes. A folder of a
recipe's split-named shards (``train-*.tar``, ``test-*.tar``) gives its ``test`` shards only.
Each evaluation embeds every image once (in batches, eval mode, no gradient, through the
model's own processor) and every caption once, then scores retrieval and zero-shot from those
embeddings with the functions evaluation uses (:func:`~imagefm.eval.retrieval.retrieval_metrics`,
:func:`~imagefm.eval.metrics.classification_metrics`), so the numbers are the ones
``imagefm eval`` reports on the same records.

A VLM (``task.name = vlm``) gets no evaluator: its held-out loss comes from the Trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from imagefm.apps.zeroshot import ZeroShotClassifier, embed_images, embed_texts
from imagefm.config import ConfigError
from imagefm.data.formats import SkipCounter, read_shards
from imagefm.data.image import ImageDecodeError, open_image
from imagefm.data.recipes.cifar10 import KOREAN
from imagefm.data.records import Record
from imagefm.data.shards import expand_shard_spec
from imagefm.data.synthetic.vocab import class_names
from imagefm.eval.metrics import classification_metrics
from imagefm.eval.retrieval import EmbeddedCaptions, retrieval_metrics
from imagefm.eval.templates import available_languages
from imagefm.processor import Processor

logger = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], dict[str, float]]

# Embedding batches when eval.batch_size is not set: data.batch_size, at most this.
MAX_DEFAULT_BATCH = 256


def training_evaluators(config: Any, model: nn.Module) -> list[Evaluator]:
    """The evaluators for a run of ``config`` (a ``TrainConfig``) on ``model``: the held-out
    retrieval / zero-shot evaluator for an image–text dual encoder with ``eval.data``, else none
    (dual encoders of other inputs, speech or point clouds, report their held-out loss; their
    own suites evaluate them: ``imagefm eval --suite speech``, ``imagefm points eval``)."""
    if config.task.name != "contrastive" or not config.eval.data:
        return []
    if getattr(model, "media_key", "pixel_values") != "pixel_values":
        return []
    batch_size = config.eval.batch_size or min(config.data.batch_size, MAX_DEFAULT_BATCH)
    records, skips = read_heldout(config.eval.data, config.eval.limit)
    return [HeldOutEvaluator(records, model, langs=config.eval.langs, batch_size=batch_size,
                             skipped=skips.as_dict())]


def read_heldout(spec: str, limit: int, skips: SkipCounter | None = None
                 ) -> tuple[list[Record], SkipCounter]:
    """The first ``limit`` records of the shards ``spec`` names whose image decodes (images
    stay encoded bytes); records without an image or with a bad one are counted in ``skips``."""
    skips = skips if skips is not None else SkipCounter()
    try:
        urls = expand_shard_spec(spec, split="test")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"eval.data = {spec!r}: {err}") from None
    records: list[Record] = []
    for record in read_shards(urls, skips):
        if record.image is None:
            skips.add("no image", f"{record.key}: record has no image")
            continue
        try:
            open_image(record.image, name=record.key)  # decodes once here, not at every eval
        except ImageDecodeError as err:
            skips.add("undecodable image", str(err))
            continue
        skips.ok()
        records.append(record)
        if len(records) >= limit:
            break  # the rest of the shards is never read
    if not records:
        raise ConfigError(f"eval.data = {spec!r} holds no records with a usable image "
                          f"({skips.report()})")
    return records, skips


def class_names_in(lang: str, names: Sequence[str]) -> list[str] | None:
    """English class ``names`` in ``lang``: themselves for ``en``; for another language the
    translations the project ships (CIFAR-10's Korean class names, the synthetic colours and
    shapes), or None when one is missing."""
    if lang == "en":
        return list(names)
    table = _translations(lang)
    if not all(name in table for name in names):
        return None
    return [table[name] for name in names]


def _translations(lang: str) -> dict[str, str]:
    if lang != "ko":
        return {}

    return {**KOREAN, **class_names("colour", "ko"), **class_names("shape", "ko")}


class HeldOutEvaluator:
    """Retrieval and zero-shot metrics of a dual encoder on fixed held-out records.

    Everything that does not depend on the weights is prepared here: the processor (the
    model's card and tokenizer), the captions and which image each belongs to, the languages,
    the classes. ``__call__(model)`` embeds and scores.
    """

    def __init__(self, records: Sequence[Record], model: nn.Module, *,
                 langs: Sequence[str] = (), batch_size: int = 64,
                 skipped: dict[str, Any] | None = None) -> None:
        if getattr(model, "tokenizer", None) is None or not hasattr(model, "encode_text"):
            raise ConfigError("eval.data: retrieval and zero-shot evaluation need a dual encoder "
                              "with its tokenizer, and this model has none: start from a "
                              "checkpoint (model.init) or a preset that brings one")

        self.processor = Processor.for_model(model)
        self.batch_size = batch_size
        self.skipped = skipped or {}
        self.images = [record.image for record in records]
        self.texts: list[str] = []
        self.owner: list[int] = []  # caption -> image row
        self.caption_langs: list[str] = []
        for row, record in enumerate(records):
            for caption in record.captions:
                self.texts.append(caption.text)
                self.owner.append(row)
                self.caption_langs.append(caption.lang)
        present = sorted(set(self.caption_langs))
        wanted = list(langs) or present or ["en"]
        self.retrieval_langs = [lang for lang in wanted if lang in present]
        self._prepare_zeroshot(records, wanted)
        dropped = [lang for lang in wanted if lang not in present]
        if dropped and langs:
            logger.warning("eval.langs: no held-out captions in %s (the records have %s); "
                           "no retrieval metrics for them", ", ".join(dropped),
                           ", ".join(present) or "none")
        logger.info("held-out evaluation on %d records (%d captions); retrieval in %s; "
                    "zero-shot over %d classes in %s", len(self.images), len(self.texts),
                    ", ".join(self.retrieval_langs) or "no language",
                    len(self.zeroshot_labels.unique()) if self.zeroshot_rows else 0,
                    ", ".join(self.zeroshot_names) or "no language")

    def _prepare_zeroshot(self, records: Sequence[Record], langs: Sequence[str]) -> None:
        """Rows, labels (renumbered over the classes present) and class names per language."""
        names: dict[int, str] = {}
        rows: list[int] = []
        unnamed = 0
        for row, record in enumerate(records):
            if record.label is None:
                continue
            if not record.label_name:
                unnamed += 1
                continue
            names.setdefault(record.label, record.label_name)
            rows.append(row)
        self.zeroshot_names: dict[str, list[str]] = {}
        self.zeroshot_rows: list[int] = []
        self.zeroshot_labels = torch.zeros(0, dtype=torch.long)
        if len(names) < 2:  # no labels, or a single class: nothing to classify
            return
        if unnamed:
            logger.warning("eval.data: %d labelled held-out records have no label_name; "
                           "zero-shot leaves them out", unnamed)
        classes = sorted(names)
        index = {label: i for i, label in enumerate(classes)}
        english = [names[label] for label in classes]
        shipped = set(available_languages())
        for lang in langs:
            translated = class_names_in(lang, english) if lang in shipped else None
            if translated is None:
                logger.warning("eval: no zero-shot in %r (no templates or class names in that "
                               "language)", lang)
                continue
            self.zeroshot_names[lang] = translated
        self.zeroshot_rows = rows
        self.zeroshot_labels = torch.tensor([index[records[row].label] for row in rows],
                                            dtype=torch.long)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        images = embed_images(model, self.processor, self.images, self.batch_size)
        metrics: dict[str, float] = {}
        if self.retrieval_langs:
            texts = embed_texts(model, self.processor, self.texts)
            embedded = EmbeddedCaptions(images, texts, self.owner, self.caption_langs, {})
            recalls = []
            for lang in self.retrieval_langs:
                lang_texts, owner = embedded.select(lang)
                # Cosine similarity, as evaluate_retrieval: scale and bias change no ranking.
                result = retrieval_metrics(images @ lang_texts.t(), owner, ks=(1,))
                metrics[f"eval/{lang}/i2t_r1"] = result["image_to_text"]["R@1"]
                metrics[f"eval/{lang}/t2i_r1"] = result["text_to_image"]["R@1"]
                recalls += [metrics[f"eval/{lang}/i2t_r1"], metrics[f"eval/{lang}/t2i_r1"]]
            metrics["eval/retrieval_r1"] = sum(recalls) / len(recalls)
        if self.zeroshot_names and self.zeroshot_rows:
            features = images[self.zeroshot_rows]
            accuracies = []
            for lang, names in self.zeroshot_names.items():
                classifier = ZeroShotClassifier(model, self.processor, names, lang,
                                                batch_size=self.batch_size)
                scores = classifier.logits_from_embeddings(features)
                result = classification_metrics(scores, self.zeroshot_labels,
                                                classifier.classnames, ks=(1,))
                metrics[f"eval/{lang}/zeroshot_top1"] = result["top1"]
                accuracies.append(result["top1"])
            metrics["eval/zeroshot_top1"] = sum(accuracies) / len(accuracies)
        return metrics

    def __repr__(self) -> str:
        return (f"HeldOutEvaluator({len(self.images)} images, {len(self.texts)} captions, "
                f"retrieval {self.retrieval_langs}, zero-shot {list(self.zeroshot_names)})")
