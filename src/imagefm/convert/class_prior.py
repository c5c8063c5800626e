"""``lit-effnet-prior``: LiT whose image projection starts from the ImageNet head's knowledge.

    imagefm train configs/lit-effnet-prior.yaml

The model is ``lit-effnet`` (locked ImageNet EfficientNet-Lite0, multilingual-e5-small) with
``image_projection = "imagenet_prior"`` (:mod:`imagefm.models.class_prior`). Building it:

* the projection's ``classifier`` gets EfficientNet-Lite0's own ImageNet head (``_fc`` of the
  PyPI package's file, the 1,000-way layer the tower was trained with);
* each ``class_embed`` row is the text tower's embedding of the class's names in a few caption
  templates ("a photo of a tabby cat."), averaged and L2-normalised, with Korean names and
  descriptions averaged in where they are given (below);
* the text projection starts as the identity less the class vectors' common direction (which
  is projected out of the class vectors too), so before any training an image's embedding is
  the mean of its likely classes' text embeddings: a zero-shot model.

Class texts (:mod:`imagefm.convert.imagenet_text` says where each comes from and its licence):
English names from ``open_clip_torch`` or a file (``model.config.class_names``: one name per line,
in ImageNet class-index order; several names for one class separated by ``|``); optionally names
in Korean (``model.config.class_names_ko``: such a file, or ``babel-imagenet``) and descriptions
(``model.config.class_descriptions``: ``cupl``, or a JSON file ``{class name: [sentences]}``,
``descriptions_per_class`` of them per class). Each class vector is the mean over the sources
that have text for the class. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import ConfigError, DualEncoderConfig, merge_nested, preset
from imagefm.convert.imagenet_text import (
    babel_imagenet_names,
    cupl_descriptions,
    english_class_names,
)
from imagefm.convert.towers import PRESET_TOWERS, _effnet_lite0_file, build_dual_encoder
from imagefm.models.class_prior import IMAGENET_CLASSES, ClassPriorProjection

EN_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "{}")
KO_TEMPLATES = ("{} 사진.", "{} 그림.", "{}")
DESCRIPTION_TEMPLATES = ("{}",)  # CuPL sentences are whole captions already
# Builder options read from model.config (not DualEncoderConfig fields).
OPTIONS = ("class_names", "class_names_ko", "class_descriptions", "descriptions_per_class")


def read_class_names(path: str | Path) -> list[list[str]]:
    """One line per class (``|`` between synonyms), exactly ``IMAGENET_CLASSES`` lines."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) != IMAGENET_CLASSES:
        raise ConfigError(f"{path}: expected {IMAGENET_CLASSES} class-name lines (ImageNet "
                          f"order), found {len(lines)}")
    return [[name.strip() for name in line.split("|") if name.strip()] for line in lines]


def imagenet_class_names(path: str | Path | None = None) -> list[list[str]]:
    """English ImageNet class names: ``path`` if given, else open_clip's copy of CLIP's list."""
    if path is not None:
        return read_class_names(path)
    return [[name] for name in english_class_names()]


def korean_class_names(source: str | Path) -> list[list[str]]:
    """``babel-imagenet`` (648 classes named) or a 1,000-line file like ``read_class_names``'s."""
    if str(source) == "babel-imagenet":
        return babel_imagenet_names("ko")
    return read_class_names(source)


def class_descriptions(source: str | Path, per_class: int = 10) -> list[list[str]]:
    """``cupl`` (clip_benchmark's copy) or a JSON file ``{CLIP class name: [sentences]}``."""
    return cupl_descriptions(per_class, path=None if str(source) == "cupl" else source)


@torch.no_grad()
def embed_class_names(model: nn.Module, names: list[list[str]], templates: tuple[str, ...],
                      batch_size: int = 256) -> torch.Tensor:
    """Per class, the mean of the L2-normalised projected text embeddings of every
    (name, template) pair [C, embed_dim] (not renormalised)."""
    texts, owners = [], []
    for index, synonyms in enumerate(names):
        for name in synonyms:
            for template in templates:
                texts.append(template.format(name))
                owners.append(index)
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = model.tokenizer(texts[start:start + batch_size])
        rows.append(F.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"])
                                .float(), dim=-1))
    model.train(was_training)
    embeds = torch.cat(rows)
    index = torch.tensor(owners)
    sums = torch.zeros(len(names), embeds.shape[1]).index_add_(0, index, embeds)
    return sums / torch.bincount(index, minlength=len(names)).clamp(min=1).unsqueeze(1)


