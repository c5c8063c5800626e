"""Look at a dataset before training on it: a contact sheet of images with captions, and counts.

``contact_sheet`` draws a grid of thumbnails with their captions wrapped below (Korean included:
a Hangul font is found at run time). ``stats`` counts records per source, split, language and
label, and bins caption lengths; ``format_stats`` prints that as a plain-text table.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imagefm.data.formats import SkipCounter, read_shards
from imagefm.data.records import Record

# Fonts with Hangul, most likely first (Debian fonts-nanum / fonts-noto-cjk, macOS, Windows).
HANGUL_FONTS = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/AppleSDGothicNeo.ttc",
    "C:/Windows/Fonts/malgun.ttf",
)
FONT_ENV = "IMAGEFM_FONT"
LENGTH_BINS = (0, 10, 20, 40, 80, 160, 320)  # caption length in characters


class FontNotFoundError(FileNotFoundError):
    """No font that can draw Hangul was found; the message says what to install."""


def find_hangul_font() -> Path:
    """A font file that draws Hangul: ``$IMAGEFM_FONT``, known paths, then ``fc-match :lang=ko``."""
    override = os.environ.get(FONT_ENV)
    if override:
        if Path(override).is_file():
            return Path(override)
        raise FontNotFoundError(f"${FONT_ENV} = {override} is not a file")
    for candidate in HANGUL_FONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", ":lang=ko"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout.strip()
            # fc-match always answers; only trust it if the font claims Korean coverage.
            langs = subprocess.run(["fc-query", "-f", "%{lang}", found], capture_output=True,
                                   text=True, timeout=10, check=False).stdout
            if found and Path(found).is_file() and "ko" in langs.split("|"):
                return Path(found)
        except (OSError, subprocess.SubprocessError):
            pass
    raise FontNotFoundError(
        "no font with Hangul found for captions; install one: sudo apt-get install -y "
        f"fonts-nanum (or fonts-noto-cjk), or set ${FONT_ENV} to a .ttf/.ttc file")


def _records(source: str | Path | Iterable[Record], skips: SkipCounter) -> Iterator[Record]:
    if isinstance(source, (str, Path)):
        yield from read_shards(source, skips)
    else:
        yield from source


def sample_records(source: str | Path | Iterable[Record], n: int, seed: int = 0,
                   skips: SkipCounter | None = None) -> list[Record]:
    """``n`` records chosen uniformly (reservoir sampling, seeded), in their original order."""
    rng = random.Random(seed)
    chosen: list[tuple[int, Record]] = []
    for index, record in enumerate(_records(source, skips or SkipCounter())):
        if len(chosen) < n:
            chosen.append((index, record))
        else:
            slot = rng.randrange(index + 1)
            if slot < n:
                chosen[slot] = (index, record)
    return [record for _, record in sorted(chosen, key=lambda pair: pair[0])]


def wrap_text(text: str, font: Any, width: int) -> list[str]:
    """Lines of at most ``width`` pixels; words longer than a line are cut by character."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:  # a word wider than the tile (or CJK without spaces)
            if font.getlength(line + char) > width and line:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def _caption_lines(record: Record) -> list[tuple[str, str]]:
    """(tag, text) pairs to show: English and Korean first, then other languages."""
    order = {"en": 0, "ko": 1}
    captions = sorted(record.captions, key=lambda c: order.get(c.lang, 2))
    pairs = [(c.lang, c.text) for c in captions]
    if not pairs and record.label_name:
        pairs = [("label", record.label_name)]
    if not pairs and record.conversation:
        pairs = [(t.role, t.content) for t in record.conversation[:2]]
    return pairs


def _thumbnail(record: Record, size: int) -> Any:
    from PIL import Image, ImageDraw, ImageOps

    from imagefm.data.image import ImageDecodeError, open_image

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        if record.image is None:
            raise ImageDecodeError(record.key, "no image")
        image = ImageOps.contain(open_image(record.image, name=record.key), (size, size))
        tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    except ImageDecodeError:
        draw = ImageDraw.Draw(tile)
        draw.line((0, 0, size, size), fill=(200, 0, 0), width=3)
        draw.line((0, size, size, 0), fill=(200, 0, 0), width=3)
    return tile


