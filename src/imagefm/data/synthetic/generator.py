"""Turning an index into a record, for every kind of synthetic data, on any number of cores.

Each sample has its own random generator seeded by (seed, kind, split, index), so sample 17
is the same whether it was made alone, by one process or by eight: output depends only on the
seed, never on the number of workers or the order work finished in.
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from imagefm.data.records import Caption, Record
from imagefm.data.synthetic.captions import scene_captions
from imagefm.data.synthetic.defects import defect_record
from imagefm.data.synthetic.drawing import encode_png
from imagefm.data.synthetic.pairs import member_spec
from imagefm.data.synthetic.scenes import (
    LAYOUTS,
    SceneConfig,
    SceneSpec,
    render_scene,
    sample_scene,
)
from imagefm.data.synthetic.text_render import hangul_fonts, text_record
from imagefm.data.synthetic.vocab import COLOUR_NAMES, DEFAULT_HELD_OUT, SHAPE_NAMES
from imagefm.data.synthetic.vqa import conversation, pick_questions, scene_questions

log = logging.getLogger(__name__)

LICENSE = "generated, CC0"
SPLITS = ("train", "eval", "all")
_KIND_IDS = {"scenes": 1, "vqa": 2, "text": 3, "defects": 4, "pairs": 5}
_GROUP_STREAM = 100  # offset of the per-group random streams of "pairs"
_SPLIT_IDS = {"train": 0, "eval": 1, "all": 2}
# Attributes a scene record can be labelled by, with the class order of the label index.
LABEL_CLASSES = {"colour": COLOUR_NAMES, "shape": SHAPE_NAMES}
# Below this many samples a process pool costs more than it saves.
_MIN_PER_WORKER = 16


STYLE_FIELDS = ("textures", "backgrounds", "background_colours", "jitter")


def _scene_config(split: str, held_out: Iterable[Sequence[str]] | None, max_count: int,
                  layouts: Sequence[str], style: dict[str, Any] | None = None) -> SceneConfig:
    """``style`` sets how scenes look: ``textures``, ``backgrounds`` (kinds),
    ``background_colours`` and ``jitter`` (see SceneConfig); e.g. the quickstart's clean scenes
    are ``{"textures": ["solid"], "backgrounds": ["plain"], "jitter": 0}``."""
    held = DEFAULT_HELD_OUT if held_out is None else frozenset(tuple(c) for c in held_out)
    style = dict(style or {})
    unknown = sorted(set(style) - set(STYLE_FIELDS))
    if unknown:
        raise ValueError(f"unknown scene style keys {unknown}; known: {', '.join(STYLE_FIELDS)}")
    for key in ("textures", "backgrounds", "background_colours"):
        if key in style:
            style[key] = tuple(style[key])
    return SceneConfig(split=split, held_out=held, max_count=max_count, layouts=tuple(layouts),
                       **style)


def scene_record(rng: np.random.Generator, *, key: str, image_size: int, split: str,
                 held_out: Iterable[Sequence[str]] | None = None, max_count: int = 5,
                 layouts: Sequence[str] = LAYOUTS, captions_per_lang: int = 2,
                 label_by: str | None = None, supersample: int | None = None,
                 style: dict[str, Any] | None = None) -> Record:
    """A scene image with ``captions_per_lang`` English and Korean captions; spec in meta.

    ``label_by="colour"`` or ``"shape"`` makes single-object scenes labelled with the class
    index in ``COLOUR_NAMES`` / ``SHAPE_NAMES`` order (zero-shot and linear-probe evaluation).
    """
    if label_by is not None:
        layouts = ("single",)
    spec = sample_scene(rng, _scene_config(split, held_out, max_count, layouts, style))
    return _spec_record(spec, rng, key=key, image_size=image_size, split=split,
                        captions_per_lang=captions_per_lang, label_by=label_by,
                        supersample=supersample, source="synthetic/scenes")


def pairs_record(rng: np.random.Generator, *, key: str, image_size: int, split: str,
                 group_rng: np.random.Generator | None = None, member: int = 0,
                 group_size: int = 4, mixed: float = 0.2,
                 held_out: Iterable[Sequence[str]] | None = None, max_count: int = 5,
                 captions_per_lang: int = 2, supersample: int | None = None,
                 style: dict[str, Any] | None = None) -> Record:
    """A scene of a minimal-pair group (see ``imagefm.data.synthetic.pairs``)."""
    if group_size < 1 or not 0 <= mixed <= 1:
        raise ValueError(f"group_size must be >= 1 and mixed in [0, 1], got {group_size}, "
                         f"{mixed}")
    config = _scene_config(split, held_out, max_count, LAYOUTS, style)
    spec = member_spec(group_rng if group_rng is not None else rng, rng, member, config,
                       group_size, mixed)
    record = _spec_record(spec, rng, key=key, image_size=image_size, split=split,
                          captions_per_lang=captions_per_lang, label_by=None,
                          supersample=supersample, source="synthetic/pairs")
    record.meta["group"] = key.rsplit("-", 1)[0] + f"-g{int(key.rsplit('-', 1)[1]) // group_size}"
    return record


def _spec_record(spec: SceneSpec, rng: np.random.Generator, *, key: str, image_size: int,
                 split: str, captions_per_lang: int, label_by: str | None,
                 supersample: int | None, source: str) -> Record:
    image = render_scene(spec, image_size, supersample)
    captions = [Caption(text, lang) for lang in ("en", "ko")
                for text in scene_captions(spec, lang, rng, captions_per_lang)]
    label = label_name = None
    if label_by is not None:
        names = LABEL_CLASSES[label_by]
        label_name = getattr(spec.objects[0], label_by)
        label = names.index(label_name)
    return Record(key=key, image=encode_png(image), captions=captions, label=label,
                  label_name=label_name, split=split, source=source,
                  license=LICENSE, meta={"scene": spec.to_dict()})


def vqa_record(rng: np.random.Generator, *, key: str, image_size: int, split: str,
               held_out: Iterable[Sequence[str]] | None = None, max_count: int = 5,
               layouts: Sequence[str] = LAYOUTS, qa_per_image: int = 3,
               langs: Sequence[str] = ("en", "ko"), supersample: int | None = None,
               style: dict[str, Any] | None = None, height: int | None = None) -> Record:
    """A scene with a conversation of ``qa_per_image`` questions in one language (en or ko).
    ``height``: draw it ``image_size`` wide and ``height`` high (the same scene and text)."""
    config = _scene_config(split, held_out, max_count, layouts, style)
    spec = sample_scene(rng, config)
    image = render_scene(spec, image_size, supersample, height)
    # "No" questions in the train split may only name compositions the split is allowed to see.
    mentionable = config.allowed_combos() if split == "train" else SceneConfig(
        split="all").allowed_combos()
    questions = pick_questions(scene_questions(spec, rng, mentionable), qa_per_image, rng)
    lang = langs[int(rng.integers(len(langs)))]
    captions = [Caption(text, code) for code in ("en", "ko")
                for text in scene_captions(spec, code, rng, 1)]
    return Record(key=key, image=encode_png(image), captions=captions,
                  conversation=conversation(questions, lang), split=split,
                  source="synthetic/vqa", license=LICENSE,
                  meta={"scene": spec.to_dict(), "lang": lang,
                        "question_kinds": [q.kind for q in questions]})


BUILDERS: dict[str, Callable[..., Record]] = {
    "scenes": scene_record, "vqa": vqa_record, "text": text_record, "defects": defect_record,
    "pairs": pairs_record,
}
KINDS = tuple(BUILDERS)


def sample_rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample; independent streams per kind, split and index."""
    return np.random.default_rng(np.random.SeedSequence(
        [seed, _KIND_IDS[kind], _SPLIT_IDS[split], index]))


