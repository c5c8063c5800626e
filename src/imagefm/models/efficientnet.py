"""EfficientNet-Lite image tower in plain PyTorch: pixels → conv stem → MBConv blocks → 1x1 head
→ global average pool → one feature vector [B, width].

    stem   3x3/2 conv, BN, ReLU6                                      (32 channels, not scaled)
    blocks MBConv: [1x1 expand, BN, ReLU6] → kxk depthwise, BN, ReLU6 → 1x1 project, BN
           (+ input when stride 1 and channels unchanged); no squeeze-excitation in Lite
    head   1x1 conv, BN, ReLU6 → mean over the grid                   (1280 channels, not scaled)

Convolutions pad as TensorFlow's "same" (the weights were trained that way): the total padding
``max((ceil(n / s) - 1) * s + k - n, 0)`` is split with the extra pixel on the right/bottom.
BatchNorm always normalises with its running statistics (``FrozenBatchNorm2d``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.config import EfficientNetLiteConfig
from imagefm.models.layers import activation

# TF efficientnet_lite_builder: (repeats, kernel, stride, expand ratio, in, out) per stage.
LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def round_channels(channels: int, coefficient: float, divisor: int = 8) -> int:
    """Scale a channel count by the width coefficient, rounded to a multiple of ``divisor``
    (never more than 10% below the exact value), as the TF implementation does."""
    if coefficient == 1.0:
        return channels
    scaled = channels * coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, coefficient: float) -> int:
    return int(math.ceil(coefficient * repeats))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d that always uses its running statistics (an affine map per channel).

    The buffers and parameters carry BatchNorm's names, so checkpoints convert one to one.
    """

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class ConvNorm(nn.Module):
    """Convolution with TF "same" padding, frozen BatchNorm, optional activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, eps: float,
                 act: nn.Module | None, groups: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(cout, eps)
        self.act = act if act is not None else nn.Identity()

    def _same_padding(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel > 1:
            top, bottom = self._same_padding(x.shape[-2])
            left, right = self._same_padding(x.shape[-1])
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.norm(self.conv(x)))


class MBConv(nn.Module):
    """Mobile inverted bottleneck: expand (1x1), depthwise (kxk), project (1x1), residual."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 c: EfficientNetLiteConfig) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = ConvNorm(cin, hidden, 1, 1, c.norm_eps, _act(c.act)) if expand != 1 else None
        self.depthwise = ConvNorm(hidden, hidden, kernel, stride, c.norm_eps, _act(c.act),
                                  groups=hidden)
        self.project = ConvNorm(hidden, cout, 1, 1, c.norm_eps, None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def _act(name: str) -> nn.Module:
    return nn.ReLU6() if name == "relu6" else activation(name)


class EfficientNetLite(nn.Module):
    """The image tower: ``forward(pixels [B, 3, H, W]) -> features [B, width]``."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__()
        c = self.config = config
        self.stem = ConvNorm(c.in_channels, c.stem_channels, 3, 2, c.norm_eps, _act(c.act))
        blocks: list[nn.Module] = []
        channels = c.stem_channels
        for index, (repeats, kernel, stride, expand, _, out) in enumerate(LITE_STAGES):
            out = round_channels(out, c.width_coefficient)
            # Lite keeps the first and last stage's depth fixed (fix_head_stem).
            last = index in (0, len(LITE_STAGES) - 1)
            n = repeats if last else round_repeats(repeats, c.depth_coefficient)
            for i in range(n):
                blocks.append(MBConv(channels, out, kernel, stride if i == 0 else 1, expand, c))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvNorm(channels, c.width, 1, 1, c.norm_eps, _act(c.act))
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal (fan out) as the TF reference initialises convolutions; only used when the
        # tower is trained from scratch (pretrained weights replace it).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The head's output grid [B, width, H/32, W/32]."""
        x = self.stem(pixel_values.to(self.stem.conv.weight.dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixel_values).mean(dim=(-2, -1))
