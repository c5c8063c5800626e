"""Synthetic compositional suites: zero-shot probes of what a dual encoder binds together.

Each suite renders scenes with the synthetic engine (:mod:`imagefm.data.synthetic`) and asks the
model to pick the right description among candidates, in English or Korean:

| suite          | image                               | candidates                            |
|----------------|-------------------------------------|---------------------------------------|
| ``colour``     | one object of a seen (colour, shape) | the 11 colours                        |
| ``shape``      | one object of a seen (colour, shape) | the 10 shapes                         |
| ``heldout``    | one object of a held-out combination | all 110 (colour, shape) combinations  |
| ``count``      | 1-5 identical objects                | "one … / two … / …" of that object    |
| ``relation``   | two objects, one left/right/above/below the other | the four relations       |
| ``text``       | a sign with a word written on it    | 10 words (needs Hangul fonts)         |

A class is described by several prompts that are ensembled (as in zero-shot classification).
``colour``/``shape``/``heldout`` share one prompt set across images; ``count`` and ``relation``
describe each image's own objects, so only the asked-about property differs among candidates.
Prompts use the words and phrasings of the synthetic captions (:mod:`...synthetic.captions`), so
a model trained on synthetic data is tested on the language it was taught.

    result = run_suite(model, processor, "heldout", lang="ko", n=200, seed=0)
    result["top1"], result["colour_accuracy"], result["shape_accuracy"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imagefm.apps.zeroshot import (
    embed_images,
    embed_texts,
    ensemble_prompts,
    logit_parts,
)
from imagefm.data.synthetic.captions import with_article
from imagefm.data.synthetic.korean import attach, count_phrase
from imagefm.data.synthetic.scenes import SceneConfig, SceneSpec, render_scene, sample_scene
from imagefm.data.synthetic.vocab import (
    COLOUR_NAMES,
    COLOURS,
    DEFAULT_HELD_OUT,
    INVERSE_RELATION,
    RELATIONS,
    SHAPE_NAMES,
    SHAPES,
    SIZES,
    number_en,
)
from imagefm.eval.metrics import classification_metrics, predictions

LANGS = ("en", "ko")
MAX_COUNT = 5
TEXT_CLASSES = 10


class SuiteUnavailable(RuntimeError):
    """A suite cannot run here (e.g. no font for rendered text); the reason says why."""


@dataclass
class SuiteTask:
    """Rendered images, their labels, and the candidate prompts.

    ``prompts[c]`` describes class ``c`` for every image, unless ``example_prompts`` is given:
    then ``example_prompts[i][c]`` describes class ``c`` for image ``i``. ``attributes`` maps an
    attribute name to its value per class; the suite reports how often the prediction has the
    right value of each (e.g. colour right but shape wrong).
    """

    classes: list[str]
    images: list[Any]
    labels: list[int]
    prompts: list[list[str]] | None = None
    example_prompts: list[list[list[str]]] | None = None
    attributes: dict[str, list[str]] = field(default_factory=dict)


SuiteBuilder = Callable[[str, int, np.random.Generator, int], SuiteTask]


# ---------------------------------------------------------------- words
def colour_word(colour: str, lang: str) -> str:
    """The colour as it goes before a noun: "red" / "빨간"."""
    entry = COLOURS[colour]
    return entry.en if lang == "en" else entry.ko_attributive[0]


def shape_word(shape: str, lang: str, plural: bool = False) -> str:
    entry = SHAPES[shape]
    if lang == "ko":
        return entry.ko  # Korean nouns do not inflect for number
    return entry.en_plural if plural else entry.en


def object_phrases(colour: str, shape: str, lang: str) -> list[str]:
    """Ways the synthetic captions name one object: "a photo of a red star" / "빨간 별 그림"."""
    phrase = f"{colour_word(colour, lang)} {shape_word(shape, lang)}"
    if lang == "en":
        return [with_article(phrase), f"a photo of {with_article(phrase)}"]
    return [phrase, f"{phrase} 그림"]


def _single(rng: np.random.Generator, colour: str, shape: str, image_size: int) -> Any:
    """One object of a random size in a random region, on white (black for a white object)."""
    region = ("left", "right", "top", "bottom", "centre")[int(rng.integers(5))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    spec = SceneSpec.single(shape, colour, size=size, region=region,
                            detail_seed=int(rng.integers(2**31)))
    return render_scene(spec, image_size)


def _seen_combos() -> list[tuple[str, str]]:
    return SceneConfig(split="train").allowed_combos()


# ---------------------------------------------------------------- suites
def colour_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Name the colour of one object (classes balanced, shape random among seen partners)."""
    combos = _seen_combos()
    images, labels = [], []
    for i in range(n):
        label = i % len(COLOUR_NAMES)
        colour = COLOUR_NAMES[label]
        shapes = [s for c, s in combos if c == colour]
        images.append(_single(rng, colour, shapes[int(rng.integers(len(shapes)))], image_size))
        labels.append(label)
    # A colour class is the ensemble of that colour on every shape: "a red circle", "a red star"…
    prompts = [[p for s in SHAPE_NAMES for p in object_phrases(c, s, lang)] for c in COLOUR_NAMES]
    names = [COLOURS[c].en if lang == "en" else COLOURS[c].ko for c in COLOUR_NAMES]
    return SuiteTask(names, images, labels, prompts)


