"""Inspection data and the anomaly-detection evaluation (zero-shot and k-shot, per category).

    sets = synthetic_inspection(image_size=64, test_per_category=60)
    rows, maps = evaluate_anomaly(model, processor, sets, shots=(1, 4), out_dir="runs/defects")

A category is one kind of object or surface (the synthetic defects have five surfaces), as in
MVTec AD: the few-shot memory holds ``k`` normal images *of that category*, and AUROC is
computed per category and averaged. Data comes from the synthetic generator on the fly
(:mod:`imagefm.data.synthetic.defects`, seeded; normal images for the memory from another seed
than the test images) or from shards with masks (``imagefm synth defects``): records with
label 0 of the ``train`` split are the normal candidates, the ``test`` split (else the rest)
is scored; ``meta["surface"]`` names the category when present.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.adapt.anomaly import AnomalyConfig, AnomalyDetector
from imagefm.adapt.metrics import auroc
from imagefm.adapt.report import save_anomaly_maps
from imagefm.adapt.tune import preprocess


@dataclass
class InspectionSet:
    category: str
    names: dict[str, str]  # the object's name per language
    normal: list[bytes]  # normal images, candidates for the few-shot memory
    images: list[bytes]  # test images
    labels: list[int]  # 1 = defective
    masks: list[bytes | None] = field(default_factory=list)  # PNG masks (None: no mask)


def synthetic_inspection(image_size: int = 64, test_per_category: int = 60,
                         normal_per_category: int = 8, seed: int = 0,
                         surfaces: Sequence[str] | None = None) -> list[InspectionSet]:
    """One set per synthetic surface: half the test images have a defect."""
    from imagefm.data.synthetic.defects import SURFACES, defect_record

    sets = []
    for index, surface in enumerate(surfaces or list(SURFACES)):
        if surface not in SURFACES:
            raise ValueError(f"unknown surface {surface!r}; choose among {', '.join(SURFACES)}")
        normal_rng = np.random.default_rng([seed, index, 0])
        test_rng = np.random.default_rng([seed, index, 1])
        normal = [defect_record(normal_rng, key=f"{surface}-normal-{i}", image_size=image_size,
                                split="train", defect_rate=0.0, surfaces=(surface,)).image
                  for i in range(normal_per_category)]
        tests = [defect_record(test_rng, key=f"{surface}-test-{i}", image_size=image_size,
                               split="test", defect_rate=0.5, surfaces=(surface,))
                 for i in range(test_per_category)]
        en, ko = SURFACES[surface][:2]
        sets.append(InspectionSet(surface, {"en": en, "ko": ko}, normal,
                                  [r.image for r in tests], [int(r.label) for r in tests],
                                  [r.mask for r in tests]))
    return sets


def inspection_from_shards(source: str | Path, object_name: str = "object",
                           test_per_category: int | None = None) -> list[InspectionSet]:
    """Sets by category from shards with labels (0 normal / 1 defect) and optional masks."""
    from imagefm.data.formats import SkipCounter, read_shards
    from imagefm.data.synthetic.defects import SURFACES

    groups: dict[str, list[Any]] = {}
    for record in read_shards(source, SkipCounter()):
        if record.image is None or record.label is None:
            continue
        groups.setdefault(str(record.meta.get("surface", "all")), []).append(record)
    if not groups:
        raise ValueError(f"{source}: no labelled images (label 0 = normal, 1 = defect)")
    sets = []
    for category, records in sorted(groups.items()):
        has_test = any(r.split == "test" for r in records)
        normal_pool = [r for r in records if r.label == 0 and (r.split == "train" or not has_test)]
        # Without a test split, the first half of the normal images are memory candidates.
        if not has_test:
            normal_pool = normal_pool[: len(normal_pool) // 2]
        chosen = {id(r) for r in normal_pool}
        tests = [r for r in records if (r.split == "test" if has_test else id(r) not in chosen)]
        tests = _stratified(tests, test_per_category)
        names = ({"en": SURFACES[category][0], "ko": SURFACES[category][1]}
                 if category in SURFACES else {"en": object_name, "ko": object_name})
        sets.append(InspectionSet(category, names, [r.image for r in normal_pool],
                                  [r.image for r in tests], [int(r.label > 0) for r in tests],
                                  [r.mask for r in tests]))
    return sets


def _stratified(records: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` records (all when None), normal and defective in the proportion they
    have, each kept when present: the first ``limit`` in file order could all be defects, and
    AUROC needs both."""
    if not limit or len(records) <= limit:
        return records
    normal = [r for r in records if r.label == 0]
    defect = [r for r in records if r.label != 0]
    n_normal = round(limit * len(normal) / len(records))
    if normal and defect:
        n_normal = min(max(n_normal, 1), limit - 1)
    keep = {id(r) for r in normal[:n_normal] + defect[:limit - n_normal]}
    return [r for r in records if id(r) in keep]


def _mask_array(mask: bytes | None, card: Any, fallback: int) -> np.ndarray:
    """A mask resized/cropped as the card treats images (nearest), boolean ``[S, S]``."""
    size = getattr(card, "image_size", fallback)
    if mask is None:
        return np.zeros((size, size), bool)
    image = Image.open(io.BytesIO(mask)).convert("L")
    w, h = image.size
    if getattr(card, "resize_mode", "squash") == "shortest" and w != h:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.NEAREST)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), Image.NEAREST)
    return np.asarray(image) > 127


