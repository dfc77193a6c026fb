"""Fine-tuning (FT, the lower bound) and joint training (the upper bound): plain cross-entropy.

FT trains each step on its own labels with nothing against forgetting; new heads keep PyTorch's
default initialisation. "joint" is the same loss, trained on every class in one step; it has its
own name so that reports say which bound a number is.
"""

from __future__ import annotations

from typing import Any

import torch

from ciss.trainer.methods.base import Method, TrainBatch
from ciss.trainer.methods.losses import REDUCTIONS, cross_entropy
from ciss.trainer.methods.options import resolve_options


class FineTuning(Method):
    name = "ft"
    needs_old_model = False
    init_new_heads = False
    defaults: dict[str, Any] = {"reduction": "all"}
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return {"ce": cross_entropy(batch.out.logits, batch.labels, self.options["reduction"])}


class Joint(FineTuning):
    name = "joint"
