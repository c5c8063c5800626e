"""The class vocabulary of the synthetic scenes, with names in English and Korean.

Zero-shot evaluation builds prompts from these names (``class_names("colour", "ko")``), and the
caption/VQA templates use the same words, so a model is evaluated on the words it was taught.
RGB values are chosen to stay far apart (no two colours closer than ~80 in RGB distance), so a
colour class is never ambiguous in a rendered image.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Colour:
    """A named colour: RGB, English name, Korean noun (빨간색) and attributive forms (빨간)."""

    name: str
    rgb: tuple[int, int, int]
    en: str
    ko: str  # noun form used in answers and class names: 빨간색
    ko_attributive: tuple[str, ...]  # forms that go before a noun: 빨간 원, 빨간색 원


@dataclass(frozen=True)
class Shape:
    """A named shape: English singular/plural, canonical Korean name and alternatives."""

    name: str
    en: str
    en_plural: str
    ko: str
    ko_alternatives: tuple[str, ...] = ()


COLOURS: dict[str, Colour] = {c.name: c for c in (
    Colour("red", (220, 30, 35), "red", "빨간색", ("빨간", "빨간색")),
    Colour("green", (35, 155, 55), "green", "초록색", ("초록색", "초록")),
    Colour("blue", (35, 75, 220), "blue", "파란색", ("파란", "파란색")),
    Colour("yellow", (245, 215, 35), "yellow", "노란색", ("노란", "노란색")),
    Colour("purple", (135, 50, 175), "purple", "보라색", ("보라색",)),
    Colour("orange", (245, 130, 20), "orange", "주황색", ("주황색",)),
    Colour("black", (20, 20, 20), "black", "검은색", ("검은", "검은색")),
    Colour("white", (245, 245, 245), "white", "흰색", ("흰", "하얀", "흰색")),
    Colour("brown", (125, 75, 35), "brown", "갈색", ("갈색",)),
    Colour("pink", (250, 145, 195), "pink", "분홍색", ("분홍색",)),
    Colour("grey", (128, 128, 128), "grey", "회색", ("회색",)),
)}

SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("circle", "circle", "circles", "원", ("동그라미",)),
    Shape("square", "square", "squares", "정사각형", ("네모",)),
    Shape("triangle", "triangle", "triangles", "삼각형", ("세모",)),
    Shape("star", "star", "stars", "별"),
    Shape("heart", "heart", "hearts", "하트"),
    Shape("hexagon", "hexagon", "hexagons", "육각형"),
    Shape("cross", "cross", "crosses", "십자가", ("십자 모양",)),
    Shape("pentagon", "pentagon", "pentagons", "오각형"),
    Shape("diamond", "diamond", "diamonds", "마름모"),
    Shape("crescent", "crescent", "crescents", "초승달"),
)}

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)

SIZES = {"small": ("small", "작은"), "large": ("large", "큰")}
TEXTURES = {"solid": ("", ""), "striped": ("striped", "줄무늬가 있는"),
            "dotted": ("dotted", "물방울무늬가 있는")}
# Named regions of the image: English phrase, Korean noun (used as 왼쪽에, 가운데에...).
POSITIONS = {
    "left": ("on the left", "왼쪽"),
    "right": ("on the right", "오른쪽"),
    "top": ("at the top", "위쪽"),
    "bottom": ("at the bottom", "아래쪽"),
    "centre": ("in the centre", "가운데"),
}
# Answer words for "where is ..." questions.
POSITION_ANSWERS = {"left": ("left", "왼쪽"), "right": ("right", "오른쪽"), "top": ("top", "위쪽"),
                    "bottom": ("bottom", "아래쪽"), "centre": ("centre", "가운데")}
# Relation of object A to object B: English phrase, Korean noun (B의 왼쪽에 있는 A), answer words.
RELATIONS = {
    "left": ("to the left of", "왼쪽", "left"),
    "right": ("to the right of", "오른쪽", "right"),
    "above": ("above", "위", "above"),
    "below": ("below", "아래", "below"),
}
INVERSE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}
BACKGROUND_KINDS = ("plain", "gradient", "noise")

# Default held-out compositions: one colour per shape, every colour and shape still seen in
# training with other partners, so eval measures compositional generalisation.
DEFAULT_HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "heart"), ("blue", "triangle"), ("yellow", "circle"),
    ("purple", "square"), ("orange", "hexagon"), ("black", "cross"), ("white", "pentagon"),
    ("brown", "diamond"), ("pink", "crescent"),
})

NUMBER_WORDS_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                   "nine", "ten")


def class_names(attribute: str, lang: str = "en") -> dict[str, str]:
    """Class id → display name for ``attribute`` ("colour" or "shape") in ``lang`` ("en", "ko").

    Korean colour names are nouns (빨간색) so prompts like ``"{name} 도형"`` read naturally.
    """
    if lang not in ("en", "ko"):
        raise ValueError(f"synthetic vocabulary has languages 'en' and 'ko', got {lang!r}")
    if attribute == "colour":
        return {c.name: getattr(c, lang) for c in COLOURS.values()}
    if attribute == "shape":
        return {s.name: getattr(s, lang) for s in SHAPES.values()}
    raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")


def article(word: str) -> str:
    """English indefinite article for the word that follows it (an orange, a red)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def number_en(n: int) -> str:
    """Small numbers as words (two), larger ones as digits."""
    return NUMBER_WORDS_EN[n] if 0 <= n < len(NUMBER_WORDS_EN) else str(n)
