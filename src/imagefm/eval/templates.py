"""Zero-shot prompt templates per language, and class names per language.

Templates live in ``imagefm/resources/templates/<lang>.txt``, one per line, with ``{}`` where the
class name goes. Rendering is language-aware where the language needs it:

* English: an article written right before the name follows the name's sound as spelled
  ("a {}" → "an apple"), as ``a``/``an`` is chosen by the next word.
* Korean: a particle written right after the name is chosen by the name's last sound, through
  :mod:`imagefm.data.synthetic.korean` (the one particle implementation of the project).
  ``{}을/를 찍은 사진`` → 고양이를 찍은 사진 / 사슴을 찍은 사진; ``이것은 {}(이)다`` → 이것은
  자동차다 / 이것은 곰이다 (the copula 이다 shortens to 다 after a vowel).

All text is NFC-normalised, so a name typed as decomposed jamo gets the same prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources

from imagefm.data.synthetic.korean import particle
from imagefm.data.synthetic.vocab import article

PLACEHOLDER = "{}"
# A Korean particle spec written right after the placeholder: a pair ("을/를", "이에요/예요") or a
# bracketed optional part ("(이)다", "(으)로").
_KOREAN_PARTICLE = re.compile(r"\{\}(\([가-힣]+\)[가-힣]+|[가-힣]+/[가-힣]+)")
# An English indefinite article written right before the placeholder.
_ENGLISH_ARTICLE = re.compile(r"\b([Aa]n?) \{\}")

ClassNames = Sequence[str] | Mapping[str, str] | Mapping[str, Sequence[str]]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def available_languages() -> list[str]:
    """Languages that ship a template file (``en``, ``ko``...)."""
    folder = resources.files("imagefm") / "resources" / "templates"
    return sorted(item.name[:-4] for item in folder.iterdir() if item.name.endswith(".txt"))


def parse_templates(text: str, source: str = "<text>") -> list[str]:
    """Templates from file contents: one per line; blank lines and ``#`` comments are skipped.

    Every template must contain ``{}`` exactly once and every Korean particle spec must be known,
    so a typo fails when the file is read, not in the middle of an evaluation.
    """
    templates = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _nfc(raw.strip())
        if not line or line.startswith("#"):
            continue
        if line.count(PLACEHOLDER) != 1:
            raise ValueError(f"{source}:{number}: a template needs exactly one '{{}}': {line!r}")
        for spec in _KOREAN_PARTICLE.findall(line):
            particle("가", spec)  # raises ValueError naming the known pairs
        templates.append(line)
    if not templates:
        raise ValueError(f"{source}: no templates found")
    return templates


def load_templates(lang: str) -> list[str]:
    """The shipped templates for ``lang`` (see ``available_languages``)."""
    path = resources.files("imagefm") / "resources" / "templates" / f"{lang}.txt"
    if not path.is_file():
        raise ValueError(f"no zero-shot templates for language {lang!r}; shipped languages: "
                         f"{', '.join(available_languages())} (or pass templates=[...])")
    return parse_templates(path.read_text(encoding="utf-8"), f"templates/{lang}.txt")


def render(template: str, name: str, lang: str = "en") -> str:
    """One prompt: ``template`` with ``name`` in place of ``{}``, grammar fixed for ``lang``."""
    template, name = _nfc(template), _nfc(name.strip())
    # Resolve "{}을/를" into "{}를" first, then put the name in. A Hangul particle spec is
    # unambiguous, so this runs whatever ``lang`` says (ko, ko-KR...).
    template = _KOREAN_PARTICLE.sub(lambda m: PLACEHOLDER + particle(name, m.group(1)), template)
    if lang == "en":
        template = _ENGLISH_ARTICLE.sub(
            lambda m: _match_case(m.group(1), article(name)) + " " + PLACEHOLDER, template)
    # str.replace rather than str.format: names may contain braces.
    return template.replace(PLACEHOLDER, name, 1)


def _match_case(original: str, replacement: str) -> str:
    return replacement.capitalize() if original[:1].isupper() else replacement


def render_all(templates: Sequence[str], name: str, lang: str = "en") -> list[str]:
    """Every template rendered for one class name, duplicates removed (order kept)."""
    return list(dict.fromkeys(render(t, name, lang) for t in templates))


def resolve_classnames(classnames: ClassNames, lang: str = "en") -> list[str]:
    """Class display names in ``lang`` from one of the forms callers have at hand.

    * a list of names: used as they are, whatever ``lang`` is;
    * ``{"en": [...], "ko": [...]}``: the list for ``lang``;
    * ``{"cat": "고양이", ...}`` (English → other language): keys for ``en``, values otherwise.
    """
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list or a dict, not one string")
    if isinstance(classnames, Mapping):
        if not classnames:
            raise ValueError("classnames is empty")
        values = list(classnames.values())
        if all(isinstance(v, str) for v in values):
            names = list(classnames.keys()) if lang == "en" else values
        elif all(isinstance(v, Sequence) and not isinstance(v, str) for v in values):
            if lang not in classnames:
                raise ValueError(f"no class names for language {lang!r}; given languages: "
                                 f"{', '.join(map(str, classnames))}")
            names = list(classnames[lang])
        else:
            raise TypeError("classnames dict must map names to names (en → other language) or "
                            "languages to lists of names")
    else:
        names = list(classnames)
    if not names:
        raise ValueError("classnames is empty")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:3]!r}")
    return [_nfc(n.strip()) for n in names]
