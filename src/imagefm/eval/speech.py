"""Speech–text evaluation of a CLAP model: zero-shot spoken keywords and speech ↔ text retrieval.

    results = evaluate_speech(model, "data/speech-synth", split="test", langs=["en", "ko"])
    imagefm eval runs/clap/model --suite speech --data data/speech-synth --lang en,ko

On a speech dataset (:mod:`imagefm.data.speech_sets`), per language of the SPEECH:

* ``speech-keywords``: utterances with a keyword ``label`` are classified zero-shot among the
  dataset's keyword classes (``manifest.json`` ``classes``: {lang: names}), whose names are
  embedded by the text tower, in each requested caption language (English speech against Korean
  names too): top-1, top-5, mean per-class accuracy, as image zero-shot reports them;
* ``speech-retrieval``: the other utterances against the distinct captions in each caption
  language: speech → text and text → speech recall@1/5/10. Several utterances may say the same
  caption (keywords, several voices): a text query's positives are all utterances having that
  caption, and a speech query's are all of its captions (ties count against the model, as in
  :mod:`imagefm.eval.metrics`).

Results use the report's retrieval and classification shapes (``image_to_text`` is speech →
text), so ``imagefm.eval.report`` tables and plots them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imagefm.data.audio import load_audio
from imagefm.data.formats import SkipCounter
from imagefm.data.speech_sets import SpeechItem, read_manifest, read_speech_dataset
from imagefm.eval.metrics import classification_metrics, positive_ranks, recall_at_k

KS = (1, 5, 10)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_speech(model: Any, items: Sequence[SpeechItem], batch_size: int = 32,
                 max_seconds: float = 10.0) -> torch.Tensor:
    """Normalised audio embeddings [N, D] of the utterances (clips cut to ``max_seconds``)."""
    rate = model.config.mel.sampling_rate
    out = []
    for start in range(0, len(items), batch_size):
        waves = [load_audio(item.audio, rate, max_seconds=max_seconds)
                 for item in items[start:start + batch_size]]
        features = model.features(waves).to(_device(model))
        out.append(F.normalize(model.encode_audio(features).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_captions(model: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised text embeddings [N, D]."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = model.tokenizer(list(texts[start:start + batch_size]))
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        out.append(F.normalize(model.encode_text(batch["input_ids"],
                                                 batch["attention_mask"]).float(), dim=-1).cpu())
    return torch.cat(out)


class CaptionEmbeddings:
    """``embed_captions`` that computes each distinct text once: the same captions come back for
    every speech language of a dataset (Tux Paint has a dozen), and a text tower like
    multilingual-e5 is the slow half of the evaluation on a CPU."""

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        self.model, self.batch_size = model, batch_size
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self.known})
        if missing:
            rows = embed_captions(self.model, missing, self.batch_size)
            self.known.update(zip(missing, rows, strict=True))
        return torch.stack([self.known[t] for t in texts])


def speech_retrieval(speech: torch.Tensor, items: Sequence[SpeechItem],
                     embed: CaptionEmbeddings, lang: str, *, name: str) -> dict[str, Any]:
    """Speech ↔ text recall@K against the distinct ``lang`` captions of ``items``."""
    texts = sorted({c.text for item in items for c in item.captions if c.lang == lang})
    result: dict[str, Any] = {"task": "retrieval", "name": name, "lang": lang}
    if not texts:
        return {**result, "skipped_reason": f"no {lang!r} captions"}
    column = {text: i for i, text in enumerate(texts)}
    positives = torch.zeros(len(items), len(texts), dtype=torch.bool)
    for row, item in enumerate(items):
        for caption in item.captions:
            if caption.lang == lang:
                positives[row, column[caption.text]] = True
    has_caption = positives.any(dim=1)
    similarity = speech[has_caption] @ embed(texts).t()
    positives = positives[has_caption]
    s2t = recall_at_k(positive_ranks(similarity, positives), KS)
    t2s = recall_at_k(positive_ranks(similarity.t(), positives.t()), KS)
    recalls = {"image_to_text": {f"R@{k}": v for k, v in s2t.items()},
               "text_to_image": {f"R@{k}": v for k, v in t2s.items()}}
    values = [*s2t.values(), *t2s.values()]
    return {**result, **recalls, "mean_recall": sum(values) / len(values),
            "n_images": int(has_caption.sum()), "n_texts": len(texts)}


def keyword_classification(speech: torch.Tensor, items: Sequence[SpeechItem],
                           embed: CaptionEmbeddings, classes: dict[str, list[str]], lang: str, *,
                           name: str) -> dict[str, Any]:
    """Zero-shot spoken-keyword accuracy with the class names of ``lang`` as the prompts."""
    result: dict[str, Any] = {"task": "classification", "name": name, "lang": lang}
    if lang not in classes:
        return {**result, "skipped_reason": f"no keyword names in {lang!r}"}
    names = classes[lang]
    scores = speech @ embed(names).t()
    labels = torch.tensor([item.label for item in items])
    return {**result, **classification_metrics(scores, labels, names)}


def evaluate_speech(model: Any, data: str | Path, *, split: str | None = "test",
                    langs: Sequence[str] | None = None, limit: int | None = None,
                    batch_size: int = 32) -> list[dict[str, Any]]:
    """Keyword classification and retrieval results, per speech language present in ``data``
    (its ``split``) and per caption language in ``langs`` (default en, ko)."""
    data = Path(data)
    manifest = read_manifest(data)
    skips = SkipCounter()
    items = read_speech_dataset(data, split, skips)
    if not items:
        raise ValueError(f"{data}: no utterances in split {split!r}")
    langs = list(langs or ("en", "ko"))
    classes = manifest.get("classes") or {}
    results = []
    embed = CaptionEmbeddings(model)
    for speech_lang in sorted({item.lang for item in items}):
        chosen = [item for item in items if item.lang == speech_lang][:limit]
        keywords = [item for item in chosen if item.label is not None]
        sentences = [item for item in chosen if item.label is None]
        where = f"{data.name}, {speech_lang} speech"
        if keywords and classes:
            speech = embed_speech(model, keywords, batch_size)
            results += [keyword_classification(speech, keywords, embed, classes, lang,
                                               name=f"speech-keywords:{where}") for lang in langs]
        if sentences:
            speech = embed_speech(model, sentences, batch_size)
            results += [speech_retrieval(speech, sentences, embed, lang,
                                         name=f"speech-retrieval:{where}") for lang in langs]
    for result in results:
        result["skipped"] = skips.as_dict()
    return results
