"""Datasets as plain local files: image folders (one sub-folder per class), CSV / JSONL caption
files (``image,caption[,lang]``, image paths relative to the file) and LLaVA-style conversation
JSON (``[{"id", "image", "conversations": [{"from", "value"}]}]``), read into ``Record``s (images
still encoded) and written back. Shards are ``imagefm.data.formats``' business.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imagefm.data.formats import (
    IMAGE_SUFFIXES,
    RecordError,
    SkipCounter,
    safe_key,
    utf8_text,
)
from imagefm.data.records import Caption, Record, Turn


def _read_bytes(path: Path, skips: SkipCounter | None) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as err:
        if skips is None:
            raise
        skips.add("missing image", f"{path}: {err.strerror or err}")
        return None


def _relative_key(path: Path, root: Path) -> str:
    return safe_key(path.relative_to(root).with_suffix("").as_posix().replace("/", "-"),
                    unique=True)


def read_image_folder(root: str | Path, skips: SkipCounter | None = None,
                      split: str = "train") -> Iterator[Record]:
    """Images under ``root``, one sub-folder per class (labels in sorted folder order).

    Images directly in ``root`` (no class folders) come without a label.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups: list[tuple[int | None, str | None, Path]] = [(None, None, root)]
    groups += [(i, name, root / name) for i, name in enumerate(classes)]
    for label, name, folder in groups:
        files = folder.glob("*") if label is None else folder.rglob("*")
        for path in sorted(files):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = _read_bytes(path, skips)
            if data is None:
                continue
            yield Record(key=_relative_key(path, root), image=data,
                         image_ext=path.suffix.lower().lstrip("."), label=label, label_name=name,
                         split=split, meta={"path": str(path.relative_to(root))})


def _caption_rows(path: Path) -> Iterator[dict[str, str]]:
    raw = path.read_bytes()
    text = utf8_text(raw, str(path)).lstrip("\ufeff")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise RecordError("bad json", f"{path}:{number}: {err}") from err
                yield {k: ("" if v is None else str(v)) for k, v in row.items()}
    else:
        for row in csv.DictReader(io.StringIO(text)):
            yield {k.strip(): (v or "") for k, v in row.items() if k is not None}


def read_caption_file(path: str | Path, skips: SkipCounter | None = None,
                      default_lang: str = "en", split: str = "train") -> Iterator[Record]:
    """Records from a CSV or JSONL file of ``image,caption[,lang]`` rows.

    Image paths are relative to the file. Several rows for one image become one record with
    several captions (first-seen order). Rows with an empty caption add nothing; images left
    without captions still come out (the loader decides whether that matters).
    """
    path = Path(path)
    base = path.parent
    order: list[str] = []
    captions: dict[str, list[Caption]] = {}
    for number, row in enumerate(_caption_rows(path), 1):
        image = row.get("image", "").strip()
        if not image:
            if skips is None:
                raise RecordError("no image", f"{path}:{number}: row has no 'image' column value")
            skips.add("no image", f"{path}:{number}: row has no image")
            continue
        if image not in captions:
            order.append(image)
            captions[image] = []
        text = row.get("caption", "")
        if text.strip():
            captions[image].append(Caption(text.strip(), row.get("lang", "").strip()
                                           or default_lang))
    for image in order:
        image_path = base / image
        data = _read_bytes(image_path, skips)
        if data is None:
            continue
        key = safe_key(Path(image).with_suffix("").as_posix().replace("/", "-"), unique=True)
        yield Record(key=key, image=data,
                     image_ext=image_path.suffix.lower().lstrip(".") or "png",
                     captions=captions[image], split=split, meta={"path": image})


def _export_image(record: Record, image_dir: Path) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    name = f"{record.key}.{record.image_ext}"
    (image_dir / name).write_bytes(record.image or b"")
    return name


def write_caption_file(records: Iterable[Record], path: str | Path,
                       image_dir: str | Path | None = None) -> Path:
    """Write records as a CSV (or ``.jsonl``) caption file plus their images.

    Images go to ``image_dir`` (default ``images/`` beside the file); one row per caption.
    """
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    rows = []
    for record in records:
        name = _export_image(record, image_dir)
        relative = os.path.relpath(image_dir / name, path.parent)
        for caption in record.captions:
            rows.append({"image": relative, "caption": caption.text, "lang": caption.lang})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=["image", "caption", "lang"])
            writer.writeheader()
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------- LLaVA conversations

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
LLAVA_NAMES = {v: k for k, v in LLAVA_ROLES.items()}


def read_llava_json(path: str | Path, image_root: str | Path | None = None,
                    skips: SkipCounter | None = None, split: str = "train") -> Iterator[Record]:
    """Records from a LLaVA conversation file (human → user, gpt → assistant).

    ``image`` paths are relative to ``image_root`` (default: the file's folder); entries without
    an image give text-only records.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    entries = json.loads(utf8_text(path.read_bytes(), str(path)))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        try:
            turns = [Turn(LLAVA_ROLES[m["from"]], m["value"]) for m in entry["conversations"]]
        except (KeyError, TypeError, ValueError) as err:
            if skips is None:
                raise RecordError("bad conversation", f"{where}: {err!r}") from err
            skips.add("bad conversation", f"{where}: {err!r}")
            continue
        record = Record(key=safe_key(str(entry.get("id", index)), unique=True), conversation=turns,
                        split=split)
        image = entry.get("image")
        if isinstance(image, list):  # some sets list images; a Record holds one
            if len(image) != 1:
                if skips is None:
                    raise RecordError("several images", f"{where}: {len(image)} images")
                skips.add("several images", f"{where}: {len(image)} images")
                continue
            image = image[0]
        if image:
            data = _read_bytes(root / image, skips)
            if data is None:
                continue
            record.image = data
            record.image_ext = Path(image).suffix.lower().lstrip(".") or "png"
            record.meta["path"] = image
        yield record


def write_llava_json(records: Iterable[Record], path: str | Path,
                     image_dir: str | Path | None = None) -> Path:
    """Write conversation records as LLaVA JSON; images go to ``image_dir`` (default images/)."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    entries = []
    for record in records:
        entry: dict[str, Any] = {"id": record.key}
        if record.image is not None:
            entry["image"] = os.path.relpath(image_dir / _export_image(record, image_dir),
                                             path.parent)
        entry["conversations"] = [{"from": LLAVA_NAMES[t.role], "value": t.content}
                                  for t in record.conversation]
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
