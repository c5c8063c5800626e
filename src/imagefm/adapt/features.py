"""Image features computed once and cached: the image tower's pooled output, before projection.

Every cheap method (linear probe, Tip-Adapter, CoOp, LoRA on the text tower) trains on these
instead of running the image tower again. Post-projection features are ``image_proj(pre)``, so
one cache serves both; ``normalise(project(model, pre))`` is exactly what zero-shot
classification compares with the class embeddings.

The cache file is named by a hash of the model's weights and preprocessing and of the images'
keys, so a changed model or data set never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from imagefm.apps.zeroshot import inference, model_device, preprocess_tolerant
from imagefm.checkpoint import save_state_dict
from imagefm.data.formats import SkipCounter


@dataclass
class Features:
    """Pre-projection features ``[N, width]`` of the images that decoded, and which those were."""

    pre: torch.Tensor
    kept: torch.Tensor  # long indices into the input list


def model_fingerprint(model: torch.nn.Module, card: Any = None) -> str:
    """A short hash of the weights and preprocessing (changes whenever the model does)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    card = card if card is not None else getattr(model, "card", None)
    digest.update(json.dumps(getattr(card, "__dict__", {}), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def feature_fingerprint(model: torch.nn.Module) -> str:
    """The hash the feature cache is keyed by: the image tower's weights and the preprocessing,
    the only things pre-projection features depend on, so models that share a locked tower
    (``lit-effnet`` and ``lit-effnet-prior``, or one model before and after its heads train)
    share one cache."""
    vision = getattr(model, "vision", None)
    if not isinstance(vision, torch.nn.Module):
        return model_fingerprint(model)
    return model_fingerprint(vision, getattr(model, "card", None))


def _images_fingerprint(keys: Sequence[str], images: Sequence[bytes]) -> str:
    digest = hashlib.sha1()
    for key, image in zip(keys, images, strict=True):
        digest.update(key.encode())
        digest.update(len(image).to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def pooled_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image tower's pooled output (before ``image_proj``) for preprocessed pixels."""
    return model.vision(pixel_values.to(model_device(model)))


def project(model: Any, pre: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Post-projection embeddings of cached pre-projection features (L2-normalised)."""
    with inference(model):
        weight = next(model.image_proj.parameters(), None)
        x = pre.to(weight.device, weight.dtype) if weight is not None else pre
        out = model.image_proj(x).float().cpu()
    # (clone: a normal tensor, usable in autograd outside inference mode)
    return F.normalize(out, dim=-1) if normalise else out.clone()


def extract_features(model: Any, processor: Any, images: Sequence[bytes], *,
                     batch_size: int = 128, skips: SkipCounter | None = None,
                     names: Sequence[str] | None = None, progress: bool = False) -> Features:
    """Pooled image features of ``images``; undecodable images are skipped and counted.

    ``progress`` shows a bar on a terminal (nothing when output is redirected).
    """
    from tqdm.auto import tqdm

    skips = skips if skips is not None else SkipCounter()
    rows, kept = [], []
    starts = tqdm(range(0, len(images), batch_size), desc="image features", unit="batch",
                  disable=None if progress else True, leave=False)
    with inference(model):
        for start in starts:
            chunk = list(images[start:start + batch_size])
            chunk_names = (list(names[start:start + batch_size]) if names is not None else
                           [f"image #{start + i}" for i in range(len(chunk))])
            pixels, ok, errors = preprocess_tolerant(processor, chunk, chunk_names)
            for message in errors:
                skips.add("undecodable image", message)
            if pixels is None:
                continue
            skips.ok(len(ok))
            rows.append(pooled_features(model, pixels).float().cpu())
            kept.extend(start + i for i in ok)
    if not rows:
        raise ValueError(f"no image could be decoded ({skips.report()})")
    return Features(torch.cat(rows), torch.tensor(kept, dtype=torch.long))


def cached_features(model: Any, processor: Any, images: Sequence[bytes], keys: Sequence[str],
                    cache_dir: str | Path | None, *, fingerprint: str | None = None,
                    batch_size: int = 128, skips: SkipCounter | None = None,
                    progress: bool = False) -> Features:
    """:func:`extract_features`, read from / written to ``cache_dir`` when one is given."""
    if cache_dir is None:
        return extract_features(model, processor, images, batch_size=batch_size, skips=skips,
                                names=keys, progress=progress)
    fingerprint = fingerprint or feature_fingerprint(model)
    path = Path(cache_dir) / f"features-{fingerprint}-{_images_fingerprint(keys, images)}.st"
    if path.is_file():
        state = load_file(path)
        return Features(state["pre"], state["kept"])
    features = extract_features(model, processor, images, batch_size=batch_size, skips=skips,
                                names=keys, progress=progress)
    save_state_dict({"pre": features.pre.contiguous(), "kept": features.kept}, path)
    return features


@dataclass
class FeatureViews:
    """Normalised ``pre`` and ``post`` features of one split, with their labels."""

    pre: torch.Tensor
    post: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, kind: str) -> torch.Tensor:
        if kind not in ("pre", "post"):
            raise ValueError(f"feature kind must be 'pre' or 'post', got {kind!r}")
        return self.pre if kind == "pre" else self.post

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FeatureViews:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FeatureViews(self.pre[idx], self.post[idx], self.labels[idx])


def feature_views(model: Any, pre: torch.Tensor, labels: torch.Tensor) -> FeatureViews:
    """Both normalised views of raw pooled features ``pre``."""
    return FeatureViews(F.normalize(pre.float(), dim=-1), project(model, pre), labels)