def shape_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Name the shape of one object (classes balanced, colour random among seen partners)."""
    combos = _seen_combos()
    images, labels = [], []
    for i in range(n):
        label = i % len(SHAPE_NAMES)
        shape = SHAPE_NAMES[label]
        colours = [c for c, s in combos if s == shape]
        images.append(_single(rng, colours[int(rng.integers(len(colours)))], shape, image_size))
        labels.append(label)
    prompts = [[p for c in COLOUR_NAMES for p in object_phrases(c, s, lang)] for s in SHAPE_NAMES]
    names = [shape_word(s, lang) for s in SHAPE_NAMES]
    return SuiteTask(names, images, labels, prompts)


def heldout_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Name the (colour, shape) of an object whose combination training never showed.

    The candidates are all combinations, so a model that binds colour and shape only by
    memorised pairs picks a seen combination instead; ``colour_accuracy`` and
    ``shape_accuracy`` say which half it got right.
    """
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]
    held_out = sorted(DEFAULT_HELD_OUT)
    images, labels = [], []
    for i in range(n):
        colour, shape = held_out[i % len(held_out)]
        images.append(_single(rng, colour, shape, image_size))
        labels.append(combos.index((colour, shape)))
    prompts = [object_phrases(c, s, lang) for c, s in combos]
    names = [f"{colour_word(c, lang)} {shape_word(s, lang)}" for c, s in combos]
    return SuiteTask(names, images, labels, prompts,
                     attributes={"colour": [c for c, _ in combos],
                                 "shape": [s for _, s in combos]})


def count_phrases(colour: str, shape: str, count: int, lang: str) -> list[str]:
    """Captions of ``count`` identical objects: "three red stars" / "빨간 별 세 개"."""
    if lang == "en":
        phrase = (with_article(f"{colour_word(colour, lang)} {shape_word(shape, lang)}")
                  if count == 1 else
                  f"{number_en(count)} {colour_word(colour, lang)} "
                  f"{shape_word(shape, lang, plural=True)}")
        verb = "is" if count == 1 else "are"
        return [phrase, f"a picture of {phrase}", f"there {verb} {phrase}"]
    noun = f"{colour_word(colour, lang)} {shape_word(shape, lang)}"
    amount = count_phrase(count)
    return [f"{noun} {amount}", f"{attach(noun, '이/가')} {amount} 있다",
            f"{noun} {attach(amount, '이/가')} 그려진 그림"]


def count_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Count 1-5 identical objects; candidates differ only in the number."""
    config = SceneConfig(split="train", layouts=("count",), textures=("solid",),
                         backgrounds=("plain",), max_count=MAX_COUNT)
    images, labels, example_prompts = [], [], []
    for _ in range(n):
        spec = sample_scene(rng, config)
        obj = spec.objects[0]
        images.append(render_scene(spec, image_size))
        labels.append(len(spec.objects) - 1)
        example_prompts.append([count_phrases(obj.colour, obj.shape, k, lang)
                                for k in range(1, MAX_COUNT + 1)])
    names = [number_en(k) if lang == "en" else count_phrase(k) for k in range(1, MAX_COUNT + 1)]
    return SuiteTask(names, images, labels, example_prompts=example_prompts)


def relation_phrases(spec: SceneSpec, relation: str, lang: str) -> list[str]:
    """Captions saying objects[0] is ``relation`` of objects[1], both ways round."""
    (a_obj, b_obj), inverse = spec.objects, INVERSE_RELATION[relation]
    a = f"{colour_word(a_obj.colour, lang)} {shape_word(a_obj.shape, lang)}"
    b = f"{colour_word(b_obj.colour, lang)} {shape_word(b_obj.shape, lang)}"
    if lang == "en":
        a, b = with_article(a), with_article(b)
        return [f"{a} {RELATIONS[relation][0]} {b}", f"{b} {RELATIONS[inverse][0]} {a}",
                f"a photo of {a} {RELATIONS[relation][0]} {b}"]
    return [f"{b} {RELATIONS[relation][1]}에 있는 {a}",
            f"{attach(a, '은/는')} {b}의 {RELATIONS[relation][1]}에 있다",
            f"{a} {RELATIONS[inverse][1]}에 있는 {b}"]


def relation_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Where is the first object relative to the second: left of, right of, above, below."""
    config = SceneConfig(split="train", layouts=("pair",), textures=("solid",),
                         backgrounds=("plain",))
    relations = list(RELATIONS)
    images, labels, example_prompts = [], [], []
    for _ in range(n):
        spec = sample_scene(rng, config)
        images.append(render_scene(spec, image_size))
        labels.append(relations.index(spec.relation))
        example_prompts.append([relation_phrases(spec, r, lang) for r in relations])
    names = [RELATIONS[r][2] if lang == "en" else RELATIONS[r][1] for r in relations]
    return SuiteTask(names, images, labels, example_prompts=example_prompts)


