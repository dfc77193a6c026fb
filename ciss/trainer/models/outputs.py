"""What a segmentation model's forward pass gives: logits and, when asked for, named features.

It lives with the models, not the methods, so a model never imports the code that trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Outputs:
    """One forward pass: full-resolution logits and, when asked for, named intermediate features."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, an `Outputs`, or a dict with 'logits'/'out'."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        for key in ("logits", "out"):
            if key in output:
                return output[key]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
