"""MobileNetV3-Large, dilated for output stride 16, with torchvision's `features.*` state_dict keys.

Layout (torchvision's, so its ImageNet file loads as-is): features.0 is the Conv-BN-Hardswish stem,
features.1..15 the inverted residual blocks (`.block.N`), features.16 the 1x1 conv to 960 channels.
BatchNorm uses eps 0.001 like the reference recipe but PyTorch's default momentum 0.1, not its
0.01: segmentation schedules are a few thousand iterations, and with 0.01 the running statistics
lag the weights so far that eval-mode predictions collapse (measured on CamVid: sky IoU 0 in
eval mode, 0.78 with batch statistics, after 360 iterations).

Stages handed to the decoder are the last block at each resolution:
stage1 = features.3 (stride 4, 24 ch), stage2 = features.6 (stride 8, 40 ch),
stage3 = features.12 (stride 16, 112 ch), stage4 = features.16 (stride 16 dilated, 960 ch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.models.layers import init_weights, stage_features


class BlockSpec(NamedTuple):
    kernel: int
    expanded: int
    out: int
    se: bool
    activation: str  # "RE" (ReLU) or "HS" (Hardswish)
    stride: int
    dilation: int  # a block with dilation > 1 runs at stride 1 (the dilated variant)


# MobileNetV3-Large (Howard et al. 2019, table 1); the last stage is dilated for output stride 16.
LARGE: tuple[BlockSpec, ...] = (
    BlockSpec(3, 16, 16, False, "RE", 1, 1),
    BlockSpec(3, 64, 24, False, "RE", 2, 1),
    BlockSpec(3, 72, 24, False, "RE", 1, 1),
    BlockSpec(5, 72, 40, True, "RE", 2, 1),
    BlockSpec(5, 120, 40, True, "RE", 1, 1),
    BlockSpec(5, 120, 40, True, "RE", 1, 1),
    BlockSpec(3, 240, 80, False, "HS", 2, 1),
    BlockSpec(3, 200, 80, False, "HS", 1, 1),
    BlockSpec(3, 184, 80, False, "HS", 1, 1),
    BlockSpec(3, 184, 80, False, "HS", 1, 1),
    BlockSpec(3, 480, 112, True, "HS", 1, 1),
    BlockSpec(3, 672, 112, True, "HS", 1, 1),
    BlockSpec(5, 672, 160, True, "HS", 2, 2),
    BlockSpec(5, 960, 160, True, "HS", 1, 2),
    BlockSpec(5, 960, 160, True, "HS", 1, 2),
)
STEM_CHANNELS = 16
LAST_CHANNELS = 960
STAGE_INDICES = (3, 6, 12, 16)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor` without dropping more than 10% (the reference rounding)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BN -> optional activation, indexed 0/1/2 like torchvision's Conv2dNormActivation.

    BN momentum is 0.1 (see the module docstring); `eps` is the reference network's (V3 0.001,
    V2 1e-5), so ImageNet statistics load unchanged.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, dilation: int = 1,
                 groups: int = 1, activation: type[nn.Module] | None = None, eps: float = 0.001):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation, groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps, momentum=0.1)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gating: global mean -> fc1 -> ReLU -> fc2 -> hard sigmoid, multiplied onto the input."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU(inplace=True)
        self.scale_activation = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(s))))


class InvertedResidual(nn.Module):
    """[1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project, residual when shapes allow."""

    def __init__(self, cin: int, spec: BlockSpec):
        super().__init__()
        act = nn.Hardswish if spec.activation == "HS" else nn.ReLU
        stride = 1 if spec.dilation > 1 else spec.stride
        self.use_residual = spec.stride == 1 and cin == spec.out
        layers: list[nn.Module] = []
        if spec.expanded != cin:
            layers.append(ConvBNAct(cin, spec.expanded, 1, activation=act))
        layers.append(ConvBNAct(spec.expanded, spec.expanded, spec.kernel, stride, spec.dilation,
                                groups=spec.expanded, activation=act))
        if spec.se:
            layers.append(SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4)))
        layers.append(ConvBNAct(spec.expanded, spec.out, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV3Large(nn.Module):
    """The `features` trunk only (no classifier); forward returns stage1..stage4."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride != 16:
            raise CissError(f"mobilenet_v3_large supports output stride 16 only, got {output_stride}")
        self.output_stride = output_stride
        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, stride=2, activation=nn.Hardswish)]
        cin = STEM_CHANNELS
        for spec in LARGE:
            layers.append(InvertedResidual(cin, spec))
            cin = spec.out
        layers.append(ConvBNAct(cin, LAST_CHANNELS, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.stage_channels = [LARGE[i - 1].out for i in STAGE_INDICES[:3]] + [LAST_CHANNELS]
        self.out_channels = LAST_CHANNELS
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return stage_features(self.features, x, STAGE_INDICES)
