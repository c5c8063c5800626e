"""Which module each tower config builds (``model_type``).

    build_vision_tower(EfficientNetLiteConfig())   -> EfficientNetLite   (VisionConfig -> ViT)
    build_text_tower(BertConfig())                  -> BertEncoder        (TextConfig -> ours)

Pretrained towers that PyPI packages ship (EfficientNet-Lite0, all-MiniLM-L6-v2,
multilingual-e5-small) are read into these modules by ``imagefm.convert.towers``.
"""

from __future__ import annotations

from torch import nn

from imagefm.config import BertConfig, EfficientNetLiteConfig, TextConfig, VisionConfig


def build_vision_tower(config: VisionConfig | EfficientNetLiteConfig) -> nn.Module:
    """The image tower module a config describes (``model_type``)."""
    if isinstance(config, EfficientNetLiteConfig):
        from imagefm.models.efficientnet import EfficientNetLite

        return EfficientNetLite(config)
    from imagefm.models.vit import VisionTransformer

    return VisionTransformer(config)


def build_text_tower(config: TextConfig | BertConfig) -> nn.Module:
    """The text tower module a config describes (``model_type``)."""
    if isinstance(config, BertConfig):
        from imagefm.models.bert import BertEncoder

        return BertEncoder(config)
    from imagefm.models.text import TextTransformer

    return TextTransformer(config)
