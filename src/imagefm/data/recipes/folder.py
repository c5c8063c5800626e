"""Any local data (recipe ``folder``): an image folder, a caption file, or LLaVA conversations.

``--src`` may be:

* a folder with one sub-folder per class (captions ``a photo of a <class>.``); split folders
  ``train``/``val``/``test`` at the top are honoured, otherwise everything is ``train``;
* a ``.csv`` / ``.jsonl`` file of ``image,caption[,lang]`` rows (paths relative to the file);
* a LLaVA-style ``.json`` conversation file (images relative to the file).

The licence is whatever the data's owner says: the manifest records it as unknown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from imagefm.data.files import read_caption_file, read_image_folder, read_llava_json
from imagefm.data.formats import RecordError, SkipCounter
from imagefm.data.recipes.base import Recipe, image_is_usable, register
from imagefm.data.recipes.cifar10 import class_captions
from imagefm.data.records import Record

SPLIT_NAMES = ("train", "val", "test")


def _from_folder(root: Path, skips: SkipCounter) -> Iterator[Record]:
    split_dirs = [root / s for s in SPLIT_NAMES if (root / s).is_dir()]
    for folder in split_dirs or [root]:
        split = folder.name if split_dirs else "train"
        for record in read_image_folder(folder, skips, split=split):
            if split_dirs:
                record.key = f"{split}-{record.key}"
            if record.label_name is not None:
                record.captions = class_captions(record.label_name)
            yield record


def _records(src: Path, skips: SkipCounter) -> Iterator[Record]:
    if src.is_dir():
        return _from_folder(src, skips)
    suffix = src.suffix.lower()
    if suffix in (".csv", ".jsonl", ".ndjson"):
        return read_caption_file(src, skips)
    if suffix == ".json":
        return read_llava_json(src, skips=skips)
    raise ValueError(f"{src}: expected a folder, a .csv/.jsonl caption file or a LLaVA .json")


def build(src: Path, skips: SkipCounter) -> Iterator[Record]:
    try:
        for record in _records(src, skips):
            name = f"{src}:{record.meta.get('path', record.key)}"
            if record.image is not None and not image_is_usable(record.image, name, skips):
                continue
            record.source = record.source or "folder"
            record.license = record.license or "unknown"
            yield record
    except RecordError as err:  # the whole file is unreadable (e.g. not UTF-8)
        raise ValueError(str(err)) from err


RECIPE = register(Recipe(
    name="folder",
    summary="a local image folder (class per sub-folder), CSV/JSONL captions or LLaVA JSON",
    license="unknown: as the data's owner says",
    install="Pass --src with a folder of class sub-folders, a .csv/.jsonl of image,caption[,lang] "
            "or a LLaVA .json.",
    build=build,
    notes="Class folders get captions 'a photo of a <class>.' (plus Korean for CIFAR-10 names).",
    split_rule="split folders train/val/test when present, else train",
))