def _scores(labels: Sequence[int], masks: np.ndarray, image: torch.Tensor,
            maps: torch.Tensor) -> tuple[float, float | None]:
    image_auc = auroc(image, np.asarray(labels))
    pixel_auc = auroc(maps.numpy(), masks) if masks.any() and not masks.all() else None
    return image_auc, pixel_auc


def check_sets(sets: Sequence[InspectionSet], shots: Sequence[int]) -> None:
    """Refuse, before any work, sets that cannot give every number asked: a test set without
    both normal and defective images (no AUROC), or fewer normal images than the most shots."""
    if not sets:
        raise ValueError("no inspection sets")
    problems = []
    for item in sets:
        defects = sum(1 for label in item.labels if label)
        if defects == 0 or defects == len(item.labels):
            problems.append(f"{item.category}: the test images are all "
                            f"{'defective' if defects else 'normal'} ({len(item.labels)}); "
                            "AUROC needs both kinds")
        most = max(shots, default=0)
        if most > len(item.normal):
            problems.append(f"{item.category}: {most} normal shots asked, "
                            f"{len(item.normal)} normal images available")
    if problems:
        raise ValueError("; ".join(problems))


def evaluate_anomaly(model: Any, processor: Any, sets: Sequence[InspectionSet],
                     shots: Sequence[int] = (0, 1, 4), lang: str = "en",
                     config: AnomalyConfig | None = None, repeats: int = 3, seed: int = 0,
                     out_dir: str | Path | None = None, examples: int = 4
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """AUROC rows per category, method and shots (plus the mean over categories), and the
    names of the anomaly-map PNGs written to ``out_dir`` (one per category).

    Methods: ``zero-shot`` (shots 0), ``memory`` and ``memory+text`` (k normal images; the
    mean over ``repeats`` random draws of the k images).
    """
    check_sets(sets, shots)
    card = getattr(processor, "card", None)
    rows: list[dict[str, Any]] = []
    written: list[str] = []
    rng = np.random.default_rng(seed)
    for item in sets:
        detector = AnomalyDetector(model, processor, item.names.get(lang, item.names["en"]),
                                   lang, config)
        pixels = preprocess(processor, item.images)
        masks = np.stack([_mask_array(m, card, pixels.shape[-1]) for m in item.masks])
        zs_image, zs_maps = detector.zero_shot(pixels)
        image_auc, pixel_auc = _scores(item.labels, masks, zs_image, zs_maps)
        rows.append({"category": item.category, "method": "zero-shot", "shots": 0,
                     "image_auroc": image_auc, "pixel_auroc": pixel_auc})
        shown: dict[str, torch.Tensor] = {"zero-shot": zs_maps}
        for k in [s for s in shots if s > 0]:
            scores: dict[str, list[tuple[float, float | None]]] = {"memory": [],
                                                                    "memory+text": []}
            for repeat in range(repeats):
                chosen = rng.choice(len(item.normal), k, replace=False)
                detector.fit(preprocess(processor, [item.normal[i] for i in chosen]))
                fs_image, fs_maps = detector.few_shot(pixels)
                scores["memory"].append(_scores(item.labels, masks, fs_image, fs_maps))
                both_image, both_maps = (zs_image + fs_image) / 2, (zs_maps + fs_maps) / 2
                scores["memory+text"].append(_scores(item.labels, masks, both_image, both_maps))
                if repeat == 0:
                    shown[f"memory {k}-shot"] = fs_maps
            for method, values in scores.items():
                pixel = [p for _, p in values if p is not None]
                rows.append({"category": item.category, "method": method, "shots": k,
                             "image_auroc": float(np.mean([i for i, _ in values])),
                             "pixel_auroc": float(np.mean(pixel)) if pixel else None})
        if out_dir is not None:
            written.append(_write_maps(item, masks, shown, Path(out_dir), examples))
    return rows + _means(rows), written


def _means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    categories = {r["category"] for r in rows}
    if len(categories) < 2:
        return []
    means = []
    for method, shots in dict.fromkeys((r["method"], r["shots"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["shots"] == shots]
        pixel = [r["pixel_auroc"] for r in group if r["pixel_auroc"] is not None]
        means.append({"category": "mean", "method": method, "shots": shots,
                      "image_auroc": float(np.mean([r["image_auroc"] for r in group])),
                      "pixel_auroc": float(np.mean(pixel)) if pixel else None})
    return means


def _write_maps(item: InspectionSet, masks: np.ndarray, maps: dict[str, torch.Tensor],
                out_dir: Path, examples: int) -> str:
    defective = [i for i, label in enumerate(item.labels) if label][: max(examples - 1, 1)]
    normal = [i for i, label in enumerate(item.labels) if not label][:1]
    picked = defective + normal
    size = masks.shape[-1]
    images = [Image.open(io.BytesIO(item.images[i])).convert("RGB").resize((size, size))
              for i in picked]
    name = f"anomaly_maps_{item.category}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_anomaly_maps(images, [masks[i] for i in picked],
                      {k: v[picked].numpy() for k, v in maps.items()}, out_dir / name,
                      f"{item.category}: defective examples, then a normal one")
    return name
