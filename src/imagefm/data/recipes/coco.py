"""COCO captions from a local copy in the original layout.

``--src`` holds ``annotations/captions_<set>.json`` and one image folder per set (``train2017/``,
``val2017/``). Each caption file gives a split: ``train`` for sets named train*, ``val`` for
val*, else ``test``. Every image keeps its own licence (COCO images are Flickr photos under
various Creative Commons licences, many NonCommercial); the captions are CC BY 4.0.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagefm.data.formats import SkipCounter
from imagefm.data.recipes.base import Recipe, image_is_usable, register
from imagefm.data.records import Caption, Record

LICENSE = ("per image (record.license): COCO images are Flickr photos under the Creative Commons "
           "licences listed in the annotation file, many NonCommercial; annotations CC BY 4.0 "
           "(https://cocodataset.org/#termsofuse)")


def caption_files(root: Path) -> list[Path]:
    """``captions_*.json`` under ``root/annotations`` (or ``root`` itself, or a file)."""
    if root.is_file():
        return [root]
    for folder in (root / "annotations", root):
        found = sorted(folder.glob("captions_*.json"))
        if found:
            return found
    return []


def _split_of(set_name: str) -> str:
    if set_name.startswith("train"):
        return "train"
    return "val" if set_name.startswith("val") else "test"


def _image_dir(annotation: Path, set_name: str) -> Path:
    base = annotation.parent.parent if annotation.parent.name == "annotations" \
        else annotation.parent
    return base / set_name


def read_coco_captions(annotation: Path, skips: SkipCounter,
                       image_dir: Path | None = None) -> Iterator[Record]:
    """Records (one per image, all its captions) from one COCO caption file."""
    set_name = annotation.stem.removeprefix("captions_")
    split = _split_of(set_name)
    image_dir = image_dir or _image_dir(annotation, set_name)
    data = json.loads(annotation.read_text(encoding="utf-8"))
    licenses: dict[Any, dict[str, Any]] = {entry["id"]: entry for entry in data.get("licenses", [])}
    captions: dict[Any, list[str]] = defaultdict(list)
    for entry in data.get("annotations", []):
        captions[entry["image_id"]].append(str(entry.get("caption", "")))
    for image in sorted(data.get("images", []), key=lambda entry: entry["id"]):
        path = image_dir / image["file_name"]
        texts = [" ".join(t.split()) for t in captions.get(image["id"], [])]
        texts = [t for t in texts if t]
        if not texts:
            skips.add("empty caption", f"{path}: no caption in {annotation.name}")
            continue
        try:
            content = path.read_bytes()
        except OSError as err:
            skips.add("missing image", f"{path}: {err.strerror or err}")
            continue
        if not image_is_usable(content, str(path), skips):
            continue
        licence = licenses.get(image.get("license"), {})
        yield Record(key=f"coco-{set_name}-{int(image['id']):012d}", image=content,
                     image_ext=path.suffix.lower().lstrip(".") or "jpg",
                     captions=[Caption(t, "en") for t in texts], split=split, source="coco",
                     license=licence.get("name", "unknown"),
                     meta={"coco_id": image["id"], "file_name": image["file_name"],
                           "license_url": licence.get("url", ""),
                           "width": image.get("width"), "height": image.get("height")})


def build(root: Path, skips: SkipCounter) -> Iterator[Record]:
    files = caption_files(root)
    if not files:
        raise FileNotFoundError(f"no annotations/captions_*.json under {root}")
    for annotation in files:
        yield from read_coco_captions(annotation, skips)


def count(root: Path) -> int:
    total = 0
    for annotation in caption_files(root):
        total += len(json.loads(annotation.read_text(encoding="utf-8")).get("images", []))
    return total


RECIPE = register(Recipe(
    name="coco",
    summary="COCO captions (a local copy: annotations/captions_*.json + image folders)",
    license=LICENSE,
    install="Pass --src with a COCO-layout folder: annotations/captions_train2017.json and "
            "train2017/*.jpg (download from https://cocodataset.org/#download).",
    build=build,
    count=count,
    notes="English captions, all of each image's captions in one record.",
    split_rule="from the caption file name: train* → train, val* → val, else test",
))
