"""A four-stage residual backbone (~80k parameters; ~150k with its DeepLab head) for tests and the CPU demo.

Same contract as the real backbones (stage1..stage4 at strides 4, 8, 16, 16 for output stride 16;
4, 8, 8, 8 for 8), so every code path of the trainer runs on it in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.models.features import STAGES
from ciss.trainer.models.layers import init_weights

CHANNELS = (8, 16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class TinyNet(nn.Module):
    """Stride-2 stem, then one block per stage; later stages dilate instead of striding."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16):
            raise CissError(f"tiny backbone output stride must be 8 or 16, got {output_stride}")
        self.output_stride = output_stride
        strides = (2, 2, 2, 1) if output_stride == 16 else (2, 2, 1, 1)
        dilations = (1, 1, 1, 2) if output_stride == 16 else (1, 1, 2, 4)
        self.stem = nn.Sequential(nn.Conv2d(3, CHANNELS[0], 3, 2, 1, bias=False), nn.BatchNorm2d(CHANNELS[0]),
                                  nn.ReLU(inplace=True))
        cins = (CHANNELS[0],) + CHANNELS[:-1]
        self.stages = nn.ModuleList(BasicBlock(cin, cout, s, d)
                                    for cin, cout, s, d in zip(cins, CHANNELS, strides, dilations))
        self.stage_channels = list(CHANNELS)
        self.out_channels = CHANNELS[-1]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[STAGES[i]] = x
        return out
