"""Synthetic data: coloured-shape scenes, VQA, rendered text and surface defects, en + ko.

Deterministic by seed, on any number of cores::

    from imagefm.data.synthetic import generate, write_shards, SynthSpec
    records = list(generate("scenes", 100, seed=0, image_size=64))
    write_shards(SynthSpec("vqa", 10_000, seed=0), "data/vqa", progress=True)

Modules: ``vocab`` (class names per language), ``korean`` (particles, counters), ``scenes``
(spec, sampling, rendering), ``captions``, ``vqa``, ``text_render``, ``defects``,
``generator`` (index → record, multiprocessing), ``writer`` (WebDataset shards + manifest).
"""

from __future__ import annotations

from imagefm.data.synthetic.generator import (
    KINDS,
    benchmark,
    generate,
    make_record,
)
from imagefm.data.synthetic.scenes import (
    Background,
    SceneConfig,
    SceneObject,
    SceneSpec,
    render_scene,
    sample_scene,
)
from imagefm.data.synthetic.text_render import FontNotFoundError, find_hangul_fonts
from imagefm.data.synthetic.vocab import (
    COLOUR_NAMES,
    COLOURS,
    DEFAULT_HELD_OUT,
    SHAPE_NAMES,
    SHAPES,
    class_names,
)
from imagefm.data.synthetic.writer import SynthSpec, write_shards

__all__ = [
    "COLOURS", "COLOUR_NAMES", "DEFAULT_HELD_OUT", "KINDS", "SHAPES", "SHAPE_NAMES", "Background",
    "FontNotFoundError", "SceneConfig", "SceneObject", "SceneSpec", "SynthSpec", "benchmark",
    "class_names", "find_hangul_fonts", "generate", "make_record", "render_scene",
    "sample_scene", "write_shards",
]
