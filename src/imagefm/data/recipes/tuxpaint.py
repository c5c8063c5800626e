"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``): ~800 drawings with English + Korean text.

Layout under ``/usr/share/tuxpaint/stamps/<category>/...``: ``<name>.png`` (or only ``.svg``)
and ``<name>.txt`` whose first line is the English description, followed by ``<lang>.utf8=...``
lines (``ko.utf8=사자``). Quirks seen in the real files and handled here:

* some stamps exist only as SVG: skipped (counted) since nothing here renders SVG;
* ``<name>_mirror.png`` is Tux Paint's pre-mirrored variant of a stamp, not a new picture;
* a few PNGs have no ``.txt`` (no caption) and a few ``.txt`` have no picture;
* texts wrapped in quotes (``“T자 길”``, ``“Arrow”.``), tabs after ``=``, double spaces;
* some stems repeat in different folders (``lion`` twice): keys use the path, the split the stem.

The split follows the project rule ``reserved_test_split(stem)`` (``test`` iff held out).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from imagefm.data.formats import SkipCounter, safe_key
from imagefm.data.recipes.base import Recipe, image_is_usable, register, split_for
from imagefm.data.records import Caption, Record

DEFAULT_SRC = "/usr/share/tuxpaint/stamps"
LICENSE = "GPL-2.0-or-later"
_LANG_LINE = re.compile(r"^([a-z]{2,3}(?:_[A-Z]{2})?(?:@[A-Za-z]+)?)\.utf8=(.*)$")
# A whole text in quotes, optionally followed by final punctuation: “Arrow”. → Arrow.
_QUOTED = re.compile(r'^[“"]([^“”"]*)[”"]([.!?]?)$')
_LEADING_DASH = re.compile(r"^[-–—]\s+")  # "– Because a brain is..." (a quip, not a list)


def clean_text(text: str) -> str:
    """One line of stamp text: whitespace collapsed, a leading dash and wrapping quotes removed."""
    text = _LEADING_DASH.sub("", " ".join(text.split()))
    match = _QUOTED.match(text)
    if match:
        text = match.group(1).strip() + match.group(2)
    return text


def lang_tag(locale: str) -> str:
    """Tux Paint locale → BCP-47 tag: ``ko`` → ``ko``, ``pt_BR`` → ``pt-BR``, ``sr@latin`` →
    ``sr-Latn``."""
    base, _, variant = locale.partition("@")
    tag = base.replace("_", "-")
    if variant == "latin":
        return f"{tag}-Latn"
    return f"{tag}-{variant}" if variant else tag


def parse_description(text: str) -> dict[str, str]:
    """``{lang: text}`` from a stamp ``.txt``: the first line is English, then ``xx.utf8=`` lines.

    Empty texts are left out; the first line of a language wins when it repeats.
    """
    texts: dict[str, str] = {}
    lines = text.lstrip("\ufeff").splitlines()
    for number, line in enumerate(lines):
        match = _LANG_LINE.match(line.strip())
        if match:
            lang, value = lang_tag(match.group(1)), clean_text(match.group(2))
        elif number == 0:
            lang, value = "en", clean_text(line)
        else:
            continue  # stray lines carry no language
        if value and lang not in texts:
            texts[lang] = value
    return texts


def _stamp_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(description files, PNGs that have no description and are not mirror variants)."""
    texts = sorted(p for p in root.rglob("*.txt") if p.is_file())
    orphans = sorted(p for p in root.rglob("*.png") if not p.with_suffix(".txt").exists()
                     and not p.stem.endswith("_mirror"))
    return texts, orphans


def build(root: Path, skips: SkipCounter, languages: tuple[str, ...] = ("en", "ko")
          ) -> Iterator[Record]:
    """Records for every stamp with a PNG and a caption in ``languages``."""
    texts, orphans = _stamp_files(root)
    for png in orphans:
        skips.add("no description", f"{png}: PNG without a .txt description")
    for txt in texts:
        relative = txt.relative_to(root).with_suffix("")
        png = txt.with_suffix(".png")
        if not png.is_file():
            if txt.with_suffix(".svg").is_file():
                skips.add("svg only (no PNG)", f"{txt.with_suffix('.svg')}: SVG is not rendered")
            else:
                skips.add("missing image", f"{txt}: no picture beside the description")
            continue
        try:
            described = parse_description(txt.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            skips.add("invalid utf-8", f"{txt}: {err}")
            continue
        captions = [Caption(described[lang], lang) for lang in languages if lang in described]
        if not captions:
            skips.add("empty caption", f"{txt}: no text in {', '.join(languages)}")
            continue
        data = png.read_bytes()
        if not image_is_usable(data, str(png), skips):
            continue
        yield Record(key=safe_key("tuxpaint-" + relative.as_posix().replace("/", "-"), unique=True),
                     image=data, image_ext="png", captions=captions, split=split_for(txt.stem),
                     source="tuxpaint", license=LICENSE,
                     meta={"name": txt.stem, "path": relative.as_posix() + ".png",
                           "category": relative.parent.as_posix()})


def count(root: Path) -> int:
    texts, orphans = _stamp_files(root)
    return len(texts) + len(orphans)


RECIPE = register(Recipe(
    name="tuxpaint",
    summary="Tux Paint stamps (Debian tuxpaint-stamps-default)",
    license=f"{LICENSE} (Tux Paint stamps; see /usr/share/doc/tuxpaint-stamps-default/copyright)",
    install="Install them with: sudo apt-get install -y tuxpaint-stamps-default "
            "(or pass --src DIR pointing at a stamps folder).",
    build=build,
    default_src=DEFAULT_SRC,
    debian_package="tuxpaint-stamps-default",
    count=count,
    notes="English caption = first line of <name>.txt, Korean = its ko.utf8= line. "
          "SVG-only stamps and _mirror variants are not included.",
    split_rule="test iff int(sha1(file stem).hexdigest(), 16) % 5 == 0 (reserved evaluation set)",
))
