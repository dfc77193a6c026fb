"""The contract between a backbone, the decoder and the methods, written once.

A backbone is a module that declares its channels and output stride and maps an image batch to the
feature maps named in `STAGES`. `DeepLabV3` decodes them, and with `features=True` returns them
together with `DECODER` and `LOGITS_LOWRES`. Methods read intermediate features by these names
(PLOP's and GSC's Local POD, GSC's prototypes, IDEC's distillation), so a backbone or decoder that
keeps the names keeps every method working.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

STAGES = ("stage1", "stage2", "stage3", "stage4")  # a backbone's outputs, shallow to deep
STAGE1, STAGE2, STAGE3, STAGE4 = STAGES
DECODER = "aspp"  # the decoder's output, what the heads classify: PLOP's name, whichever decoder made it
LOGITS_LOWRES = "logits_lowres"  # the heads' logits at the decoder's resolution, before upsampling


@runtime_checkable
class Backbone(Protocol):
    """What `DeepLabV3` needs of a backbone (an `nn.Module`); the presets' `BACKBONES` build them."""

    stage_channels: list[int]  # channels of each of STAGES, in order
    out_channels: int  # channels of STAGE4, what the decoder reads
    output_stride: int  # input size over STAGE4's size: 16 or 8

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """N,3,H,W normalised images -> {name in STAGES: N,C,h,w}."""
        ...