def load_imagenet_head(projection: ClassPriorProjection) -> None:
    """EfficientNet-Lite0's ImageNet classifier (``_fc``) into ``projection.classifier``."""
    state = torch.load(str(_effnet_lite0_file()), map_location="cpu", weights_only=True)
    weight, bias = state["_fc.weight"], state["_fc.bias"]
    if weight.shape != projection.classifier.weight.shape:
        raise ConfigError(f"the ImageNet head is {tuple(weight.shape)}, the projection's "
                          f"classifier {tuple(projection.classifier.weight.shape)}")
    with torch.no_grad():
        projection.classifier.weight.copy_(weight)
        projection.classifier.bias.copy_(bias)


@torch.no_grad()
def init_class_prior(model: nn.Module, names_en: list[list[str]],
                     names_ko: list[list[str]] | None = None,
                     descriptions: list[list[str]] | None = None) -> None:
    """Fill ``model.image_proj`` (head + class vectors) and set ``text_proj`` to the identity
    less the class vectors' common direction. A class's vector is the mean of its sources'
    embeddings (English names; Korean names and descriptions where the class has some)."""
    projection = model.image_proj
    if not isinstance(projection, ClassPriorProjection):
        raise ConfigError("init_class_prior needs model.image_projection = 'imagenet_prior'")
    text_proj = model.text_proj
    if not isinstance(text_proj, nn.Linear) or text_proj.weight.shape[0] != \
            text_proj.weight.shape[1]:
        raise ConfigError("the class prior needs a square linear text projection "
                          "(embed_dim == text.width), so text embeddings start as they are")
    text_proj.weight.copy_(torch.eye(text_proj.weight.shape[0]))
    if text_proj.bias is not None:
        text_proj.bias.zero_()
    load_imagenet_head(projection)
    sources = [(names_en, EN_TEMPLATES), (names_ko, KO_TEMPLATES),
               (descriptions, DESCRIPTION_TEMPLATES)]
    total, count = None, torch.zeros(len(names_en), 1)
    for texts, templates in sources:
        if texts is None:
            continue
        if len(texts) != len(names_en):
            raise ConfigError(f"class texts for {len(texts)} classes, names for {len(names_en)}")
        embeds = embed_class_names(model, texts, templates)
        present = torch.tensor([[float(bool(t))] for t in texts])
        total = embeds * present if total is None else total + embeds * present
        count += present
    embeds = total / count.clamp(min=1)
    # Sentence embeddings share one large common direction (multilingual-e5's class-name vectors
    # have a mean pairwise cosine of 0.87), which drowns the differences between classes. Both
    # sides start with it projected out: the text projection is I - u u^T (u the mean class
    # direction) and the class vectors are projected the same way.
    direction = F.normalize(embeds.mean(dim=0), dim=0)
    centre = torch.eye(len(direction)) - torch.outer(direction, direction)
    text_proj.weight.copy_(centre)
    projection.class_embed.copy_(F.normalize(embeds @ centre, dim=-1))


def build_lit_effnet_prior(name: str, overrides: dict[str, Any], pretrained: bool = True
                           ) -> nn.Module:
    """``model.preset: lit-effnet-prior`` (train/presets.py MODEL_PRESETS)."""
    overrides = dict(overrides)
    options = {key: overrides.pop(key, None) for key in OPTIONS}
    config = DualEncoderConfig.from_dict(merge_nested(preset(name).to_dict(), overrides))
    model = build_dual_encoder(config, PRESET_TOWERS["lit-effnet"] if pretrained else {})
    if pretrained:
        names_ko = korean_class_names(options["class_names_ko"]) if options["class_names_ko"] \
            else None
        descriptions = class_descriptions(options["class_descriptions"],
                                          int(options["descriptions_per_class"] or 10)) \
            if options["class_descriptions"] else None
        init_class_prior(model, imagenet_class_names(options["class_names"]), names_ko,
                         descriptions)
    return model
