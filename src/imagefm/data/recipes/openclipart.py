"""Open Clip Art (Debian ``openclipart-png``): ~8,000 public-domain drawings.

The Debian package ships only the PNGs, under ``/usr/share/openclipart/png/<category>/...``: no
titles, keywords or author files (its copyright file mentions per-image ``.txt`` files, but they
are not in the package). So the caption is derived from the file name, and the folder path
serves as keywords. File names follow Open Clip Art's export convention
``<title>_<author>_<NN>.png``, cut to 24 characters before ``_NN`` (``cigno_architetto_frances_01``:
title ``cigno``, author Architetto Francesco Rollandin). Author names are removed heuristically:
two-word tails that end file names of at least three different titles are taken for authors
(and their truncations, when the name was cut). What remains may still hold an author's name.

Exact duplicate pictures (same bytes) are kept once. Split: ``reserved_test_split(file stem)``.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from imagefm.data.formats import SkipCounter, safe_key
from imagefm.data.recipes.base import Recipe, image_is_usable, iter_files, register, split_for
from imagefm.data.records import Caption, Record

DEFAULT_SRC = "/usr/share/openclipart/png"
LICENSE = "public domain (Creative Commons Public Domain Dedication; see " \
          "/usr/share/doc/openclipart-png/copyright)"
_NUMBERED = re.compile(r"^(.+?)_(\d\d)?$")  # title_author_NN or title_author_
_TRUNCATED_LENGTH = 23  # names cut at 24 characters; allow one for a dropped trailing "_"
_MIN_TITLES_PER_AUTHOR = 3


def _words(text: str) -> list[str]:
    return [w for w in text.split("_") if w]


def find_authors(stems: list[str]) -> set[tuple[str, str]]:
    """Two-word tails of ``title_author_NN`` stems that follow several different titles."""
    titles: dict[tuple[str, str], set[tuple[str, ...]]] = defaultdict(set)
    for stem in stems:
        match = _NUMBERED.match(stem)
        if match:
            words = _words(match.group(1))
            if len(words) > 2:
                titles[(words[-2], words[-1])].add(tuple(words[:-2]))
    return {tail for tail, heads in titles.items() if len(heads) >= _MIN_TITLES_PER_AUTHOR}


def title_from_stem(stem: str, authors: set[tuple[str, str]]) -> str:
    """Readable words from a file stem, with a known (or cut-off known) author name removed."""
    match = _NUMBERED.match(stem)
    words = _words(match.group(1) if match else stem)
    if match and len(words) > 2:
        tail = (words[-2], words[-1])
        cut = len(match.group(1)) >= _TRUNCATED_LENGTH and any(
            first == tail[0] and last.startswith(tail[1]) for first, last in authors)
        if tail in authors or cut:
            words = words[:-2]
    text = " ".join(words).replace("-", " ")
    return " ".join(text.split())


def build(root: Path, skips: SkipCounter) -> Iterator[Record]:
    """One record per distinct PNG, captioned from its file name."""
    files = list(iter_files(root, (".png",)))
    authors = find_authors([p.stem for p in files])
    seen: dict[str, Path] = {}
    for path in files:
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            skips.add("duplicate image", f"{path}: same bytes as {seen[digest]}")
            continue
        seen[digest] = path
        title = title_from_stem(path.stem, authors)
        if not title:
            skips.add("empty caption", f"{path}: no words in the file name")
            continue
        if not image_is_usable(data, str(path), skips):
            continue
        relative = path.relative_to(root)
        keywords = [part.replace("_", " ") for part in relative.parent.parts]
        key = safe_key("openclipart-" + relative.with_suffix("").as_posix().replace("/", "-"),
                       unique=True)
        yield Record(key=key,
                     image=data, image_ext="png", captions=[Caption(f"clip art of {title}", "en")],
                     split=split_for(path.stem), source="openclipart", license="public domain",
                     meta={"name": path.stem, "path": relative.as_posix(), "title": title,
                           "keywords": keywords})


def count(root: Path) -> int:
    return sum(1 for _ in iter_files(root, (".png",)))


RECIPE = register(Recipe(
    name="openclipart",
    summary="Open Clip Art PNGs (Debian openclipart-png)",
    license=LICENSE,
    install="Install them with: sudo apt-get install -y openclipart-png "
            "(or pass --src DIR pointing at a folder of PNGs).",
    build=build,
    default_src=DEFAULT_SRC,
    debian_package="openclipart-png",
    count=count,
    notes="The package has no titles or keywords: captions ('clip art of <title>') are derived "
          "from file names with author names removed heuristically; meta.keywords are the "
          "folder names. Exact duplicate images are kept once.",
    split_rule="test iff int(sha1(file stem).hexdigest(), 16) % 5 == 0",
))
