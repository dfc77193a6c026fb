"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

Step 0: plain cross-entropy. Steps t > 0: unbiased cross-entropy (background pixels may be any
old class) + kd_weight · unbiased distillation from the frozen old model (new classes merged into
background), and the new head initialised from the background head (the engine does it when
`init_new_heads` is set). Losses: `losses.unbiased_cross_entropy`, `losses.unbiased_kd`.
"""

from __future__ import annotations

from typing import Any

import torch

from ciss.errors import CissError
from ciss.trainer.methods.base import Method, StepContext, TrainBatch
from ciss.trainer.methods.losses import REDUCTIONS, cross_entropy, unbiased_cross_entropy, unbiased_kd
from ciss.trainer.methods.options import resolve_options


class MiB(Method):
    name = "mib"
    needs_old_model = True  # until `prepare` says otherwise (step 0 has no old model)
    init_new_heads = True
    defaults: dict[str, Any] = {"kd_weight": 10.0, "alpha": 1.0, "reduction": "all"}
    choices: dict[str, tuple[str, ...]] = {"reduction": REDUCTIONS}

    def __init__(self, **options: Any):
        super().__init__(**resolve_options(self.name, self.defaults, options, self.choices))

    def prepare(self, ctx: StepContext) -> None:
        super().prepare(ctx)
        self.needs_old_model = ctx.step > 0
        if ctx.step > 0 and ctx.old_model is None:
            raise CissError(f"method '{self.name}' needs the model of step {ctx.step - 1} to train step {ctx.step}")

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        logits, labels, red = batch.out.logits, batch.labels, self.options["reduction"]
        if batch.old is None:  # step 0
            return {"ce": cross_entropy(logits, labels, red)}
        old = batch.old.logits
        n_old = old.shape[1]
        return {
            "ce": unbiased_cross_entropy(logits, labels, n_old, red),
            # MiB averages the distillation over all pixels, whatever the CE reduction.
            "kd": self.options["kd_weight"] * unbiased_kd(logits, old, alpha=self.options["alpha"]),
        }
