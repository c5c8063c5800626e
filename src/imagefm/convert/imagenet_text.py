"""Texts about the 1,000 ImageNet classes, for the class prior (:mod:`imagefm.convert.class_prior`).

Three sources, all read from where a package installed them (nothing is downloaded):

* English class names: the 1,000 cleaned names of OpenAI's CLIP (MIT licence), as shipped by
  ``open_clip_torch`` (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``).
* Names in other languages: **Babel-ImageNet** (Geigle et al., 2023), shipped by PyPI
  ``clip_benchmark`` (MIT; ``clip_benchmark/datasets/babel_imagenet.json``). Its labels come
  from BabelNet, whose licence is non-commercial (CC BY-NC-SA): check it before commercial use.
  Korean covers 648 of the 1,000 classes; a class without a name keeps its English names only.
* Descriptions: **CuPL** (Pratt et al., 2023: sentences an LLM wrote about what each class looks
  like, "A tench is an olive-brown freshwater fish with prominent darkish spots."), shipped by
  ``clip_benchmark`` too (``cupl_prompts.json``), keyed by CLIP's class names.

``pip install --no-deps clip_benchmark`` is enough: only its data files are read, never imported
(importing it needs torchvision and more).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from imagefm.config import ConfigError
from imagefm.models.class_prior import IMAGENET_CLASSES

CLIP_BENCHMARK_HINT = "pip install --no-deps clip_benchmark"


def english_class_names() -> list[str]:
    """CLIP's 1,000 cleaned ImageNet class names, in class-index order (open_clip's copy)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:
        raise ConfigError("the ImageNet class names come from open_clip_torch (pip install "
                          "open_clip_torch) or a file: model.config.class_names=PATH") from None
    return list(IMAGENET_CLASSNAMES)


def clip_benchmark_file(name: str) -> Path:
    """``clip_benchmark/datasets/<name>`` of the installed package, without importing it."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{name} comes from the clip_benchmark package: {CLIP_BENCHMARK_HINT} "
                          "(or give a file path instead)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / name
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall clip_benchmark ({CLIP_BENCHMARK_HINT})")
    return path


def babel_imagenet_names(lang: str, path: str | Path | None = None) -> list[list[str]]:
    """Babel-ImageNet's names of each ImageNet class in ``lang`` ("ko", "de"...): 1,000 lists,
    empty where the language has no name for the class."""
    source = Path(path) if path is not None else clip_benchmark_file("babel_imagenet.json")
    table = json.loads(source.read_text(encoding="utf-8"))
    key = lang.upper()
    if key not in table:
        raise ConfigError(f"{source}: no {lang!r} names; it has {', '.join(sorted(table))}")
    indices, names = table[key]
    if len(indices) != len(names):
        raise ConfigError(f"{source}: {lang!r} has {len(indices)} class indices for "
                          f"{len(names)} names")
    out: list[list[str]] = [[] for _ in range(IMAGENET_CLASSES)]
    for index, name in zip(indices, names, strict=True):
        if not 0 <= int(index) < IMAGENET_CLASSES:
            raise ConfigError(f"{source}: class index {index} is outside 0-999")
        if name.strip():
            out[int(index)].append(name.strip())
    return out


def cupl_descriptions(per_class: int = 10, seed: int = 0, path: str | Path | None = None,
                      class_names: list[str] | None = None) -> list[list[str]]:
    """CuPL sentences for each class (``per_class`` of them, drawn reproducibly with ``seed``;
    all where there are fewer): 1,000 lists in class-index order, keyed by CLIP's names."""
    if per_class < 1:
        raise ConfigError(f"model.config.descriptions_per_class must be >= 1, got {per_class}")
    source = Path(path) if path is not None else clip_benchmark_file("cupl_prompts.json")
    table = json.loads(source.read_text(encoding="utf-8"))
    table = table.get("imagenet1k", table)  # clip_benchmark nests it per data set
    names = class_names if class_names is not None else english_class_names()
    missing = [name for name in names if name not in table]
    if len(missing) > len(names) // 10:
        raise ConfigError(f"{source}: {len(missing)} of {len(names)} class names have no "
                          f"descriptions (e.g. {missing[0]!r}): is it CuPL's ImageNet file?")
    rng = random.Random(seed)
    out = []
    for name in names:
        sentences = [s for s in table.get(name, []) if s.strip()]
        out.append(rng.sample(sentences, per_class) if len(sentences) > per_class else sentences)
    return out
