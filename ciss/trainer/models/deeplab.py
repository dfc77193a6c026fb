"""The segmentation model: backbone -> decoder -> per-step classifier, logits at input resolution.

Two decoders, chosen by the preset's `decoder`:
- "aspp": DeepLabV3's atrous spatial pyramid pooling plus a 3x3 refinement, on stage4 (stride 16).
- "lraspp": the light head of MobileNetV3's paper (Howard et al. 2019, LR-ASPP): stage4 through a
  1x1 conv gated by its global context, upsampled to stride 8 and added to a 1x1 projection of
  stage2. The paper adds two classifiers' outputs; projecting stage2 into the same width and
  classifying the sum with one head is the same function with the low-level classifier factored
  through that projection, and keeps one per-step head for the methods and MiB's initialisation.
The decoder's output is the feature named `features.DECODER` ("aspp", the name PLOP gave it) in
`Outputs` whichever decoder made it, and it is what the heads classify.

No dropout anywhere, so a resumed run replays bit for bit. The pooling branches have no
BatchNorm (their map is 1x1 per image, which BN cannot normalise at batch size 1), and only
shape-agnostic ops are used (mean over H,W, expand, interpolate to the input's size) so the model
exports to ONNX with dynamic height and width.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ciss.trainer.models.features import DECODER, LOGITS_LOWRES, STAGE2, STAGE4, Backbone
from ciss.trainer.models.heads import IncrementalHead
from ciss.trainer.models.layers import init_weights
from ciss.trainer.models.outputs import Outputs


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=(kernel // 2) * dilation, dilation=dilation,
                                   bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling plus the 3x3 refinement; its output is what the heads classify."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, channels, 1)]
                                      + [conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.refine = conv_bn_relu(channels, channels, 3)
        self.rates = list(rates)
        init_weights(self)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = feats[STAGE4]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, x.shape[2], x.shape[3])
        y = torch.cat([b(x) for b in self.branches] + [pooled], dim=1)
        return self.refine(self.project(y))


class LRASPP(nn.Module):
    """Lite R-ASPP: gated 1x1 on stage4 plus a 1x1 projection of stage2, at stage2's resolution."""

    def __init__(self, high_channels: int, low_channels: int, channels: int):
        super().__init__()
        self.high = conv_bn_relu(high_channels, channels, 1)
        self.gate = nn.Sequential(nn.Conv2d(high_channels, channels, 1), nn.Sigmoid())
        self.low = nn.Conv2d(low_channels, channels, 1)
        init_weights(self)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x, low = feats[STAGE4], feats[STAGE2]
        y = self.high(x) * self.gate(x.mean(dim=(2, 3), keepdim=True))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return y + self.low(low)


class DeepLabV3(nn.Module):
    """The segmentation model of every preset. Build it with `ciss.trainer.models.build_model`.

    `aspp_rates` None selects the LR-ASPP decoder; the attribute keeps the name `aspp` either way,
    so checkpoints and the methods' feature names do not depend on the decoder.
    """

    def __init__(self, backbone: Backbone, step_sizes: list[int], aspp_channels: int,
                 aspp_rates: Sequence[int] | None, preset: str):
        super().__init__()
        self.backbone = backbone
        self.aspp: nn.Module = (LRASPP(backbone.out_channels, backbone.stage_channels[1], aspp_channels)
                                if aspp_rates is None else ASPP(backbone.out_channels, aspp_channels, aspp_rates))
        self.head: nn.Module = IncrementalHead(aspp_channels, list(step_sizes))
        self.preset = preset
        self.output_stride: int = backbone.output_stride
        self.step_sizes: list[int] = list(step_sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.step_sizes)

    @property
    def config(self) -> dict[str, Any]:
        """Plain, JSON-able arguments of `build_model` that rebuild this architecture."""
        return {"preset": self.preset, "output_stride": self.output_stride, "step_sizes": list(self.step_sizes)}

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | Outputs:
        feats = self.backbone(x)
        aspp = self.aspp(feats)
        low = self.head(aspp)
        logits = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not features:
            return logits
        return Outputs(logits, {**feats, DECODER: aspp, LOGITS_LOWRES: low})

    def add_step(self, n_new: int, init_from_background: bool) -> None:
        """Grow the classifier by `n_new` classes (see `IncrementalHead.add_step`)."""
        self.head.add_step(n_new, init_from_background)
        self.step_sizes.append(n_new)

    def fused(self) -> "DeepLabV3":
        """A deep copy whose per-step heads are folded into one conv: same outputs, for export."""
        model = copy.deepcopy(self)
        model.head = self.head.fused()
        return model
