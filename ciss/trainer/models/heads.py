"""The per-step classifier: one 1x1 conv per learning step, outputs concatenated in class-id order.

Keeping a separate conv per step lets a step add classes without touching the old ones' weights
(methods may still train them), and `fused()` folds them into one conv for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ciss.errors import CissError


class IncrementalHead(nn.Module):
    """`heads[s]` scores the classes added at step s; heads[0] includes background at channel 0."""

    def __init__(self, in_channels: int, step_sizes: list[int]):
        super().__init__()
        if not step_sizes or step_sizes[0] < 2 or any(n < 1 for n in step_sizes):
            raise CissError(f"invalid step sizes {step_sizes}: step 0 needs background plus at least "
                            "one class and every later step at least one class")
        self.in_channels = in_channels
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, n, 1) for n in step_sizes)

    @property
    def step_sizes(self) -> list[int]:
        return [h.out_channels for h in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.step_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads], dim=1)

    def add_step(self, n_new: int, init_from_background: bool) -> None:
        """Append a head for `n_new` classes.

        Without `init_from_background` the new conv keeps PyTorch's default (Kaiming-uniform) init.
        With it (MiB): the new classes copy the background weight and, with the background itself,
        get bias b_bg - log(n_new + 1). The n_new + 1 logits then share exactly the old background
        probability, so the new model starts out predicting what the old one did.
        """
        if n_new < 1:
            raise CissError(f"a step must add at least one class, got {n_new}")
        ref = self.heads[0]
        head = nn.Conv2d(self.in_channels, n_new, 1).to(device=ref.weight.device, dtype=ref.weight.dtype)
        if init_from_background:
            with torch.no_grad():
                bias = ref.bias[0] - math.log(n_new + 1)
                head.weight.copy_(ref.weight[0:1].expand_as(head.weight))
                head.bias.copy_(bias.expand(n_new))
                ref.bias[0] = bias
        self.heads.append(head)

    def fused(self) -> nn.Conv2d:
        """One conv with every head's channels in order: identical outputs, a single op to export.

        Built with `skip_init` so exporting mid-run leaves the global RNG, and thus training, untouched.
        """
        ref = self.heads[0]
        conv = nn.utils.skip_init(nn.Conv2d, self.in_channels, self.num_classes, 1,
                                  device=ref.weight.device, dtype=ref.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([h.weight for h in self.heads]))
            conv.bias.copy_(torch.cat([h.bias for h in self.heads]))
        return conv
