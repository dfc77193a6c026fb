"""Fine-tuning (FT, the lower bound) and joint training (the upper bound): plain cross-entropy.

FT trains each step on its own labels with nothing against forgetting; new heads keep PyTorch's
default initialisation. "joint" is the same loss, trained on every class in one step; it has its
own name so that reports say which bound a number is.
"""

from __future__ import annotations

from typing import Any

from ciss.trainer.methods.base import Method
from ciss.trainer.methods.losses import REDUCTIONS
from ciss.trainer.methods.options import resolve_options


class FineTuning(Method):
    name = "ft"  # the base class's cross-entropy at every step: no old model, so never incremental losses
    defaults: dict[str, Any] = {"reduction": "all"}
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))


class Joint(FineTuning):
    name = "joint"
