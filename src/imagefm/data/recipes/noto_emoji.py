"""Emoji pictures (recipe ``emoji``): Noto Color Emoji glyphs named in English and Korean.

Glyphs come from Debian ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``), names from the PyPI
``emoji`` package (``EMOJI_DATA[e]["en"]``, ``["ko"]``, CLDR short names). Only base emoji:
fully-qualified sequences without skin-tone modifiers or zero-width joiners (~1,650).

The font is a CBDT bitmap font: Pillow can only load it at its one bitmap size (109) and must
draw with ``embedded_color=True``; we crop the glyph, centre it on a white square and resize.
Emoji newer than the installed font draw nothing: those are skipped and counted.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagefm.data.formats import SkipCounter
from imagefm.data.recipes.base import MissingSourceError, Recipe, register, split_for
from imagefm.data.records import Caption, Record

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CBDT_SIZE = 109  # the only size a CBDT bitmap font loads at
LICENSE = "OFL-1.1 (Noto Color Emoji font) / Apache-2.0 (its tools); names: Unicode CLDR"
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_ZWJ = "\u200d"
_REGIONAL = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)


def _emoji_data() -> dict[str, dict[str, Any]]:
    try:
        import emoji
    except ImportError as err:
        raise MissingSourceError("emoji names need the PyPI package 'emoji': "
                                 "pip install emoji") from err

    data = emoji.EMOJI_DATA
    # Korean names are loaded on demand by the emoji package (since 2.x).
    if not any("ko" in entry for entry in data.values()):
        emoji.config.load_language("ko")
        data = emoji.EMOJI_DATA
    return data


def is_base_emoji(sequence: str, entry: dict[str, Any]) -> bool:
    """Fully qualified, no skin tone, no ZWJ: one picture per concept."""
    import emoji

    return (entry.get("status") == emoji.STATUS["fully_qualified"] and _ZWJ not in sequence
            and not any(ord(ch) in _SKIN_TONES for ch in sequence))


def is_flag(sequence: str) -> bool:
    """Country flags (regional-indicator pairs) and subdivision flags (black flag + tags)."""
    return ord(sequence[0]) in _REGIONAL or any(ord(ch) in _TAGS for ch in sequence)


def clean_name(raw: str) -> str:
    """``:grinning_face:`` → ``grinning face`` (NFC)."""
    return unicodedata.normalize("NFC", raw.strip(":").replace("_", " ").strip())


def base_emoji() -> list[tuple[str, str, str | None]]:
    """``(emoji, English short name, Korean name or None)`` for every base emoji."""
    table = []
    for sequence, entry in _emoji_data().items():
        if not is_base_emoji(sequence, entry) or not entry.get("en"):
            continue
        korean = entry.get("ko")
        # A few Korean entries are untranslated ASCII (":atm:"): not Korean captions.
        if korean is not None and clean_name(korean).isascii():
            korean = None
        table.append((sequence, entry["en"], korean))
    return table


def render(font: Any, sequence: str, size: int) -> bytes | None:
    """PNG bytes of one glyph on white, ``size`` x ``size``; None when the font lacks it."""
    from PIL import Image, ImageDraw

    box = font.getbbox(sequence, mode="RGBA")
    canvas = Image.new("RGBA", (int(max(1, box[2])) + 8, int(max(1, box[3])) + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), sequence, font=font, embedded_color=True)
    ink = canvas.getbbox()
    if ink is None:
        return None
    glyph = canvas.crop(ink)
    side = int(max(glyph.size) * 1.1)  # a small white margin around the glyph
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    picture = square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def load_font(path: Path) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(str(path), CBDT_SIZE)
    except OSError as err:
        raise ValueError(f"{path}: cannot load as a colour emoji font at size {CBDT_SIZE} "
                         f"({err}); expected NotoColorEmoji.ttf") from err


def build(font_path: Path, skips: SkipCounter, size: int = 128) -> Iterator[Record]:
    """One record per base emoji that the font can draw."""
    font = load_font(font_path)
    for sequence, english, korean in base_emoji():
        codepoints = "-".join(f"{ord(ch):04x}" for ch in sequence)
        picture = render(font, sequence, size)
        if picture is None:
            skips.add("glyph missing from font", f"U+{codepoints} {english}: not in {font_path}")
            continue
        name = english.strip(":")
        text = clean_name(english)
        captions = [Caption(f"flag of {text}" if is_flag(sequence) else text, "en")]
        if korean:
            captions.append(Caption(clean_name(korean), "ko"))
        yield Record(key=f"emoji-{codepoints}", image=picture, image_ext="png", captions=captions,
                     split=split_for(name), source="noto-emoji", license=LICENSE,
                     meta={"emoji": sequence, "name": name, "codepoints": codepoints})


def count(_: Path) -> int:
    return len(base_emoji())


RECIPE = register(Recipe(
    name="emoji",
    summary="Noto Color Emoji glyphs (Debian fonts-noto-color-emoji) with names from PyPI emoji",
    license=LICENSE,
    install="Install with: sudo apt-get install -y fonts-noto-color-emoji && pip install emoji "
            "(or pass --src pointing at NotoColorEmoji.ttf).",
    build=build,
    default_src=DEFAULT_FONT,
    debian_package="fonts-noto-color-emoji",
    count=count,
    notes="Base emoji only (no skin tones, no ZWJ sequences). Captions are CLDR short names; "
          "flags read 'flag of <country>' in English.",
    split_rule="test iff int(sha1(English short name, e.g. 'grinning_face').hexdigest(), 16) "
               "% 5 == 0",
))
