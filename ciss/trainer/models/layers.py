"""What every backbone and decoder shares: their initialisation and how stage features are collected."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ciss.trainer.models.features import STAGES


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions with zero biases, BatchNorm as the identity: the reference
    networks' initialisation, so a model trained from scratch starts where theirs do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def stage_features(layers: Iterable[nn.Module], x: torch.Tensor, indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Run `layers` in order; the outputs of the layers at `indices` are the STAGES, in order."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in indices:
            out[STAGES[indices.index(i)]] = x
    return out
