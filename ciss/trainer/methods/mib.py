"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

Step 0: plain cross-entropy. Steps t > 0: unbiased cross-entropy (background pixels may be any
old class) + kd_weight · unbiased distillation from the frozen old model (new classes merged into
background), and the new head initialised from the background head (the step loop does it when
`init_new_heads` is set). Losses: `losses.unbiased_cross_entropy`, `losses.unbiased_kd`; with
kd_on_new = false the distillation leaves out the pixels labelled with this step's classes [ours].
"""

from __future__ import annotations

from typing import Any

import torch

from ciss.trainer.methods.base import Method, TrainBatch
from ciss.trainer.methods.losses import REDUCTIONS, outside_new_classes, unbiased_cross_entropy, unbiased_kd
from ciss.trainer.methods.options import resolve_options


class MiB(Method):
    name = "mib"
    uses_old_model = True
    init_new_heads = True
    defaults: dict[str, Any] = {"kd_weight": 10.0, "alpha": 1.0, "kd_on_new": True, "reduction": "all"}
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))

    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        logits, labels, red = batch.out.logits, batch.labels, self.options["reduction"]
        old, n_old = batch.old_logits, batch.n_old
        mask = None if self.options["kd_on_new"] else outside_new_classes(labels, n_old)
        return {
            "ce": unbiased_cross_entropy(logits, labels, n_old, red),
            # MiB averages the distillation over all pixels, whatever the CE reduction.
            "kd": self.options["kd_weight"] * unbiased_kd(logits, old, alpha=self.options["alpha"], mask=mask),
        }
