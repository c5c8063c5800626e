"""Captions for scenes in English and Korean, from several paraphrase templates per language.

The Korean templates are written as Korean sentences, not translated word by word: noun
phrases put relative clauses first (줄무늬가 있는 작은 빨간 원), counts follow the noun with a
counter (삼각형 두 개), relations are "B의 왼쪽에 있는 A", and every particle is chosen by
``korean.attach``. Optional attributes (size, texture) are mentioned at random but are always
true of the scene.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imagefm.data.synthetic.korean import attach, count_phrase
from imagefm.data.synthetic.scenes import SceneObject, SceneSpec
from imagefm.data.synthetic.vocab import (
    COLOURS,
    INVERSE_RELATION,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    article,
    number_en,
)

Template = Callable[[SceneSpec, np.random.Generator], str]


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


# ---------------------------------------------------------------- English phrases
def noun_phrase_en(obj: SceneObject, rng: np.random.Generator, plural: bool = False,
                   detail: float = 0.5) -> str:
    """[size] [texture] colour shape, without an article: "small striped red circle"."""
    words = []
    if _maybe(rng, detail):
        words.append(SIZES[obj.size][0])
    if obj.texture != "solid" and _maybe(rng, detail):
        words.append(TEXTURES[obj.texture][0])
    words.append(COLOURS[obj.colour].en)
    shape = SHAPES[obj.shape]
    words.append(shape.en_plural if plural else shape.en)
    return " ".join(words)


def object_en(obj: SceneObject, rng: np.random.Generator, detail: float = 0.5) -> str:
    return with_article(noun_phrase_en(obj, rng, detail=detail))


def count_en(spec: SceneSpec, rng: np.random.Generator) -> str:
    n = len(spec.objects)
    if n == 1:
        return object_en(spec.objects[0], rng)
    return f"{number_en(n)} {noun_phrase_en(spec.objects[0], rng, plural=True)}"


def background_en(spec: SceneSpec) -> str:
    colour = COLOURS[spec.background.colour].en
    phrase = {"plain": f"{colour} background", "gradient": f"{colour} gradient background",
              "noise": f"noisy {colour} background"}[spec.background.kind]
    return with_article(phrase)


# ---------------------------------------------------------------- Korean phrases
def colour_ko(colour: str, rng: np.random.Generator) -> str:
    """An attributive colour word, varied among natural forms (빨간 / 빨간색)."""
    forms = COLOURS[colour].ko_attributive
    return forms[int(rng.integers(len(forms)))]


def shape_ko(shape: str, rng: np.random.Generator, alternative: float = 0.15) -> str:
    """The canonical Korean shape name, occasionally a common alternative (동그라미, 네모)."""
    entry = SHAPES[shape]
    if entry.ko_alternatives and _maybe(rng, alternative):
        return entry.ko_alternatives[int(rng.integers(len(entry.ko_alternatives)))]
    return entry.ko


def noun_phrase_ko(obj: SceneObject, rng: np.random.Generator, detail: float = 0.5) -> str:
    """[texture clause] [size] colour shape: "줄무늬가 있는 작은 빨간 원"."""
    words = []
    if obj.texture != "solid" and _maybe(rng, detail):
        words.append(TEXTURES[obj.texture][1])
    if _maybe(rng, detail):
        words.append(SIZES[obj.size][1])
    words.append(colour_ko(obj.colour, rng))
    words.append(shape_ko(obj.shape, rng))
    return " ".join(words)


def background_ko(spec: SceneSpec, rng: np.random.Generator) -> str:
    colour = spec.background.colour
    kind = spec.background.kind
    if kind == "plain":
        return f"{colour_ko(colour, rng)} 배경"
    if kind == "gradient":
        return f"{COLOURS[colour].ko} 그라데이션 배경"
    return f"거친 질감의 {colour_ko(colour, rng)} 배경"


# ---------------------------------------------------------------- templates
def _single_en() -> list[Template]:
    def obj(s, r):
        return object_en(s.objects[0], r)

    def where(s):
        return POSITIONS[s.region][0]

    return [
        lambda s, r: f"{obj(s, r)} on {background_en(s)}",
        lambda s, r: f"a photo of {obj(s, r)}",
        lambda s, r: f"{obj(s, r)} {where(s)}",
        lambda s, r: f"there is {obj(s, r)} {where(s)} of the image",
        lambda s, r: f"a simple drawing of {obj(s, r)} {where(s)}, on {background_en(s)}",
    ]


def _single_ko() -> list[Template]:
    def obj(s, r):
        return noun_phrase_ko(s.objects[0], r)

    def where(s):
        return POSITIONS[s.region][1]

    return [
        lambda s, r: f"{background_ko(s, r)} 위의 {obj(s, r)}",
        lambda s, r: f"{obj(s, r)} 그림",
        lambda s, r: f"{where(s)}에 있는 {obj(s, r)}",
        lambda s, r: f"{where(s)}에 {attach(obj(s, r), '이/가')} 있다",
        lambda s, r: f"{background_ko(s, r)}에 그려진 {obj(s, r)}",
    ]


def _count_en() -> list[Template]:
    def there(s, r):
        verb = "is" if len(s.objects) == 1 else "are"
        return f"there {verb} {count_en(s, r)}"

    return [
        lambda s, r: count_en(s, r),
        lambda s, r: f"{count_en(s, r)} on {background_en(s)}",
        lambda s, r: f"a picture of {count_en(s, r)}",
        there,
    ]


def _count_ko() -> list[Template]:
    def np_(s, r):
        return noun_phrase_ko(s.objects[0], r)

    def n(s):
        return count_phrase(len(s.objects))

    return [
        lambda s, r: f"{np_(s, r)} {n(s)}",
        lambda s, r: f"{background_ko(s, r)} 위의 {np_(s, r)} {n(s)}",
        lambda s, r: f"{attach(np_(s, r), '이/가')} {n(s)} 있다",
        lambda s, r: f"{np_(s, r)} {attach(n(s), '이/가')} 그려진 그림",
    ]


def _pair_en() -> list[Template]:
    def a(s, r):
        return object_en(s.objects[0], r)

    def b(s, r):
        return object_en(s.objects[1], r)

    def rel(s):
        return RELATIONS[s.relation][0]

    def inverse(s):
        return RELATIONS[INVERSE_RELATION[s.relation]][0]

    return [
        lambda s, r: f"{a(s, r)} {rel(s)} {b(s, r)}",
        lambda s, r: f"{b(s, r)} {inverse(s)} {a(s, r)}",
        lambda s, r: f"a photo of {a(s, r)} {rel(s)} {b(s, r)}",
        lambda s, r: f"{a(s, r)} and {b(s, r)} on {background_en(s)}",
    ]


def _pair_ko() -> list[Template]:
    def a(s, r):
        return noun_phrase_ko(s.objects[0], r)

    def b(s, r):
        return noun_phrase_ko(s.objects[1], r)

    def rel(s):
        return RELATIONS[s.relation][1]

    def inverse(s):
        return RELATIONS[INVERSE_RELATION[s.relation]][1]

    return [
        lambda s, r: f"{b(s, r)} {rel(s)}에 있는 {a(s, r)}",
        lambda s, r: f"{attach(a(s, r), '은/는')} {b(s, r)}의 {rel(s)}에 있다",
        lambda s, r: f"{a(s, r)} {inverse(s)}에 있는 {b(s, r)}",
        lambda s, r: f"{background_ko(s, r)} 위의 {attach(a(s, r), '와/과')} {b(s, r)}",
    ]


TEMPLATES: dict[str, dict[str, list[Template]]] = {
    "en": {"single": _single_en(), "count": _count_en(), "pair": _pair_en()},
    "ko": {"single": _single_ko(), "count": _count_ko(), "pair": _pair_ko()},
}


def scene_captions(spec: SceneSpec, lang: str, rng: np.random.Generator, k: int = 2) -> list[str]:
    """``k`` captions of ``spec`` in ``lang`` from distinct templates (fewer if duplicates)."""
    templates = TEMPLATES[lang][spec.layout]
    order = rng.permutation(len(templates))[:k]
    captions: list[str] = []
    for index in order.tolist():
        text = templates[index](spec, rng)
        if text not in captions:
            captions.append(text)
    return captions
