"""A locked image tower's features kept on disk between runs (``data.options.feature_cache``).

Training several heads over one locked tower (different projections, text-tower stages, steps)
recomputes the same features every run: on a small CPU that is most of the run (1,956 pictures x
2 views of EfficientNet-Lite0 take minutes). With ``feature_cache: DIR`` the recipes source
writes them once to ``DIR/<key>.safetensors`` and later runs read them back.

The key is a SHA-1 of everything the features depend on: every image's bytes in order, the
number of views, the tower's config and preprocessing card, and the tower's weights. Anything
else (another tower, other pictures, another crop size) is another file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.checkpoint import save_state_dict


def feature_key(images: list[bytes], views: int, tower: nn.Module, card: Any) -> str:
    """SHA-1 over the images, views, tower config, card and tower weights."""
    digest = hashlib.sha1()
    config = getattr(tower, "config", None)
    described = {"views": views, "card": repr(card), "config": repr(config)}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for image in images:
        digest.update(hashlib.sha1(image).digest())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_features(directory: str | Path, key: str) -> torch.Tensor | None:
    """The cached features [views, N, width] under ``key``, or None when there are none."""
    from safetensors.torch import load_file

    path = Path(directory) / f"{key}.safetensors"
    if not path.is_file():
        return None
    return load_file(str(path))["features"]


def save_features(directory: str | Path, key: str, features: torch.Tensor) -> Path:
    """Write ``features`` atomically to ``directory/<key>.safetensors``."""
    path = Path(directory) / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_state_dict({"features": features}, path)
