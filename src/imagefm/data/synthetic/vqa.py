"""Question/answer pairs about a scene, in English and Korean, read off the ``SceneSpec``.

A question is only asked when its answer is unambiguous in the scene (e.g. "what colour is
the circle?" only if all circles share one colour). Answers are short: "2" / "두 개",
"red" / "빨간색", "yes" / "예".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from imagefm.data.records import IMAGE_TOKEN, Turn
from imagefm.data.synthetic.korean import attach, count_phrase
from imagefm.data.synthetic.scenes import SceneObject, SceneSpec
from imagefm.data.synthetic.vocab import (
    COLOURS,
    POSITION_ANSWERS,
    RELATIONS,
    SHAPES,
    SIZES,
    article,
)

YES_NO = {"en": ("yes", "no"), "ko": ("예", "아니요")}


@dataclass(frozen=True)
class QA:
    """One question with its answer in both languages; ``kind`` says what it tests."""

    kind: str
    question_en: str
    answer_en: str
    question_ko: str
    answer_ko: str

    def in_lang(self, lang: str) -> tuple[str, str]:
        if lang == "en":
            return self.question_en, self.answer_en
        if lang == "ko":
            return self.question_ko, self.answer_ko
        raise ValueError(f"VQA languages are 'en' and 'ko', got {lang!r}")


def yes_no_qa(kind: str, q_en: str, q_ko: str, truth: bool) -> QA:
    """A yes/no question whose answer is ``truth`` (yes/예 or no/아니요)."""
    i = 0 if truth else 1
    return QA(kind, q_en, YES_NO["en"][i], q_ko, YES_NO["ko"][i])


def _thing_en(colour: str, shape: str) -> str:
    return f"{COLOURS[colour].en} {SHAPES[shape].en}"


def _a_thing_en(colour: str, shape: str) -> str:
    thing = _thing_en(colour, shape)
    return f"{article(thing)} {thing}"


def _thing_ko(colour: str, shape: str) -> str:
    return f"{COLOURS[colour].ko_attributive[0]} {SHAPES[shape].ko}"


def _count_questions(objects: tuple[SceneObject, ...]) -> list[QA]:
    questions = []
    for shape in sorted({o.shape for o in objects}):
        n = sum(o.shape == shape for o in objects)
        entry = SHAPES[shape]
        questions.append(QA("count", f"How many {entry.en_plural} are there?", str(n),
                            f"{attach(entry.ko, '이/가')} 몇 개 있나요?", count_phrase(n)))
    n = len(objects)
    questions.append(QA("count", "How many shapes are there in the image?", str(n),
                        "그림에 도형이 모두 몇 개 있나요?", count_phrase(n)))
    return questions


def _attribute_questions(objects: tuple[SceneObject, ...]) -> list[QA]:
    questions = []
    for shape in sorted({o.shape for o in objects}):
        colours = {o.colour for o in objects if o.shape == shape}
        if len(colours) == 1:  # otherwise "the circle" has no single colour
            colour = COLOURS[colours.pop()]
            many = sum(o.shape == shape for o in objects) > 1
            q_en = (f"What colour are the {SHAPES[shape].en_plural}?" if many
                    else f"What colour is the {SHAPES[shape].en}?")
            questions.append(QA("colour", q_en, colour.en,
                                f"{attach(SHAPES[shape].ko, '은/는')} 무슨 색인가요?", colour.ko))
    for colour in sorted({o.colour for o in objects}):
        shapes = {o.shape for o in objects if o.colour == colour}
        if len(shapes) == 1:
            shape = SHAPES[shapes.pop()]
            many = sum(o.colour == colour for o in objects) > 1
            q_en = (f"What shape are the {COLOURS[colour].en} objects?" if many
                    else f"What shape is the {COLOURS[colour].en} object?")
            q_ko = f"{COLOURS[colour].ko_attributive[0]} 도형은 어떤 모양인가요?"
            questions.append(QA("shape", q_en, shape.en, q_ko, shape.ko))
    return questions


def _existence_questions(spec: SceneSpec, rng: np.random.Generator,
                         mentionable: Iterable[tuple[str, str]]) -> list[QA]:
    present = sorted(spec.combos)
    colour, shape = present[int(rng.integers(len(present)))]
    questions = [yes_no_qa("exists", f"Is there {_a_thing_en(colour, shape)} in the image?",
                         f"{attach(_thing_ko(colour, shape), '이/가')} 있나요?", True)]
    absent = [c for c in mentionable if c not in spec.combos]
    # Prefer near misses (right colour or right shape) so "no" needs both attributes checked.
    near = [c for c in absent if c[0] in {p[0] for p in present} or c[1] in {p[1] for p in present}]
    pool = near if near and rng.random() < 0.7 else absent
    if pool:
        colour, shape = pool[int(rng.integers(len(pool)))]
        questions.append(yes_no_qa("exists", f"Is there {_a_thing_en(colour, shape)} in the image?",
                                 f"{attach(_thing_ko(colour, shape), '이/가')} 있나요?", False))
    return questions


def _layout_questions(spec: SceneSpec, rng: np.random.Generator) -> list[QA]:
    if spec.layout == "single":
        obj = spec.objects[0]
        entry = SHAPES[obj.shape]
        where_en, where_ko = POSITION_ANSWERS[spec.region]
        size_en = SIZES[obj.size][0]
        size_ko = "작아요" if obj.size == "small" else "커요"
        return [
            QA("position", f"Where is the {entry.en} in the image?", where_en,
               f"{attach(entry.ko, '은/는')} 그림의 어디에 있나요?", where_ko),
            QA("size", f"Is the {entry.en} small or large?", size_en,
               f"{attach(entry.ko, '은/는')} 작나요, 크나요?", size_ko),
        ]
    if spec.layout == "pair":
        a, b = spec.objects
        a_en, b_en = _thing_en(*a.combo), _thing_en(*b.combo)
        a_ko, b_ko = _thing_ko(*a.combo), _thing_ko(*b.combo)
        relation = spec.relation
        asked = relation if rng.random() < 0.5 else _pick_other_relation(relation, rng)
        return [
            QA("relation", f"Where is the {a_en} relative to the {b_en}?",
               RELATIONS[relation][2], f"{attach(a_ko, '은/는')} {b_ko}의 어느 쪽에 있나요?",
               RELATIONS[relation][1]),
            yes_no_qa("relation", f"Is the {a_en} {RELATIONS[asked][0]} the {b_en}?",
                    f"{attach(a_ko, '이/가')} {b_ko}의 {RELATIONS[asked][1]}에 있나요?",
                    asked == relation),
        ]
    return []


def _pick_other_relation(relation: str, rng: np.random.Generator) -> str:
    others = [r for r in RELATIONS if r != relation]
    return others[int(rng.integers(len(others)))]


def scene_questions(spec: SceneSpec, rng: np.random.Generator,
                    mentionable: Iterable[tuple[str, str]]) -> list[QA]:
    """Every unambiguous question about ``spec``.

    ``mentionable`` lists the (colour, shape) pairs a "no" question may name; the train split
    passes only its allowed pairs so held-out compositions never appear even in text.
    """
    background = COLOURS[spec.background.colour]
    return [
        *_count_questions(spec.objects),
        *_attribute_questions(spec.objects),
        *_existence_questions(spec, rng, mentionable),
        *_layout_questions(spec, rng),
        QA("background", "What colour is the background?", background.en,
           "배경은 무슨 색인가요?", background.ko),
    ]


def pick_questions(questions: list[QA], k: int, rng: np.random.Generator) -> list[QA]:
    """Up to ``k`` questions of different kinds, in random order."""
    by_kind: dict[str, list[QA]] = {}
    for qa in questions:
        by_kind.setdefault(qa.kind, []).append(qa)
    kinds = sorted(by_kind)
    chosen = []
    for index in rng.permutation(len(kinds))[:k].tolist():
        options = by_kind[kinds[index]]
        chosen.append(options[int(rng.integers(len(options)))])
    return chosen


def conversation(questions: list[QA], lang: str) -> list[Turn]:
    """User/assistant turns; the first user turn starts with the image placeholder."""
    turns = []
    for i, qa in enumerate(questions):
        question, answer = qa.in_lang(lang)
        prefix = f"{IMAGE_TOKEN}\n" if i == 0 else ""
        turns.append(Turn("user", prefix + question))
        turns.append(Turn("assistant", answer))
    return turns
