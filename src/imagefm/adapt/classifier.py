"""An adapted classifier on disk: an ordinary imagefm checkpoint plus its head.

    clf = AdaptedClassifier(model, processor, head, classnames, {"method": "probe"})
    clf.save("runs/mine/model")
    clf = AdaptedClassifier.load("runs/mine/model")
    clf.predict(["part.png"])[0]            # ("scratch", 0.93)

The directory is a complete imagefm checkpoint (``imagefm.load`` reads it: for LoRA and
fine-tuning the adapted weights, merged; otherwise the original ones) with ``head.safetensors``
and ``adapter.json`` (method, class names, language, feature kind) beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from imagefm.adapt.features import extract_features, feature_views
from imagefm.adapt.head import Head
from imagefm.checkpoint import atomic_write_text, save_state_dict

HEAD_FILE = "head.safetensors"
ADAPTER_FILE = "adapter.json"


class AdaptedClassifier:
    def __init__(self, model: Any, processor: Any, head: Head, classnames: Sequence[str],
                 meta: dict[str, Any] | None = None) -> None:
        if head.num_classes != len(classnames):
            raise ValueError(f"the head has {head.num_classes} classes, {len(classnames)} "
                             "names given")
        self.model, self.processor, self.head = model.eval(), processor, head
        self.classnames = list(classnames)
        self.meta = dict(meta or {})

    def logits(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Class logits ``[N, C]`` (images: paths, bytes, PIL images or arrays; all must decode)."""
        feats = extract_features(self.model, self.processor, list(images), batch_size=batch_size)
        if len(feats.kept) != len(images):
            raise ValueError("some images could not be decoded; check them with "
                             "imagefm.data.image.open_image")
        views = feature_views(self.model, feats.pre, torch.zeros(len(images), dtype=torch.long))
        return self.head.logits(views.get(self.head.feature))

    def predict(self, images: Sequence[Any]) -> list[tuple[str, float]]:
        """(class name, softmax probability) of each image's best class."""
        probs = self.logits(images).softmax(dim=-1)
        values, indices = probs.max(dim=-1)
        return [(self.classnames[i], float(v)) for v, i in zip(values, indices.tolist(),
                                                               strict=True)]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        save_state_dict(self.head.state(), directory / HEAD_FILE)
        meta = {**self.meta, "classnames": self.classnames, "head": self.head.settings()}
        atomic_write_text(directory / ADAPTER_FILE,
                          json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AdaptedClassifier:
        import imagefm

        directory = Path(directory)
        path = directory / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a directory written by "
                                    "AdaptedClassifier.save / imagefm adapt --save")
        meta = json.loads(path.read_text(encoding="utf-8"))
        head = Head.from_state(load_file(directory / HEAD_FILE), meta.pop("head"))
        classnames = meta.pop("classnames")
        return cls(imagefm.load(directory), imagefm.load_processor(directory), head, classnames,
                   meta)
