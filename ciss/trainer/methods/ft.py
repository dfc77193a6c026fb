"""Fine-tuning (FT, the lower bound) and joint training (the upper bound): plain cross-entropy.

FT trains each step on its own labels with nothing against forgetting; new heads keep PyTorch's
default initialisation. "joint" is the same loss, trained on every class in one step; it has its
own name so that reports say which bound a number is.

`old_labels = "agreed"` turns FT on `data.labels = "seen"` into a reference for pseudo-labelling:
an old class's true label is kept only where the previous model's argmax agrees with it and is
ignored elsewhere, which is the most any confidence gate on that model's calls can hand a step.
"""

from __future__ import annotations

from typing import Any

import torch

from ciss.trainer.methods.base import Method, TrainBatch
from ciss.trainer.methods.losses import REDUCTIONS, agreed_labels, cross_entropy
from ciss.trainer.methods.options import resolve_options

OLD_LABELS = ("true", "agreed")


class FineTuning(Method):
    name = "ft"
    defaults: dict[str, Any] = {"reduction": "all", "old_labels": "true"}
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS, "old_labels": OLD_LABELS}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))
        # Only the gate reads the old model, and it gates the old classes' true labels.
        self.uses_old_model = self.needs_seen_labels = self.options["old_labels"] == "agreed"

    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy on the labels the old model agrees with (reached only when `uses_old_model`)."""
        return {"ce": cross_entropy(batch.out.logits, agreed_labels(batch.labels, batch.old_logits),
                                    self.options["reduction"])}


class Joint(FineTuning):
    name = "joint"
