"""IResNet ("LResNet*E-IR"): the ArcFace paper's residual network for 112x112 aligned faces.

* "L" input: the stem is a 3x3 stride-1 convolution (not 7x7 stride 2), so the 112x112 input keeps
  its resolution until the first stage and the last feature map is 7x7.
* "IR" unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride 2 in a stage's first unit) -> BN, plus an
  identity or conv1x1+BN shortcut.
* "E" output: BN2d -> Dropout -> flatten -> Linear(512*7*7 -> D) -> BatchNorm1d(D) with its scale
  fixed at 1 (only the shift is learned), giving the raw embedding.

Single-device code: no distributed calls, no device placement, no autocast. Gradient checkpointing is
a constructor flag and applies per residual stage.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from backbones.common import run_stage

BN_EPS = 1e-5
STAGE_WIDTHS = (64, 128, 256, 512)
LAYOUTS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """The improved residual unit BN-Conv-BN-PReLU-Conv-BN."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return residual + self.shortcut(x)


class EmbeddingHeadE(nn.Module):
    """The "E" output: BN2d -> Dropout -> flatten -> FC -> BN1d (scale fixed at 1)."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        # Fixing the BN1d scale at 1 keeps the embedding's per-dimension scale from being learned away
        # (as in the reference recipe); the parameter stays registered so state_dicts line up.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(x))
        # flatten(x, 1) rather than view(B, -1): keeps the batch dimension symbolic in ONNX exports.
        return self.features(self.fc(torch.flatten(x, 1)))


class IResNet(nn.Module):
    # The repeated unit, for a trainer that compiles block by block (metadata only; see arcface.compiling).
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (IRBlock,)

    def __init__(self, layers: tuple[int, ...], embedding_size: int = 512, dropout: float = 0.0,
                 gradient_checkpointing: bool = False, input_size: int = 112) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"IResNet needs 4 stages of >= 1 unit, got {layers}")
        if input_size % 16 != 0:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.embedding_size = embedding_size
        self.gradient_checkpointing = gradient_checkpointing
        self.stem = nn.Sequential(conv3x3(3, STAGE_WIDTHS[0]), nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS),
                                  nn.PReLU(STAGE_WIDTHS[0]))
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for width, depth in zip(STAGE_WIDTHS, layers):
            blocks = [IRBlock(in_channels, width, stride=2)]
            blocks += [IRBlock(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.head = EmbeddingHeadE(in_channels, input_size // 16, embedding_size, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = run_stage(stage, x, self.gradient_checkpointing)
        return self.head(x)
