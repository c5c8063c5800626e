"""Image ↔ text retrieval: recall@K in both directions, with the CLIP paper's semantics.

* image → text: an image query is a hit at K if ANY of its captions is among the top K texts;
* text → image: a caption query is a hit at K if its one image is among the top K images.

The input is a similarity matrix ``[N_images, N_texts]`` and, for each text, the index of its
image. Ties count against the model (see :mod:`imagefm.eval.metrics`): for an image query the
rank is the number of *other images'* captions scoring at least as high as its best caption, so
another caption of the same image never pushes a hit out of the top K. Images without captions
stay in the gallery as distractors for text → image but are not image queries (counted in
``images_without_captions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from imagefm.apps.zeroshot import embed_pixels, embed_texts, preprocess_tolerant
from imagefm.data.formats import SkipCounter
from imagefm.data.records import Record
from imagefm.eval.metrics import positive_ranks, recall_at_k

DEFAULT_KS = (1, 5, 10)


def retrieval_metrics(similarity: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Recall@K both ways from ``similarity [N_images, N_texts]`` and each text's image index.

    Returns ``{"image_to_text": {"R@1": ...}, "text_to_image": {...}, "mean_recall", "n_images",
    "n_texts", "images_without_captions"}``; ``mean_recall`` averages all recalls (as the
    "RSUM / 6" of retrieval papers).
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [images, texts], got {tuple(similarity.shape)}")
    n_images, n_texts = similarity.shape
    owner = torch.as_tensor(text_to_image, dtype=torch.long).flatten().cpu()
    if len(owner) != n_texts:
        raise ValueError(f"{n_texts} texts in the similarity matrix but {len(owner)} "
                         "text → image indices")
    bad = ((owner < 0) | (owner >= n_images)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"text → image indices must be in [0, {n_images}); text "
                         f"{bad[0].item()} points to {owner[bad[0]].item()}")
    similarity = similarity.float().cpu()
    # positives[i, t]: text t is a caption of image i.
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positives[owner, torch.arange(n_texts)] = True
    has_caption = positives.any(dim=1)
    image_ranks = positive_ranks(similarity[has_caption], positives[has_caption])
    text_ranks = positive_ranks(similarity.t(), positives.t())
    i2t = {f"R@{k}": v for k, v in recall_at_k(image_ranks, ks).items()}
    t2i = {f"R@{k}": v for k, v in recall_at_k(text_ranks, ks).items()}
    values = list(i2t.values()) + list(t2i.values())
    return {"image_to_text": i2t, "text_to_image": t2i, "mean_recall": sum(values) / len(values),
            "n_images": n_images, "n_texts": n_texts,
            "images_without_captions": int((~has_caption).sum())}


@dataclass
class EmbeddedCaptions:
    """Embeddings of a captioned image set: images, every caption, each caption's image and lang."""

    images: torch.Tensor  # [N_images, D], normalised
    texts: torch.Tensor  # [N_texts, D], normalised
    owner: list[int]  # caption -> image row
    langs: list[str]  # caption -> language tag
    skipped: dict[str, Any]

    def select(self, lang: str | None) -> tuple[torch.Tensor, list[int]]:
        """Caption embeddings and owners of one language (all captions when ``None``)."""
        rows = [i for i, tag in enumerate(self.langs) if lang is None or tag == lang]
        return self.texts[rows], [self.owner[i] for i in rows]


def embed_records(model: Any, processor: Any, records: Iterable[Record], batch_size: int = 64,
                  skips: SkipCounter | None = None) -> EmbeddedCaptions:
    """Embed each record's image and all its captions (each image once, whatever the language).

    A record without an image or whose image does not decode is skipped and counted; a record
    without captions stays as an image (a distractor for text → image retrieval).
    """
    skips = skips if skips is not None else SkipCounter()
    image_rows: list[torch.Tensor] = []
    texts: list[str] = []
    owner: list[int] = []
    langs: list[str] = []
    n_images = 0

    def flush(batch: list[Record]) -> None:
        nonlocal n_images
        pixels, kept, errors = preprocess_tolerant(processor, [r.image for r in batch],
                                                   [r.key for r in batch])
        for message in errors:
            skips.add("undecodable image", message)
        if pixels is None:
            return
        skips.ok(len(kept))
        image_rows.append(embed_pixels(model, pixels))
        for index in kept:
            for caption in batch[index].captions:
                texts.append(caption.text)
                langs.append(caption.lang)
                owner.append(n_images)
            n_images += 1

    batch: list[Record] = []
    for record in records:
        if record.image is None:
            skips.add("no image", f"{record.key}: record has no image")
            continue
        batch.append(record)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not image_rows or not texts:
        raise ValueError(f"no captioned images to evaluate retrieval on ({skips.report()})")
    return EmbeddedCaptions(torch.cat(image_rows), embed_texts(model, processor, texts), owner,
                            langs, skips.as_dict())


def _result(embedded: EmbeddedCaptions, lang: str | None, name: str,
            ks: Sequence[int]) -> dict[str, Any]:
    texts, owner = embedded.select(lang)
    if not owner:
        raise ValueError(f"no captions in language {lang!r}; the data has "
                         f"{sorted(set(embedded.langs))}")
    result: dict[str, Any] = {"task": "retrieval", "name": name, "lang": lang or "all"}
    # Cosine similarity: the model's scale and bias do not change any ranking.
    result.update(retrieval_metrics(embedded.images @ texts.t(), owner, ks))
    result["skipped"] = embedded.skipped
    return result


def evaluate_retrieval(model: Any, processor: Any, records: Iterable[Record],
                       lang: str | None = None, *, name: str = "retrieval",
                       batch_size: int = 64, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Recall@K on captioned records (e.g. read from shards), captions in ``lang`` (None: all)."""
    embedded = embed_records(model, processor, records, batch_size)
    return _result(embedded, lang, name, ks)


def evaluate_retrieval_languages(model: Any, processor: Any, records: Iterable[Record],
                                 langs: Sequence[str] | None = None, *, name: str = "retrieval",
                                 batch_size: int = 64, ks: Sequence[int] = DEFAULT_KS
                                 ) -> list[dict[str, Any]]:
    """One retrieval result per caption language (every language present when ``langs`` is
    None); images are embedded once. A requested language without captions is reported as
    skipped rather than failing the others."""
    embedded = embed_records(model, processor, records, batch_size)
    present = sorted(set(embedded.langs))
    results = []
    for lang in langs or present:
        if lang not in present:
            results.append({"task": "retrieval", "name": name, "lang": lang,
                            "skipped_reason": f"no {lang!r} captions (data has {present})"})
        else:
            results.append(_result(embedded, lang, name, ks))
    return results
