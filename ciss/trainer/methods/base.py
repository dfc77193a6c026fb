"""The method interface: the engine calls it and knows no method by name.

A method prepares once per step (thresholds, prototypes, auxiliary modules) and then turns one
batch of model outputs into named, already weighted loss terms; the engine sums, logs and
back-propagates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ciss.classmap import ClassMap
from ciss.trainer.models.outputs import Outputs


@dataclass
class TrainBatch:
    images: torch.Tensor  # N,3,H,W normalised
    labels: torch.Tensor  # N,H,W int64 in model ids for this step (old classes -> 0), 255 ignore
    out: Outputs  # current model
    old: Outputs | None  # frozen previous model (no grad), None at step 0
    epoch: int = 0  # for schedules that change with training progress
    progress: float = 0.0  # iterations done / total, in [0, 1)


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
    """Base class. Subclasses set the class attributes and override `losses` (and `prepare`)."""

    name: str = ""
    needs_old_model: bool = False  # the engine runs the frozen old model on every batch
    feature_names: tuple[str, ...] = ()  # intermediate features the method reads (both models)
    init_new_heads: bool = False  # MiB initialisation of the new head from the background head

    def __init__(self, **options: Any):
        self.options = options

    def prepare(self, ctx: StepContext) -> None:
        """Called once per step before the first batch (also when resuming)."""
        self.ctx = ctx

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the method decided for this step (after `prepare`), JSON-able: the engine logs it and
        writes it into the step manifest under `method_report`. Empty when there is nothing to say."""
        return {}

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