def contact_sheet(source: str | Path | Iterable[Record], out_png: str | Path, n: int = 24,
                  seed: int = 0, thumb: int = 160, columns: int | None = None,
                  caption_lines: int = 6) -> Path:
    """Save a grid of ``n`` sampled thumbnails, each with its key and captions below.

    ``source`` is a dataset directory (shards), a shard, or records. Unreadable images show as
    a red cross. Raises ``FontNotFoundError`` when no Hangul font is installed.
    """
    from PIL import Image, ImageDraw, ImageFont

    records = sample_records(source, n, seed)
    if not records:
        raise ValueError(f"no records found in {source}")
    font_path = find_hangul_font()
    font = ImageFont.truetype(str(font_path), 13)
    small = ImageFont.truetype(str(font_path), 11)
    columns = columns or max(1, min(len(records), math.ceil(math.sqrt(len(records) * 1.5))))
    rows = math.ceil(len(records) / columns)
    pad, line_height = 10, 16
    cell_w = thumb + pad
    cell_h = thumb + pad + line_height * (caption_lines + 1)
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for index, record in enumerate(records):
        x = pad + (index % columns) * cell_w
        y = pad + (index // columns) * cell_h
        sheet.paste(_thumbnail(record, thumb), (x, y))
        text_y = y + thumb + 2
        tag = f"[{record.split}] {record.key}"
        draw.text((x, text_y), wrap_text(tag, small, thumb)[0], font=small, fill=(120, 120, 120))
        lines: list[str] = []
        for lang, text in _caption_lines(record):
            lines.extend(wrap_text(f"{lang}: {text}", font, thumb))
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][:-1] + "…"
        for number, line in enumerate(lines, 1):
            draw.text((x, text_y + number * line_height), line, font=font, fill="black")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


def _length_bin(length: int) -> str:
    for low, high in zip(LENGTH_BINS, LENGTH_BINS[1:], strict=False):
        if low <= length < high:
            return f"{low}-{high - 1}"
    return f"{LENGTH_BINS[-1]}+"


def stats(source: str | Path | Iterable[Record]) -> dict[str, Any]:
    """Counts over a dataset (no image decoding).

    Keys: ``records``, ``captions``, ``without_caption``, ``without_image``, ``by_source``,
    ``by_split``, ``by_language`` (captions per language), ``records_by_language`` (records with
    at least one caption in it), ``by_label``, ``caption_length`` (``bins`` → count, ``min``,
    ``max``, ``mean`` in characters), ``skipped`` (unreadable samples by reason).
    """
    skips = SkipCounter()
    counters: dict[str, Counter[str]] = {name: Counter() for name in (
        "by_source", "by_split", "by_language", "records_by_language", "by_label")}
    lengths: list[int] = []
    records = without_caption = without_image = 0
    for record in _records(source, skips):
        records += 1
        counters["by_source"][record.source or "?"] += 1
        counters["by_split"][record.split] += 1
        counters["by_language"].update(c.lang for c in record.captions)
        counters["records_by_language"].update({c.lang for c in record.captions})
        if record.label is not None or record.label_name:
            counters["by_label"][record.label_name or str(record.label)] += 1
        lengths.extend(len(c.text) for c in record.captions)
        without_caption += not record.captions
        without_image += record.image is None
    bins = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:], strict=False)]
    histogram = dict.fromkeys(bins + [f"{LENGTH_BINS[-1]}+"], 0)
    for length in lengths:
        histogram[_length_bin(length)] += 1
    result: dict[str, Any] = {"records": records, "captions": len(lengths),
                              "without_caption": without_caption, "without_image": without_image}
    result.update({name: dict(counter.most_common()) for name, counter in counters.items()})
    result["caption_length"] = {
        "bins": histogram, "min": min(lengths, default=0), "max": max(lengths, default=0),
        "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0.0}
    result["skipped"] = dict(skips.skipped)
    return result


def format_stats(data: dict[str, Any], max_rows: int = 20, bar_width: int = 40) -> str:
    """A plain-text table of ``stats`` output, with a bar chart of caption lengths."""
    lines = [f"records {data['records']:,}   captions {data['captions']:,}   "
             f"without caption {data['without_caption']:,}   "
             f"without image {data['without_image']:,}"]
    if data.get("skipped"):
        lines.append("unreadable: " + ", ".join(f"{n} {r}" for r, n in data["skipped"].items()))
    titles = {"by_source": "source", "by_split": "split", "by_language": "language (captions)",
              "records_by_language": "language (records)", "by_label": "label"}
    for key, title in titles.items():
        counts = data.get(key) or {}
        if not counts:
            continue
        lines.append("")
        lines.append(f"{title:<24} {'count':>9}")
        for name, value in list(counts.items())[:max_rows]:
            lines.append(f"  {str(name):<22} {value:>9,}")
        if len(counts) > max_rows:
            lines.append(f"  ... {len(counts) - max_rows} more")
    length = data["caption_length"]
    if data["captions"]:
        lines.append("")
        lines.append(f"caption length (characters): min {length['min']}, mean {length['mean']}, "
                     f"max {length['max']}")
        peak = max(length["bins"].values()) or 1
        for name, value in length["bins"].items():
            bar = "#" * math.ceil(bar_width * value / peak) if value else ""
            lines.append(f"  {name:>8} {value:>9,} {bar}")
    return "\n".join(lines)
