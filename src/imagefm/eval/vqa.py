"""VLM evaluation: exact-match answers to synthetic questions, and captions of real pictures.

``evaluate_vqa`` renders new scenes (split ``all``: every colour/shape combination; ``eval``:
only the compositions held out of training), asks each one question in English or Korean and
compares the greedy answer with the reference after light normalisation (case, surrounding
space and punctuation). Accuracy is reported per language and per question kind. Any VLM
family runs (:mod:`imagefm.vlm_runtime`): its processor makes the batch, ``model.generate``
answers.
"""

from __future__ import annotations

import string
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imagefm.data.records import IMAGE_TOKEN

_STRIP = string.punctuation + string.whitespace + "。．"
SCENE_SIZE = 64  # scenes for families without one input size (the quickstart's scenes)


def normalize_answer(text: str) -> str:
    """Case-folded, NFC, without surrounding whitespace and punctuation."""
    return unicodedata.normalize("NFC", text).strip(_STRIP).casefold()


@dataclass
class VQAResult:
    """Exact-match accuracy overall, per language and per question kind, with examples."""

    split: str
    total: int = 0
    correct: int = 0
    by_lang: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    by_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def add(self, lang: str, kind: str, question: str, answer: str, predicted: str) -> None:
        hit = int(normalize_answer(predicted) == normalize_answer(answer))
        self.total += 1
        self.correct += hit
        for table, key in ((self.by_lang, lang), (self.by_kind, f"{kind} ({lang})")):
            table[key][0] += hit
            table[key][1] += 1
        self.examples.append({"lang": lang, "kind": kind, "question": question,
                              "answer": answer, "predicted": predicted})

    def to_dict(self) -> dict[str, Any]:
        def rates(table: dict[str, list[int]]) -> dict[str, dict[str, float]]:
            return {k: {"accuracy": c / n, "n": n} for k, (c, n) in sorted(table.items())}

        return {"split": self.split, "accuracy": self.accuracy, "n": self.total,
                "by_lang": rates(self.by_lang), "by_kind": rates(self.by_kind),
                "examples": self.examples}


def vqa_questions(n: int, *, lang: str, split: str, image_size: int, seed: int,
                  style: dict[str, Any] | None = None) -> list[tuple[Any, str, str, str]]:
    """``n`` (image, kind, question, answer) of new scenes, one question each."""
    from imagefm.data.image import open_image
    from imagefm.data.synthetic.generator import make_record

    items = []
    for index in range(n):
        record = make_record("vqa", index, seed=seed, image_size=image_size, split=split,
                             qa_per_image=1, langs=(lang,), style=style)
        question = record.conversation[0].content.replace(IMAGE_TOKEN, "").strip()
        answer = record.conversation[1].content
        image = np.asarray(open_image(record.image))
        items.append((image, record.meta["question_kinds"][0], question, answer))
    return items


@torch.no_grad()
def answer(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str], *,
           max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, one per (image, question), batched with left padding."""
    from imagefm.chat import chat_stops
    from imagefm.vlm_runtime import decode_replies, to_model

    conversations = [[{"role": "user", "content": q}] for q in questions]
    batch = to_model(model, processor.prompt(conversations, list(images)))
    eos, stops = chat_stops(model.lm)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         stop_strings=stops)
    return decode_replies(model, out[:, batch["input_ids"].shape[1]:], eos, stops)


def scene_size(processor: Any) -> int:
    """The side to render scenes at: the processor's input size where it has one (LLaVA-style),
    else :data:`SCENE_SIZE` (families that see images at their own size or in tiles)."""
    card = getattr(processor, "card", None)
    return card.image_size if card is not None else SCENE_SIZE


def evaluate_vqa(model: Any, processor: Any, *, n: int = 200, langs: Sequence[str] = ("en", "ko"),
                 split: str = "all", seed: int = 12345, style: dict[str, Any] | None = None,
                 batch_size: int = 16, blind: bool = False, progress: bool = False,
                 image_size: int | None = None) -> VQAResult:
    """Exact-match accuracy on ``n`` new scenes per language (see the module docstring).

    ``blind`` shows the model a plain grey picture instead of each scene: the control that says
    how much of the accuracy comes from the question alone (answer priors), not from the image.
    Scenes are ``image_size`` pixels square (default: :func:`scene_size`).
    """
    from tqdm.auto import tqdm

    result = VQAResult(f"{split} (blind)" if blind else split)
    size = image_size or scene_size(processor)
    for lang in langs:
        items = vqa_questions(n, lang=lang, split=split, image_size=size, seed=seed, style=style)
        if blind:
            grey = np.full((size, size, 3), 128, dtype=np.uint8)
            items = [(grey, *rest) for _, *rest in items]
        for start in tqdm(range(0, n, batch_size), desc=f"vqa {lang}", disable=not progress):
            chunk = items[start:start + batch_size]
            predicted = answer(model, processor, [c[0] for c in chunk], [c[2] for c in chunk])
            for (_, kind, question, reference), guess in zip(chunk, predicted, strict=True):
                result.add(lang, kind, question, reference, guess)
    return result


def caption_tuxpaint(model: Any, processor: Any, count: int, langs: Sequence[str],
                     root: str | None = None) -> list[dict[str, str]]:
    """Captions of the first ``count`` Tux Paint ``test`` pictures (sorted by name), with the
    pictures' own names beside them; empty when the Debian package is not installed."""
    from imagefm.data.formats import SkipCounter
    from imagefm.data.image import open_image
    from imagefm.data.recipes import MissingSourceError
    from imagefm.data.recipes.tuxpaint import RECIPE, build
    from imagefm.train.vlm_data import DESCRIBE

    try:
        source = RECIPE.locate(root)
    except MissingSourceError:
        return []
    records = sorted((r for r in build(source, SkipCounter()) if r.split == "test"),
                     key=lambda r: r.key)[:count]
    images = [open_image(r.image).convert("RGB") for r in records]
    rows = [{"name": r.key, **{f"truth_{c.lang}": c.text for c in r.captions}} for r in records]
    for lang in langs:
        for row, text in zip(rows, answer(model, processor, images, [DESCRIBE[lang]] * len(images),
                                          max_new_tokens=24), strict=True):
            row[lang] = text
    return rows


def vqa_markdown(results: Sequence[VQAResult], captions: Sequence[dict[str, str]],
                 langs: Sequence[str]) -> str:
    """A short Markdown report of :func:`evaluate_vqa` results and captions."""
    lines = ["# VLM evaluation", "", "| split | language | exact match | questions |",
             "|---|---|---:|---:|"]
    for result in results:
        for lang, (hit, n) in sorted(result.by_lang.items()):
            lines.append(f"| {result.split} | {lang} | {hit / n:.1%} | {n} |")
    lines += ["", "## By question kind", "", "| split | kind | exact match | questions |",
              "|---|---|---:|---:|"]
    for result in results:
        for kind, (hit, n) in sorted(result.by_kind.items()):
            lines.append(f"| {result.split} | {kind} | {hit / n:.1%} | {n} |")
    if captions:
        lines += ["", "## Captions of Tux Paint test pictures", "",
                  "| picture | " + " | ".join(f"{lang} (model)" for lang in langs) + " |",
                  "|---|" + "---|" * len(langs)]
        for row in captions:
            lines.append(f"| {row['name']} | " + " | ".join(row.get(lang, "") for lang in langs)
                         + " |")
    return "\n".join(lines) + "\n"
