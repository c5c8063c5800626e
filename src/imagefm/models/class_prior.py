"""An image projection that starts from what an ImageNet classifier already knows.

    features ─┬─► linear ──────────────────────────────────┐
              └─► classifier ─► softmax ─► @ class_embed ──┴─► + ─► image embedding

A locked ImageNet tower (EfficientNet-Lite0) comes with a 1,000-way classifier: for each picture
it says which ImageNet classes it sees. ``class_embed`` holds one vector per class in the joint
space, set (``imagefm.convert.class_prior``) to the text tower's embedding of the class's name, so
the projection's second path maps a picture to the text embedding of what the classifier sees
(a weighted mean of "a photo of a tabby cat", "a photo of an airliner"...). With the text
projection starting as the identity and ``linear`` at zero, the untrained model is already a
zero-shot classifier over everything those class names cover; contrastive training then adds
the linear path (for what ImageNet has no class for: emoji, drawings) and tunes the class vectors.

``projection = "imagenet_prior"`` in a DualEncoderConfig: ``classifier`` is Linear(width, 1000)
with bias (the ImageNet head's weights), ``class_embed`` [1000, embed_dim].
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_CLASSES = 1000


class ClassPriorProjection(nn.Module):
    """``linear(x) + softmax(classifier(x)) @ class_embed`` (see the module docstring)."""

    def __init__(self, width: int, embed_dim: int, num_classes: int = IMAGENET_CLASSES) -> None:
        super().__init__()
        self.linear = nn.Linear(width, embed_dim, bias=False)
        self.classifier = nn.Linear(width, num_classes)
        self.class_embed = nn.Parameter(torch.zeros(num_classes, embed_dim))
        # Zero: the untrained projection is the class prior alone (the builder fills the
        # classifier and the class vectors; a random build stays a well-defined, trainable model).
        nn.init.zeros_(self.linear.weight)
        nn.init.normal_(self.classifier.weight, std=width**-0.5)
        nn.init.zeros_(self.classifier.bias)
        nn.init.normal_(self.class_embed, std=embed_dim**-0.5)

    def class_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's distribution over its classes [B, num_classes]."""
        return self.classifier(features).float().softmax(dim=-1).to(features.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) + self.class_probabilities(features) @ self.class_embed