def text_prompts(word: str, lang: str) -> list[str]:
    if lang == "en":
        return [f'a sign that says "{word}"', f'a photo of a sign reading "{word}"',
                f'"{word}" written on a sign']
    # A closing quotation mark is followed by 라고 whatever the word ends in.
    return [f'"{word}"라고 쓰인 표지판', f'"{word}"라고 적힌 표지판',
            f'"{word}" 글자가 있는 표지판']


def text_suite(lang: str, n: int, rng: np.random.Generator, image_size: int) -> SuiteTask:
    """Read a word on a sign (English words for ``en``, Hangul for ``ko``) among 10 words."""
    from imagefm.data.synthetic import text_render

    fonts = text_render.find_hangul_fonts()
    if not fonts:
        raise SuiteUnavailable("no Hangul font found to render text; install one with: "
                               f"{text_render.INSTALL_HINT}")
    pool = text_render.WORDS_EN if lang == "en" else text_render.WORDS_KO
    words = [pool[i] for i in rng.choice(len(pool), size=min(TEXT_CLASSES, len(pool)),
                                         replace=False)]
    images, labels = [], []
    for i in range(n):
        label = i % len(words)
        sign, background = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
        image, _ = text_render.render_text_image(
            words[label], image_size, rng, "sign", COLOUR_NAMES[int(sign)],
            COLOUR_NAMES[int(background)], str(fonts[int(rng.integers(len(fonts)))]))
        images.append(image)
        labels.append(label)
    return SuiteTask(list(words), images, labels, [text_prompts(w, lang) for w in words])


SUITES: dict[str, SuiteBuilder] = {
    "colour": colour_suite,
    "shape": shape_suite,
    "heldout": heldout_suite,
    "count": count_suite,
    "relation": relation_suite,
    "text": text_suite,
}


# ---------------------------------------------------------------- running
def score_task(model: Any, processor: Any, task: SuiteTask,
               batch_size: int = 64) -> torch.Tensor:
    """Logits ``[N, C]`` of each image against its candidates (prompt-ensembled)."""
    groups = task.example_prompts or [task.prompts] * len(task.images)  # type: ignore[list-item]
    texts = list(dict.fromkeys(t for per_image in groups for prompts in per_image
                               for t in prompts))
    row = {t: i for i, t in enumerate(texts)}
    text_embeds = embed_texts(model, processor, texts, batch_size=256)
    image_embeds = embed_images(model, processor, task.images, batch_size)
    cache: dict[int, torch.Tensor] = {}  # shared prompt sets are ensembled once

    def classes_of(per_image: list[list[str]]) -> torch.Tensor:
        key = id(per_image)
        if key not in cache:
            cache[key] = torch.stack([ensemble_prompts(text_embeds[[row[t] for t in prompts]])
                                      for prompts in per_image])
        return cache[key]

    scale, bias = logit_parts(model)
    cosines = torch.stack([classes_of(per_image) @ image
                           for per_image, image in zip(groups, image_embeds, strict=True)])
    return scale * cosines + bias


def run_suite(model: Any, processor: Any, name: str, lang: str = "en", n: int = 100,
              seed: int = 0, *, image_size: int | None = None,
              batch_size: int = 64) -> dict[str, Any]:
    """Build suite ``name`` in ``lang`` with ``n`` images from ``seed`` and score the model.

    Returns the metrics of :func:`imagefm.eval.metrics.classification_metrics` (``top1``,
    ``mean_per_class``, ``per_class``, ``confusion``…) plus ``task``, ``name``, ``lang``,
    ``seed`` and ``<attribute>_accuracy`` where the suite has attributes. A suite that cannot
    run here returns ``{"skipped_reason": ...}`` with its name and language instead of raising.
    Images are rendered at the model's input size unless ``image_size`` is given.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    if lang not in LANGS:
        raise ValueError(f"synthetic suites have languages {LANGS}, got {lang!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size is None:
        card = getattr(processor, "card", None) or getattr(model, "card", None)
        image_size = getattr(card, "image_size", 64)
    head = {"task": "classification", "name": name, "lang": lang, "seed": seed}
    rng = np.random.default_rng([seed, list(SUITES).index(name), LANGS.index(lang)])
    try:
        task = SUITES[name](lang, n, rng, image_size)
    except SuiteUnavailable as err:
        return {**head, "skipped_reason": str(err)}
    scores = score_task(model, processor, task, batch_size)
    labels = torch.tensor(task.labels)
    result = {**head, **classification_metrics(scores, labels, task.classes)}
    predicted = predictions(scores, labels)
    for attribute, values in task.attributes.items():
        hits = [values[p] == values[t] for p, t in zip(predicted.tolist(), task.labels,
                                                       strict=True)]
        result[f"{attribute}_accuracy"] = sum(hits) / len(hits)
    return result


def run_suites(model: Any, processor: Any, names: Sequence[str] | None = None,
               langs: Sequence[str] = LANGS, n: int = 100, seed: int = 0,
               **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`run_suite` for every suite in ``names`` (all when ``None``) and language."""
    return [run_suite(model, processor, name, lang, n, seed, **kwargs)
            for name in (names or list(SUITES)) for lang in langs]
