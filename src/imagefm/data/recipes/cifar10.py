"""CIFAR-10 from a local copy, captioned in English and Korean.

Accepted layouts of ``--src``:

* WebDataset shards: ``*.tar`` with ``NNNNNN.jpg`` + ``NNNNNN.cls`` (class index) and
  ``classes.json`` (names in index order); a shard whose name starts with ``test`` gives the
  ``test`` split, ``val`` the ``val`` split, anything else ``train``.
* Image folders: ``<split>/<class>/*.png`` (split folders ``train``/``test``/``val``) or
  ``<class>/*.png`` (all ``train``).

Labels follow the canonical CIFAR-10 order when the class names are the usual ten.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from imagefm.data.files import read_image_folder
from imagefm.data.formats import SkipCounter, read_classes, read_shards, safe_key
from imagefm.data.recipes.base import Recipe, image_is_usable, register
from imagefm.data.records import Caption, Record

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
KOREAN = {"airplane": "비행기", "automobile": "자동차", "bird": "새", "cat": "고양이",
          "deer": "사슴", "dog": "개", "frog": "개구리",
          "horse": "말", "ship": "배", "truck": "트럭"}
SPLIT_NAMES = ("train", "test", "val")
LICENSE = ("CIFAR-10 (Krizhevsky, 2009; subset of the 80 Million Tiny Images): no licence stated "
           "by its authors; research use, see https://www.cs.toronto.edu/~kriz/cifar.html")


def class_captions(name: str) -> list[Caption]:
    """``a photo of an airplane.`` / ``비행기 사진.`` (Korean when the class is a CIFAR one)."""
    text = name.replace("_", " ")
    article = "an" if text[:1].lower() in "aeiou" else "a"
    captions = [Caption(f"a photo of {article} {text}.", "en")]
    if name in KOREAN:
        captions.append(Caption(f"{KOREAN[name]} 사진.", "ko"))
    return captions


def _split_of_shard(path: Path) -> str:
    for split in ("test", "val"):
        if path.name.startswith(split):
            return split
    return "train"


def _from_shards(root: Path, skips: SkipCounter) -> Iterator[Record]:
    shards = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    for shard in shards:
        classes = read_classes(shard) or list(CLASSES)
        split = _split_of_shard(shard)
        for record in read_shards(shard, skips):
            if record.label is None:
                skips.add("no label", f"{shard}:{record.key}: no .cls member")
                continue
            if record.label_name is None:
                record.label_name = classes[record.label] if record.label < len(classes) else None
            yield Record(key=safe_key(f"cifar10-{shard.stem}-{record.key}"),
                         image=record.image, image_ext=record.image_ext, label=record.label,
                         label_name=record.label_name, split=split,
                         meta={"shard": shard.name, "index": record.key})


def _from_folders(root: Path, skips: SkipCounter) -> Iterator[Record]:
    split_dirs = [root / s for s in SPLIT_NAMES if (root / s).is_dir()]
    for folder in split_dirs or [root]:
        split = folder.name if split_dirs else "train"
        for record in read_image_folder(folder, skips, split=split):
            if record.label_name is None:
                skips.add("no label", f"{folder / record.meta['path']}: not in a class folder")
                continue
            if record.label_name in CLASSES:  # same index in every split, as in the dataset
                record.label = CLASSES.index(record.label_name)
            record.key = safe_key(f"cifar10-{split}-{record.key}")
            yield record


def build(root: Path, skips: SkipCounter) -> Iterator[Record]:
    """Records with label, label name and en/ko captions, from shards or folders."""
    has_shards = root.is_file() or any(root.glob("*.tar"))
    source = _from_shards(root, skips) if has_shards else _from_folders(root, skips)
    for record in source:
        name = record.meta.get("path", record.key)
        if record.image is None:
            skips.add("no image", f"{root}:{record.key}: no image member")
            continue
        if not image_is_usable(record.image, f"{root}:{name}", skips):
            continue
        record.captions = class_captions(record.label_name or str(record.label))
        record.source, record.license = "cifar10", "CIFAR-10 (see manifest)"
        yield record


RECIPE = register(Recipe(
    name="cifar10",
    summary="CIFAR-10 (a local copy: WebDataset .jpg+.cls shards with classes.json, or folders)",
    license=LICENSE,
    install="Pass --src with a local copy: a folder of WebDataset shards (NNNNNN.jpg + "
            "NNNNNN.cls, classes.json) or image folders <split>/<class>/*.png.",
    build=build,
    notes="Captions: 'a photo of a <class>.' (en) and '<Korean class> 사진.' (ko).",
    split_rule="from the source: shard name prefix (test/val) or split folder",
))