def sample_key(kind: str, seed: int, split: str, index: int) -> str:
    """A WebDataset-safe key (no dots) unique across kinds, seeds and splits."""
    return f"{kind}-s{seed}-{split}-{index:09d}"


def check_request(kind: str, seed: int, image_size: int, split: str,
                  options: dict[str, Any]) -> None:
    """Fail fast, before any work, on a bad kind, split, size, seed or option name."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in 16..4096 pixels, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    try:
        inspect.signature(BUILDERS[kind]).bind(None, key="", image_size=image_size, split=split,
                                               **options)
    except TypeError as error:
        raise ValueError(f"bad option for synthetic kind {kind!r}: {error}") from None
    if options.get("label_by") not in (None, *LABEL_CLASSES):
        raise ValueError(f"label_by must be one of {tuple(LABEL_CLASSES)}, "
                         f"got {options['label_by']!r}")
    if kind in ("scenes", "vqa", "pairs"):
        _scene_config(split, options.get("held_out"), options.get("max_count", 5),
                      options.get("layouts", LAYOUTS), options.get("style"))
    if kind == "text":
        hangul_fonts()  # raises with the install command when no Hangul font is found


def make_record(kind: str, index: int, *, seed: int = 0, image_size: int = 64,
                split: str = "train", **options: Any) -> Record:
    """Sample ``index`` of a synthetic dataset (usable directly as a map-style dataset)."""
    rng = sample_rng(kind, seed, split, index)
    key = sample_key(kind, seed, split, index)
    if kind == "pairs":  # members of one group share the group's random stream
        group = index // options.get("group_size", 4)
        options = {**options, "member": index % options.get("group_size", 4),
                   "group_rng": sample_rng(kind, seed + _GROUP_STREAM, split, group)}
    return BUILDERS[kind](rng, key=key, image_size=image_size, split=split, **options)


def _make_safely(index: int, **request: Any) -> tuple[int, Record | None, str]:
    # A failing sample must not kill a long job: report it and let the caller count it.
    try:
        return index, make_record(index=index, **request), ""
    except Exception as error:  # noqa: BLE001 - any failure of one sample is reported, not raised
        return index, None, f"{type(error).__name__}: {error}"


def _pool_context() -> mp.context.BaseContext:
    # fork is cheap and safe here (workers only use numpy/Pillow); spawn elsewhere.
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def resolve_workers(workers: int | None) -> int:
    """``None`` or 0 means every core."""
    return max(1, workers or os.cpu_count() or 1)


def generate_results(kind: str, n: int, *, seed: int = 0, image_size: int = 64,
                     split: str = "train", workers: int | None = None, start: int = 0,
                     **options: Any) -> Iterator[tuple[int, Record | None, str]]:
    """``(index, record or None, error)`` in index order; failures are reported, not raised.

    The request is checked now, before any work; samples are made as the iterator is read.
    """
    check_request(kind, seed, image_size, split, options)
    make = functools.partial(_make_safely, kind=kind, seed=seed, image_size=image_size,
                             split=split, **options)
    workers = min(resolve_workers(workers), max(1, n // _MIN_PER_WORKER))
    return _run(make, range(start, start + n), workers)


def _run(make: Callable[[int], tuple[int, Record | None, str]], indices: range,
         workers: int) -> Iterator[tuple[int, Record | None, str]]:
    if workers == 1:
        yield from map(make, indices)
        return
    chunk = max(1, min(64, len(indices) // (workers * 8)))
    with _pool_context().Pool(workers) as pool:
        yield from pool.imap(make, indices, chunksize=chunk)


def generate(kind: str, n: int, *, seed: int = 0, image_size: int = 64, split: str = "train",
             workers: int | None = None, start: int = 0, **options: Any) -> Iterator[Record]:
    """Yield ``n`` records of ``kind`` ("scenes", "vqa", "text", "defects"), in index order.

    Deterministic by ``seed`` whatever ``workers`` is (``None`` = all cores). ``split="train"``
    never shows a held-out (colour, shape) pair; ``split="eval"`` shows only those. ``options``
    go to the builder of the kind (e.g. ``held_out``, ``max_count``, ``defect_rate``).
    A sample that fails is logged and skipped; a bad request raises at once.
    """
    results = generate_results(kind, n, seed=seed, image_size=image_size, split=split,
                               workers=workers, start=start, **options)
    return _records_only(kind, results)


def _records_only(kind: str, results: Iterator[tuple[int, Record | None, str]]
                  ) -> Iterator[Record]:
    for index, record, error in results:
        if record is None:
            log.warning("synthetic %s sample %d skipped: %s", kind, index, error)
            continue
        yield record


def benchmark(kind: str = "scenes", n: int = 200, *, image_size: int = 64, workers: int = 1,
              seed: int = 0, **options: Any) -> dict[str, Any]:
    """Time generating ``n`` encoded records (pool start-up included); returns images/s."""
    started = time.perf_counter()
    count = sum(1 for _ in generate(kind, n, seed=seed, image_size=image_size, workers=workers,
                                    **options))
    seconds = time.perf_counter() - started
    return {"kind": kind, "n": count, "image_size": image_size, "workers": workers,
            "seconds": round(seconds, 3), "images_per_s": round(count / seconds, 1)}
