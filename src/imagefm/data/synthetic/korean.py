"""Korean grammar helpers: particles chosen by the final consonant (batchim), and counters.

Korean particles have two forms and the choice depends on how the previous word *sounds*:
after a final consonant 사과를 / 수박을, 하트가 / 원이. The instrumental (으)로 is special:
a word ending in ㄹ takes 로 (별로, 물로) like a vowel-final word. Zero-shot prompt templates,
captions and VQA answers all go through ``attach`` so the choice is made in one place.

Counting uses native Korean numerals in their short attributive forms before a counter:
한 개, 두 개, 세 개, 네 개, 다섯 개, ..., 스무 개 (not 일 개, 이 개).
"""

from __future__ import annotations

import unicodedata

_HANGUL_FIRST = 0xAC00
_HANGUL_LAST = 0xD7A3
_FINALS_PER_VOWEL = 28
_RIEUL_FINAL = 8  # index of ㄹ among the 28 final-consonant slots

# How a trailing digit is read in Sino-Korean (영 일 이 삼 사 오 육 칠 팔 구): the final
# consonant of that reading decides the particle ("3이", "2가"). 0 = none, 8 = ㄹ, other = yes.
_DIGIT_FINAL = {"0": 21, "1": 8, "2": 0, "3": 16, "4": 0, "5": 0, "6": 1, "7": 8, "8": 8,
                "9": 0}
# Latin letters read as Korean (엘, 엠, 엔, 알) end in a consonant; the rest end in a vowel.
_LETTER_FINAL = {"l": 8, "m": 16, "n": 4, "r": 8}

# (form after a final consonant, form after a vowel) for the particles with two shapes.
_PARTICLES: dict[str, tuple[str, str]] = {
    "이/가": ("이", "가"),
    "을/를": ("을", "를"),
    "은/는": ("은", "는"),
    "과/와": ("과", "와"),
    "아/야": ("아", "야"),
    "이랑/랑": ("이랑", "랑"),
    "이나/나": ("이나", "나"),
    "이다/다": ("이다", "다"),
    "이에요/예요": ("이에요", "예요"),
    "이라고/라고": ("이라고", "라고"),
    "으로/로": ("으로", "로"),
}

_NATIVE_UNITS = ("", "한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉")
_NATIVE_TENS = ("", "열", "스물", "서른", "마흔", "쉰", "예순", "일흔", "여든", "아흔")
_NATIVE_UNITS_STANDALONE = ("", "하나", "둘", "셋", "넷", "다섯", "여섯", "일곱", "여덟", "아홉")


def _last_sound(word: str) -> str:
    """The last character that is pronounced: skips trailing spaces, quotes and punctuation."""
    text = unicodedata.normalize("NFC", word).rstrip()
    for char in reversed(text):
        if char.isalnum():
            return char
    raise ValueError(f"cannot choose a Korean particle for {word!r}: it has no letters or digits")


def final_consonant(word: str) -> int:
    """Index (0-27) of the final consonant of the word's last syllable; 0 means none.

    Hangul syllables are decoded arithmetically; a trailing digit or Latin letter is judged by
    its usual Korean reading (``"3"`` → 삼 → ㅁ). Other letters count as vowel-final.
    """
    char = _last_sound(word)
    code = ord(char)
    if _HANGUL_FIRST <= code <= _HANGUL_LAST:
        return (code - _HANGUL_FIRST) % _FINALS_PER_VOWEL
    if char in _DIGIT_FINAL:
        return _DIGIT_FINAL[char]
    return _LETTER_FINAL.get(char.lower(), 0)


def has_batchim(word: str) -> bool:
    """True when the word ends in a final consonant (받침): 원, 수박, 별 yes; 사과, 하트 no."""
    return final_consonant(word) != 0


def ends_in_rieul(word: str) -> bool:
    """True when the final consonant is ㄹ (별, 물, 일곱), which takes 로 rather than 으로."""
    return final_consonant(word) == _RIEUL_FINAL


def particle(word: str, spec: str) -> str:
    """The form of particle ``spec`` that follows ``word`` (without the word).

    ``spec`` is a pair such as ``"이/가"``, ``"을/를"``, ``"은/는"``, ``"와/과"``, ``"(으)로"``,
    ``"(이)라고"`` (either order for pairs), or a fixed particle such as ``"의"`` or ``"도"``.
    """
    spec = unicodedata.normalize("NFC", spec)
    if spec.startswith("("):
        # "(으)로", "(이)다": the bracketed part appears only after a final consonant.
        close = spec.index(")")
        optional, rest = spec[1:close], spec[close + 1:]
        consonant_form, vowel_form = optional + rest, rest
    elif "/" in spec:
        first, second = spec.split("/", 1)
        forms = _PARTICLES.get(spec) or _PARTICLES.get(f"{second}/{first}")
        if forms is None:
            known = ", ".join(sorted(_PARTICLES))
            raise ValueError(f"unknown particle pair {spec!r}; known pairs: {known}")
        consonant_form, vowel_form = forms
    else:
        return spec
    if vowel_form == "로" and ends_in_rieul(word):
        return vowel_form  # ㄹ-final words behave like vowel-final ones for (으)로
    return consonant_form if has_batchim(word) else vowel_form


def attach(word: str, spec: str) -> str:
    """``word`` plus the right form of particle ``spec``: ``attach("원", "이/가")`` → 원이."""
    word = unicodedata.normalize("NFC", word)
    return word + particle(word, spec)


def native_number(n: int, attributive: bool = True) -> str:
    """Native Korean numeral for 1-99: before a counter 한, 두, 스무; standalone 하나, 둘, 스물."""
    if not 1 <= n <= 99:
        raise ValueError(f"native Korean numerals cover 1-99, got {n}")
    tens, units = divmod(n, 10)
    if attributive:
        # 스물 shortens to 스무 only when it stands alone before a counter (스무 개, 스물한 개).
        ten_word = "스무" if n == 20 else _NATIVE_TENS[tens]
        return ten_word + _NATIVE_UNITS[units]
    return _NATIVE_TENS[tens] + _NATIVE_UNITS_STANDALONE[units]


def count_phrase(n: int, counter: str = "개") -> str:
    """A count with its counter: ``count_phrase(2)`` → 두 개; 0 and 100+ use digits (120개)."""
    if n < 0:
        raise ValueError(f"cannot count a negative number of things: {n}")
    if n == 0 or n >= 100:
        return f"{n}{counter}"
    return f"{native_number(n)} {counter}"
