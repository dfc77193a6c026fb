"""The method interface: the step loop calls it and knows no method by name.

A method prepares once per step (auxiliary modules, then thresholds or prototypes unless a resumed
step restored them) and then turns one batch of model outputs into named, already weighted loss
terms; the step loop sums, logs and back-propagates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.trainer.methods.losses import cross_entropy
from ciss.trainer.models.outputs import Outputs


@dataclass
class TrainBatch:
    images: torch.Tensor  # N,3,H,W normalised
    labels: torch.Tensor  # N,H,W int64 in model ids for this step (old classes -> 0), 255 ignore
    out: Outputs  # current model
    old: Outputs | None  # frozen previous model (no grad), None at step 0
    epoch: int = 0  # for schedules that change with training progress
    progress: float = 0.0  # iterations done / total, in [0, 1)

    @property
    def old_logits(self) -> torch.Tensor:
        """The previous model's logits: there is one at every step > 0, where `incremental_losses` runs."""
        assert self.old is not None, "no previous model at step 0"
        return self.old.logits

    @property
    def n_old(self) -> int:
        """Channels of the previous model (background included): the classes it must keep."""
        return self.old_logits.shape[1]


@dataclass
class StepContext:
    """What a method may look at once per step, before training starts."""

    step: int
    classmap: ClassMap  # after this step
    n_old: int  # channels of the previous model, background included (0 at step 0)
    model: nn.Module  # the current model (unwrapped)
    old_model: nn.Module | None
    device: torch.device
    # Iterates over (images, labels) of this step's training data, without random augmentation.
    # Calling it again starts a fresh pass. Batches are on `device`.
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    # Sums a tensor over all processes (identity when not distributed); methods that gather
    # statistics (histograms, prototypes) reduce them with it so every rank agrees.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    @property
    def n_new(self) -> int:
        return len(self.classmap) - self.n_old if self.step > 0 else len(self.classmap)


class Method:
    """Base class: step 0 is plain cross-entropy for every softmax method, and a method that distils from the
    previous model refuses to start a later step without it.

    Subclasses set the class attributes and override `incremental_losses` (the terms of a step > 0),
    `features` (what those terms read), and where they need them `setup` (modules sized for the step)
    and `estimate` (statistics from a pass over the data). Options hold at least "reduction".
    """

    name: str = ""
    uses_old_model: bool = False  # at steps > 0 the step loop runs the frozen old model on every batch
    init_new_heads: bool = False  # MiB initialisation of the new head from the background head
    needs_seen_labels: bool = False  # reads the old classes' true labels (data.labels = "seen"), a reference only

    def __init__(self, **options: Any):
        self.options = options
        self.ctx: StepContext | None = None

    # --- once per step -------------------------------------------------------------------------
    def prepare(self, ctx: StepContext, state: dict[str, Any] | None = None) -> None:
        """Before the first batch: set up for `ctx`, restore `state` (a resumed step's), then estimate
        only what it did not hold. One order for every method, so a resumed step never repeats a pass
        over the data."""
        if self.uses_old_model and ctx.step > 0 and ctx.old_model is None:
            raise CissError(f"method '{self.name}' needs the model of step {ctx.step - 1} to train step {ctx.step}")
        self.ctx = ctx
        self.setup(ctx)
        if state is not None:
            self.load_state_dict(state)
        if ctx.step > 0:
            self.estimate(ctx)

    def setup(self, ctx: StepContext) -> None:
        """Size the method's modules and state for `ctx`'s step; no pass over the data."""

    def estimate(self, ctx: StepContext) -> None:
        """At steps > 0: what a pass over `ctx.batches()` gives and neither the restored state nor an
        earlier call holds (thresholds, prototypes)."""

    @property
    def incremental(self) -> bool:
        """Prepared for a step > 0."""
        return self.ctx is not None and self.ctx.step > 0

    @property
    def needs_old_model(self) -> bool:
        """Whether the step loop runs the frozen old model on this step's batches."""
        return self.uses_old_model and self.incremental

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The intermediate features this step's losses read from both models."""
        return self.features() if self.incremental else ()

    def features(self) -> tuple[str, ...]:
        """The intermediate features a step > 0 reads, as the options decide."""
        return ()

    @property
    def activation(self) -> str:
        """What the logits are trained as, "softmax" or "sigmoid" (losses.ACTIVATIONS): a later step
        must train as its old model was trained, or the old model's scores mean something else."""
        return "softmax"

    # --- every batch ---------------------------------------------------------------------------
    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms: `base_losses` without an old model's outputs (step 0)."""
        if batch.old is None:
            return self.base_losses(batch)
        missing = [k for k in self.feature_names if k not in batch.out.features or k not in batch.old.features]
        if missing:
            raise RuntimeError(f"method '{self.name}' needs features {', '.join(missing)} from both models")
        return self.incremental_losses(batch)

    def base_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Step 0's terms: plain cross-entropy, the same for every softmax method."""
        return {"ce": cross_entropy(batch.out.logits, batch.labels, self.options["reduction"])}

    def incremental_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The terms of a step > 0, where `batch.old` holds the frozen old model's outputs."""
        raise NotImplementedError(f"method '{self.name}' has no loss for a batch with old-model outputs")

    def report(self) -> dict[str, Any]:
        """What the method decided for this step (after `prepare`), JSON-able: the step loop logs it and
        writes it into the step manifest under `method_report`. Empty when there is nothing to say."""
        return {}

    # --- modules and resume --------------------------------------------------------------------
    def modules(self) -> nn.ModuleDict:
        """Training-only modules with parameters (optimised with the model, never exported)."""
        return nn.ModuleDict()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.modules().parameters()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-step exactly (tensors only, for weights_only loading)."""
        return {"modules": self.modules().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.modules().load_state_dict(state["modules"])


def saved(t: torch.Tensor | None) -> torch.Tensor:
    """`t` as a checkpoint holds it: a CPU copy, empty for None (weights_only loading takes tensors only)."""
    return torch.zeros(0) if t is None else t.detach().cpu().clone()


def restored(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor `saved` wrote, as float32 on the CPU; None where it stood for None (or is absent)."""
    return None if t is None or t.numel() == 0 else t.detach().float().cpu().clone()
