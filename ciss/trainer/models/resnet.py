"""ResNet-50/101 backbones whose state_dict keys match torchvision's, so its ImageNet files load as-is.

Dilation follows torchvision's `replace_stride_with_dilation`: a layer whose stride is replaced keeps
the previous dilation in its first block and uses the new (doubled) dilation from its second block on.
"""

from __future__ import annotations

import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.models.features import STAGES
from ciss.trainer.models.layers import init_weights

DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Which of layer2..layer4 trade their stride for dilation, per output stride.
_DILATE: dict[int, tuple[bool, bool, bool]] = {16: (False, False, True), 8: (False, True, True)}


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided/dilated) -> 1x1 expand, plus the identity or a projection."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """Stem + layer1..layer4; forward returns the four layer outputs as stage1..stage4."""

    def __init__(self, depth: int, output_stride: int = 16):
        super().__init__()
        if depth not in DEPTHS:
            raise CissError(f"ResNet depth {depth} is not supported; use one of {sorted(DEPTHS)}")
        if output_stride not in _DILATE:
            raise CissError(f"ResNet output stride {output_stride} is not supported; use 8 or 16")
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes, self._dilation = 64, 1
        blocks = DEPTHS[depth]
        dilate = (False,) + _DILATE[output_stride]
        self.layer1 = self._make_layer(64, blocks[0], 1, dilate[0])
        self.layer2 = self._make_layer(128, blocks[1], 2, dilate[1])
        self.layer3 = self._make_layer(256, blocks[2], 2, dilate[2])
        self.layer4 = self._make_layer(512, blocks[3], 2, dilate[3])
        self.stage_channels = [64 * 4, 128 * 4, 256 * 4, 512 * 4]
        self.out_channels = self.stage_channels[-1]
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Bottleneck(self._inplanes, planes, stride, first_dilation, downsample)]
        self._inplanes = out
        layers += [Bottleneck(out, planes, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        s1 = self.layer1(x)
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        return dict(zip(STAGES, (s1, s2, s3, s4)))


def resnet50(output_stride: int = 16) -> ResNet:
    return ResNet(50, output_stride)


def resnet101(output_stride: int = 16) -> ResNet:
    return ResNet(101, output_stride)
