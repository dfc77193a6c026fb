"""MobileNetV2 (Sandler et al., CVPR 2018), dilated for output stride 16 or 8, with torchvision's keys.

Output stride 32 is the classification network as published (no dilation): segmentation trains at 16
or 8 (the config allows those); 32 is there to time the backbone at its own cost (export_speed.py).

Layout (torchvision's, so its IMAGENET1K_V1 file loads as-is): features.0 is the Conv-BN-ReLU6
stem, features.1..17 the inverted residual blocks (`.conv.N`). The 1x1 conv to 1280 channels
(features.18) and the classifier are left out, as DeepLab's MobileNetV2 does: the decoder reads the
320-channel block output, which keeps ASPP's 3x3 branches cheap at full feature resolution.

Stages handed to the decoder are the last block at each resolution:
stage1 = features.3 (stride 4, 24 ch), stage2 = features.6 (stride 8, 32 ch),
stage3 = features.13 (stride 16, 96 ch), stage4 = features.17 (320 ch; stride 32 undilated,
else 16 or 8). A block that would stride past the output stride runs at stride 1 and it and
every later block double their dilation.
"""

from __future__ import annotations

import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.models.layers import init_weights, stage_features
from ciss.trainer.models.mobilenet import ConvBNAct

# (expansion t, output channels c, repeats n, first stride s): the paper's table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
STAGE_INDICES = (3, 6, 13, 17)
EPS = 1e-5  # torchvision's MobileNetV2 uses BatchNorm2d's default


class InvertedResidualV2(nn.Module):
    """[1x1 expand, ReLU6] -> depthwise 3x3, ReLU6 -> 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, dilation: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(cin, hidden, 1, activation=nn.ReLU6, eps=EPS))
        layers += [ConvBNAct(hidden, hidden, 3, stride, dilation, groups=hidden, activation=nn.ReLU6, eps=EPS),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=EPS)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """The `features` trunk up to the 320-channel block; forward returns stage1..stage4."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise CissError(f"mobilenet_v2 output stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, stride=2, activation=nn.ReLU6, eps=EPS)]
        cin, current, dilation = STEM_CHANNELS, 2, 1
        for t, c, n, s in SETTINGS:
            for i in range(n):
                stride = s if i == 0 else 1
                if stride == 2 and current == output_stride:
                    stride, dilation = 1, dilation * 2
                current *= stride
                layers.append(InvertedResidualV2(cin, c, stride, t, dilation))
                cin = c
        self.features = nn.Sequential(*layers)
        self.stage_channels = [layers[i].conv[-1].num_features for i in STAGE_INDICES]
        self.out_channels = self.stage_channels[-1]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return stage_features(self.features, x, STAGE_INDICES)
