"""EfficientNet-Lite0 (Google's edge variant of EfficientNet-B0), dilated for output stride 16 or 8.

Lite drops squeeze-excitation and swish (ReLU6 instead) and fixes the stem and head widths, which
makes it quantise well. Keys follow the PyTorch port of the TF-Lite checkpoints (`_conv_stem`,
`_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`) so that file loads
as-is; the 1280-channel head conv and classifier are left out, as for MobileNetV2.

Two details reproduce the checkpoint's outputs:
- TF "SAME" padding on the strided convolutions (`Conv2dSame`): for an even input side, a 3x3
  stride-2 conv pads 0 before and 1 after, not 1 and 1.
- The checkpoint expects pixels as (x - 127) / 128 on a 0-255 scale; `convert_pretrained` folds
  that into the stem conv and its BatchNorm, so the whole system keeps one (ImageNet mean/std)
  normalisation. The stem pads with the normalised value of pixel 127 (the checkpoint's zero), so
  the fold is exact at the borders too.
Drop-connect (stochastic depth) is not used: no randomness in the forward pass, so a resumed run
replays bit for bit.

Stages: stage1 = block 2 (stride 4, 24 ch), stage2 = block 4 (stride 8, 40 ch),
stage3 = block 10 (stride 16, 112 ch), stage4 = block 15 (320 ch, dilated to 16 or 8).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ciss.errors import CissError
from ciss.manifest import IMAGENET_MEAN, IMAGENET_STD
from ciss.trainer.models.layers import init_weights, stage_features

# (expansion, kernel, first stride, output channels, repeats) of EfficientNet-B0's seven stages.
SETTINGS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
            (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
STAGE_INDICES = (2, 4, 10, 15)
EPS = 1e-3  # TF's BatchNorm epsilon, which the checkpoint was trained with
PIXEL_CENTER, PIXEL_SCALE = 127.0, 128.0  # the checkpoint's input: (255 x - 127) / 128


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EPS, momentum=0.1)


class Conv2dSame(nn.Conv2d):
    """A conv with TF "SAME" padding, computed from the input size (stride 2: asymmetric).

    `pad_value` (per input channel) pads with that value instead of zero: the stem pads with the
    ImageNet-normalised value of the pixel the checkpoint padded with, so folding stays exact.
    """

    def __init__(self, *args: object, pad_value: torch.Tensor | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.register_buffer("pad_value", None if pad_value is None else pad_value.view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        v = self.pad_value
        x = F.pad(x, pads) if v is None else F.pad(x - v, pads) + v
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride > 1:
        return Conv2dSame(cin, cout, kernel, stride, 0, dilation, groups, bias=False)
    return nn.Conv2d(cin, cout, kernel, 1, (kernel - 1) // 2 * dilation, dilation, groups, bias=False)


class MBConvLite(nn.Module):
    """[1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 -> 1x1 project, BN; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, dilation: int):
        super().__init__()
        hidden = cin * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self._expand_conv = _conv(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, dilation, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_residual else y


class EfficientNetLite0(nn.Module):
    """Stem and the 16 MBConv blocks; forward returns stage1..stage4."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16):
            raise CissError(f"efficientnet_lite0 output stride must be 8 or 16, got {output_stride}")
        self.output_stride = output_stride
        # The checkpoint padded its (255 x - 127) / 128 input with 0, i.e. with the pixel value 127/255.
        checkpoint_zero = (PIXEL_CENTER / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, 2, 0, bias=False, pad_value=checkpoint_zero)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        cin, current, dilation = STEM_CHANNELS, 2, 1
        for expansion, kernel, s, cout, repeats in SETTINGS:
            for i in range(repeats):
                stride = s if i == 0 else 1
                if stride == 2 and current == output_stride:
                    stride, dilation = 1, dilation * 2
                current *= stride
                blocks.append(MBConvLite(cin, cout, expansion, kernel, stride, dilation))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = [blocks[i]._bn2.num_features for i in STAGE_INDICES]
        self.out_channels = self.stage_channels[-1]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return stage_features(self._blocks, F.relu6(self._bn0(self._conv_stem(x))), STAGE_INDICES)

    @staticmethod
    def convert_pretrained(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold the checkpoint's (255 x - 127) / 128 input into the stem, for ImageNet-normalised input.

        With x_n = (x - mean) / std, the checkpoint's input is a·x_n + b per channel, a = 255 std / 128,
        b = (255 mean - 127) / 128. conv_W(a·x_n + b) = conv_{W·a}(x_n) + Σ W·b, and the constant is
        absorbed by the BatchNorm's running mean.
        """
        out = dict(state)
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        a = 255.0 * std / PIXEL_SCALE
        b = (255.0 * mean - PIXEL_CENTER) / PIXEL_SCALE
        w = state["_conv_stem.weight"].float()
        out["_conv_stem.weight"] = (w * a[None, :, None, None]).to(state["_conv_stem.weight"].dtype)
        shift = (w * b[None, :, None, None]).sum(dim=(1, 2, 3))
        out["_bn0.running_mean"] = state["_bn0.running_mean"] - shift.to(state["_bn0.running_mean"].dtype)
        return out
