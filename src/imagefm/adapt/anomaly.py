"""Anomaly detection with a CLIP-style ViT, WinCLIP-style: zero-shot from state prompts, and
few-shot from a memory of normal patches.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation" (CVPR 2023).

* **Text.** A *normal* and an *anomalous* class embedding, each a prompt ensemble of state words
  ("flawless {}", "{} with defect"…) around the object's name, put through the language's
  shipped zero-shot templates (the compositional prompt ensemble of the paper).
* **Zero-shot, image level.** The image embedding's softmax probability of *anomalous*.
* **Zero-shot, pixel level.** The ViT's patch tokens, projected into the joint space, are scored
  the same way. WinCLIP re-encodes masked windows of the image; we approximate a ``k×k`` window by
  the mean of its projected patch tokens (``scales``), score every window and give each patch
  the mean score of the windows covering it, averaged over scales. Maps are upsampled to the
  input resolution.
* **Few-shot (WinCLIP+ / PatchCore style).** The patch tokens of ``k`` normal images, from an
  intermediate and the last block (``layers``), form a memory; a test patch's score is
  ``1 − max cosine similarity`` to the memory (averaged over layers); the image's is its
  maximum. ``memory+text`` averages that with the zero-shot scores, as WinCLIP+ does.

Needs a ViT image tower (patch tokens); a convolutional tower raises a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from imagefm.apps.zeroshot import class_embeddings, logit_parts, model_device
from imagefm.eval.templates import load_templates, render

# State words of the compositional prompt ensemble; "{}" is the object's name.
STATES = {
    "en": {"normal": ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                      "{} without defect", "{} without damage"),
           "anomalous": ("damaged {}", "broken {}", "{} with flaw", "{} with defect",
                         "{} with damage")},
    "ko": {"normal": ("{}", "결함이 없는 {}", "깨끗한 {}", "흠집 없는 {}", "손상되지 않은 {}"),
           "anomalous": ("결함이 있는 {}", "손상된 {}", "흠집이 난 {}", "깨진 {}", "불량인 {}")},
}


@dataclass(frozen=True)
class AnomalyConfig:
    scales: tuple[int, ...] = (1, 2, 3)  # window sizes in patches for the zero-shot map
    layers: tuple[int, ...] = (-3, -1)  # blocks whose patch tokens form the few-shot memory
    templates: int | None = None  # how many of the language's templates (None: all)


def state_prompts(object_name: str, lang: str = "en", templates: int | None = None
                  ) -> list[list[str]]:
    """``[normal prompts, anomalous prompts]`` for ``object_name``."""
    if lang not in STATES:
        raise ValueError(f"no anomaly state words for language {lang!r}; have {sorted(STATES)}")
    chosen = load_templates(lang)[:templates]
    return [list(dict.fromkeys(render(t, state.format(object_name), lang)
                               for state in STATES[lang][kind] for t in chosen))
            for kind in ("normal", "anomalous")]


def _vision_blocks(model: Any) -> Any:
    blocks = getattr(getattr(getattr(model, "vision", None), "transformer", None), "blocks",
                     None)
    if blocks is None or not hasattr(model.vision, "forward_tokens"):
        raise ValueError("anomaly maps need a ViT image tower with patch tokens "
                         "(model.vision.forward_tokens); this model's image tower has none")
    return blocks


class AnomalyDetector:
    """Zero-shot and few-shot anomaly scores and maps for one kind of object."""

    def __init__(self, model: Any, processor: Any, object_name: str, lang: str = "en",
                 config: AnomalyConfig | None = None) -> None:
        self.model, self.processor = model, processor
        self.config = config or AnomalyConfig()
        self.blocks = _vision_blocks(model)
        self.text = class_embeddings(model, processor,
                                     state_prompts(object_name, lang, self.config.templates))
        self.scale, self.bias = logit_parts(model)
        self.memory: list[torch.Tensor] | None = None
        vision = model.vision.config
        self.has_class_token = bool(getattr(vision, "class_token", False))

    # ---- features
    def _tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final patch tokens ``[B, P, W]`` (after the final norm) and the ``layers``' outputs."""
        captured: dict[int, torch.Tensor] = {}
        indices = [i % len(self.blocks) for i in self.config.layers]
        hooks = [self.blocks[i].register_forward_hook(
            lambda _m, _in, out, i=i: captured.__setitem__(i, out)) for i in set(indices)]
        try:
            with torch.no_grad():
                tokens = self.model.vision.forward_tokens(pixels.to(model_device(self.model)))
        finally:
            for hook in hooks:
                hook.remove()
        skip = int(self.has_class_token)
        return tokens[:, skip:].float(), [captured[i][:, skip:].float() for i in indices]

    def _state_probability(self, embeds: torch.Tensor) -> torch.Tensor:
        """Softmax probability of *anomalous* for projected embeddings ``[..., D]``."""
        cos = F.normalize(embeds.float(), dim=-1) @ self.text.to(embeds.device).t()
        return (self.scale * cos + self.bias).softmax(dim=-1)[..., 1]

    # ---- zero-shot
    def zero_shot(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``[B]`` and anomaly maps ``[B, H, W]`` (input resolution)."""
        with torch.no_grad():
            image = self._state_probability(self.model.encode_image(
                pixels.to(model_device(self.model)))).cpu()
            tokens, _ = self._tokens(pixels)
            projected = self.model.image_proj(tokens.to(next(
                self.model.image_proj.parameters(), tokens).dtype)).float()
        side = int(round(projected.shape[1] ** 0.5))
        if side * side != projected.shape[1]:
            raise ValueError(f"{projected.shape[1]} patch tokens do not form a square grid")
        grid = projected.transpose(1, 2).reshape(len(pixels), -1, side, side)
        maps = []
        for k in self.config.scales:
            if k > side:
                continue
            windows = F.avg_pool2d(grid, k, stride=1) if k > 1 else grid
            score = self._state_probability(windows.permute(0, 2, 3, 1))[:, None]
            ones = torch.ones(1, 1, k, k, device=score.device)
            # Each patch: the mean score of the windows that cover it.
            total = F.conv_transpose2d(score, ones)
            count = F.conv_transpose2d(torch.ones_like(score), ones)
            maps.append((total / count)[:, 0])
        patch_map = torch.stack(maps).mean(dim=0).cpu()
        return image, self._upsample(patch_map, pixels.shape[-2:])

    # ---- few-shot
    def fit(self, normal_pixels: torch.Tensor) -> AnomalyDetector:
        """Remember the patch tokens of normal images (the few shots)."""
        if len(normal_pixels) == 0:
            raise ValueError("few-shot anomaly detection needs at least one normal image")
        _, layers = self._tokens(normal_pixels)
        self.memory = [F.normalize(x.reshape(-1, x.shape[-1]), dim=-1) for x in layers]
        return self

    def few_shot(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory-only image scores ``[B]`` and maps ``[B, H, W]``."""
        if self.memory is None:
            raise ValueError("call fit(normal_pixels) before few_shot")
        _, layers = self._tokens(pixels)
        distances = []
        for tokens, memory in zip(layers, self.memory, strict=True):
            cos = F.normalize(tokens, dim=-1) @ memory.to(tokens.device).t()
            distances.append(1 - cos.max(dim=-1).values)
        per_patch = torch.stack(distances).mean(dim=0).cpu()
        side = int(round(per_patch.shape[1] ** 0.5))
        maps = self._upsample(per_patch.reshape(-1, side, side), pixels.shape[-2:])
        return per_patch.max(dim=1).values, maps

    @staticmethod
    def _upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                             align_corners=False)[:, 0]
