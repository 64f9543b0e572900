"""MobileFaceNet: a 2 M-parameter face embedder for fast experiments and edge deployment.

Depthwise-separable bottlenecks (expand 1x1 -> depthwise 3x3 -> linear 1x1 projection) with PReLU,
and a global depthwise convolution (GDC) head: a 7x7 depthwise convolution over the final feature map
replaces global average pooling so that each spatial position keeps its own weight (face crops are
aligned, so position carries meaning), then a linear layer and BatchNorm1d give the embedding.

``hidden`` sets the expanded (depthwise) widths of the bottlenecks. By default they grow with ``width``;
InsightFace ``arcface_torch``'s MobileFaceNet fixes them at 128/256/512 whatever its ``scale`` (our
``width``), which :data:`INSIGHTFACE_HIDDEN` reproduces: at width 2 both are the same network, at other
widths only the fixed widths load arcface_torch's weights (``mobilefacenet`` and ``mobilefacenet_large``
use them; ``mobilefacenet_s`` keeps its own proportional ones).

Single-device code: no distributed calls, no device placement, no autocast.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from backbones.common import run_stage

# Expanded widths of the bottlenecks (in the order of MobileFaceNet's ``hidden``) as arcface_torch builds
# them (its ``groups`` arguments): independent of the width multiplier.
INSIGHTFACE_HIDDEN = (128, 128, 128, 256, 256, 512, 256)


class ConvBNPReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
        )


class ConvBN(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, padding: int | None = None) -> None:
        padding = kernel // 2 if padding is None else padding
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class Bottleneck(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNPReLU(in_channels, expanded, 1),
            ConvBNPReLU(expanded, expanded, 3, stride, groups=expanded),
            ConvBN(expanded, out_channels, 1),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet with a GDC head; ``width`` scales the channel counts (2 = the 2.06 M variant).

    ``hidden``: the expanded widths of (the stem's residual units when ``blocks[0] > 1``, stage 1's first
    unit, its residual units, stage 2's first unit, its residual units, stage 3's first unit, its
    residual units); ``None`` = proportional to ``width``.
    """

    # The repeated unit, for a trainer that compiles block by block (metadata only; see arcface.compiling).
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (Bottleneck,)

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, gradient_checkpointing: bool = False,
                 blocks: tuple[int, int, int, int] = (1, 4, 6, 2), width: int = 2,
                 hidden: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"MobileFaceNet needs 4 block counts >= 1, got {blocks}")
        if width < 1:
            raise ValueError(f"MobileFaceNet width must be >= 1, got {width}")
        self.embedding_size = embedding_size
        self.gradient_checkpointing = gradient_checkpointing
        c64, c128 = 64 * width, 128 * width
        if hidden is None:
            hidden = (c64, c64, c64, c128, c128, 2 * c128, c128)
        if len(hidden) != 7 or any(h < 1 for h in hidden):
            raise ValueError(f"MobileFaceNet hidden needs 7 widths >= 1, got {hidden}")
        stem: list[nn.Module] = [ConvBNPReLU(3, c64, 3, stride=2)]  # 112 -> 56
        if blocks[0] == 1:
            # 64 groups whatever the width: at width 2 each group maps 2 channels to 2.
            stem.append(ConvBNPReLU(c64, c64, 3, groups=64))
        else:
            stem += [Bottleneck(c64, c64, hidden[0], 1) for _ in range(blocks[0])]
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList([
            # (in, out, expanded, depth, expanded of the residual units)
            self._stage(c64, c64, hidden[1], blocks[1], hidden[2]),  # 56 -> 28
            self._stage(c64, c128, hidden[3], blocks[2], hidden[4]),  # 28 -> 14
            self._stage(c128, c128, hidden[5], blocks[3], hidden[6]),  # 14 -> 7
        ])
        self.conv_sep = ConvBNPReLU(c128, 512, 1)
        # GDC: one 7x7 weight per channel and position, no padding -> 1x1.
        self.gdc = ConvBN(512, 512, 7, groups=512, padding=0)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, expanded: int, depth: int,
               residual_expanded: int) -> nn.Sequential:
        units: list[nn.Module] = [Bottleneck(in_channels, out_channels, expanded, stride=2)]
        units += [Bottleneck(out_channels, out_channels, residual_expanded, 1) for _ in range(depth)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = run_stage(stage, x, self.gradient_checkpointing)
        x = self.gdc(self.conv_sep(x))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))
