"""Medical images from DICOM / NIfTI (recipes ``medical`` and ``medical-classes``).

``medical`` — image–report pairs for contrastive training. ``--src`` is a folder of studies::

    studies/[train|val|test/]<study>/
        *.dcm (one or more series; the largest is read) or <name>.nii[.gz]
        findings.txt           # the findings in English (or report.txt, findings.en.txt)
        findings.ko.txt        # optional: the same in Korean (any findings.<lang>.txt is read)

``medical-classes`` — labelled pictures for ``imagefm adapt``. ``--src`` holds one folder per
class (split folders ``train``/``val``/``test`` honoured); an item is a DICOM file, a NIfTI file
or a folder holding one DICOM series.

Each study or item becomes one record per view (``views``: ``axial``, ``coronal:0.4``,
``axial:mip``...; default the middle axial slice) rendered by :mod:`imagefm.data.medical` in
``window`` (default ``auto``: the file's own VOI LUT or window, a soft-tissue window for CT).
Without split folders, a study's split follows the project's reserved rule on its folder name.

Privacy: records carry no DICOM header field but modality/size/spacing, and keys are
``<split>-<number>-<view>``, never folder names (which are often accession numbers). The report
text is copied as it is: scrub names from free text before running this. To hand DICOM files
themselves on, use ``imagefm medical deid`` (:mod:`imagefm.data.medical_deid`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagefm.data.formats import SkipCounter, safe_key
from imagefm.data.recipes.base import Recipe, register, split_for
from imagefm.data.records import Caption, Record

SPLIT_NAMES = ("train", "val", "test")
REPORT_NAMES = ("findings", "report")
LICENSE = "as the data's owner says (medical data: check the consent and the data agreement)"


def _split_folders(root: Path) -> list[tuple[str | None, Path]]:
    found = [(s, root / s) for s in SPLIT_NAMES if (root / s).is_dir()]
    return found or [(None, root)]


def read_reports(folder: Path) -> list[Caption]:
    """``findings.txt`` / ``report.txt`` (English) and ``findings.<lang>.txt`` in ``folder``."""
    captions: list[Caption] = []
    for path in sorted(folder.iterdir()):
        parts = path.name.lower().split(".")
        if not path.is_file() or parts[-1] != "txt" or parts[0] not in REPORT_NAMES:
            continue
        lang = parts[1] if len(parts) == 3 else "en"
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        if text:
            captions.append(Caption(text, lang))
    return captions


def _image_source(folder: Path) -> Path:
    """The study's NIfTI file if it has one, else the folder itself (its DICOM series)."""
    from imagefm.data.medical import is_nifti

    niftis = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    return niftis[0] if niftis else folder


def _views(views: list[str] | str | None, window: str) -> list[tuple[str, Any]]:
    # Imported here (numpy, Pillow): importing the recipes stays light (see __init__).
    from imagefm.data.medical import View

    names = [views] if isinstance(views, str) else list(views or ["axial"])
    return [(safe_key(name.replace(":", "-").replace(".", "p")), View.parse(name, window))
            for name in names]


def _pictures(source: Path, views: list[tuple[str, Any]], skips: SkipCounter,
              where: str) -> Iterator[tuple[str, bytes, dict]]:
    """(view name, PNG bytes, technical meta) per view; problems counted, never raised."""
    from imagefm.data.medical import MedicalReadError, encode_png, read_volume, render

    inner = SkipCounter()  # slices skipped inside a series that is read all the same
    try:
        volume = read_volume(source, inner)
    except MedicalReadError as err:  # the whole item is lost: count it once, by its first cause
        reason = next(iter(inner.skipped), err.reason)
        first = next(iter(inner.examples.get(reason, [])), str(err))
        skips.add(reason, f"{where}: {first}")
        return
    for reason, n in inner.skipped.items():
        for message in (inner.examples.get(reason, []) + [""] * n)[:n]:
            skips.add(reason, f"{where}: {message}" if message else "")
    meta = {"modality": volume.modality, "shape": list(volume.shape),
            "spacing_mm": [round(float(s), 3) for s in volume.spacing]}
    for name, view in views:
        try:
            yield name, encode_png(render(volume, view)), {**meta, "view": name}
        except (MedicalReadError, ValueError) as err:
            skips.add(getattr(err, "reason", "bad view"), f"{where}: {err}")


def build_pairs(src: Path, skips: SkipCounter, *, views: list[str] | str | None = None,
                window: str = "auto") -> Iterator[Record]:
    """Records of a folder of studies (see the module docstring)."""
    chosen = _views(views, window)
    number = 0
    for split, root in _split_folders(src):
        for folder in sorted(p for p in root.iterdir() if p.is_dir()
                             and not p.name.startswith(".")):
            number += 1
            where = f"study {number} ({split or 'no split'})"
            captions = read_reports(folder)
            if not captions:
                skips.add("no findings text", f"{where}: no findings.txt / report.txt")
                continue
            record_split = split or split_for(folder.name)
            for name, png, meta in _pictures(_image_source(folder), chosen, skips, where):
                yield Record(key=f"{record_split}-{number:06d}-{name}", image=png,
                             captions=list(captions), split=record_split, source="medical",
                             license=LICENSE, meta=meta)


def _items(folder: Path) -> Iterator[Path]:
    from imagefm.data.medical import DICOM_SUFFIXES, is_nifti

    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or is_nifti(path) or path.suffix.lower() in DICOM_SUFFIXES:
            yield path


def build_classes(src: Path, skips: SkipCounter, *, views: list[str] | str | None = None,
                  window: str = "auto") -> Iterator[Record]:
    """Labelled records of class folders of DICOM / NIfTI items (see the module docstring)."""
    chosen = _views(views, window)
    splits = _split_folders(src)
    classes = sorted({p.name for _, root in splits for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith(".")})
    number = 0
    for split, root in splits:
        for label, name in enumerate(classes):
            if not (root / name).is_dir():
                continue
            for item in _items(root / name):
                number += 1
                where = f"item {number} of class {name!r}"
                record_split = split or "train"
                for view, png, meta in _pictures(item, chosen, skips, where):
                    yield Record(key=f"{record_split}-{number:06d}-{view}", image=png,
                                 captions=[Caption(name.replace("_", " "), "en")], label=label,
                                 label_name=name, split=record_split, source="medical-classes",
                                 license=LICENSE, meta=meta)


PAIRS = register(Recipe(
    name="medical",
    summary="DICOM series / NIfTI studies with findings text (image–report pairs)",
    license=LICENSE,
    install="Pass --src with one folder per study: DICOM files or a .nii[.gz] + findings.txt "
            "(+ findings.ko.txt); `imagefm medical synth` writes a synthetic example.",
    build=build_pairs,
    notes="Rendered with imagefm.data.medical (window, views); no DICOM header field is kept.",
    split_rule="split folders train/val/test when present, else the reserved sha1 rule on the "
               "study folder's name",
))
CLASSES = register(Recipe(
    name="medical-classes",
    summary="class folders of DICOM / NIfTI items (for imagefm adapt)",
    license=LICENSE,
    install="Pass --src with one folder per class of .dcm / .nii[.gz] files or series folders.",
    build=build_classes,
    notes="Label order: class folder names sorted.",
    split_rule="split folders train/val/test when present, else train",
))
