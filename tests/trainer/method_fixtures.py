"""Small hand-made inputs shared by the method tests: a step with background + 2 old and 2 new classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ciss.classmap import ClassMap
from ciss.trainer.methods.base import StepContext
from ciss.trainer.models.outputs import Outputs

N_OLD, N_TOTAL = 3, 5  # background + 2 old classes, 2 new classes
FEATS = {"stage1": 4, "stage2": 4, "stage3": 6, "stage4": 6, "aspp": 5}


def classmap(step: int) -> ClassMap:
    cm = ClassMap.initial(["a", "b"])
    return cm.extend(["c", "d"]) if step else cm


def outputs(n_classes: int, grad: bool, seed: int, scale: float = 1.0) -> Outputs:
    """Random logits (times `scale`) and a feature per named stage at half resolution."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, n_classes, 8, 8, generator=g) * scale).requires_grad_(grad)
    feats = {k: torch.randn(2, c, 4, 4, generator=g).requires_grad_(grad) for k, c in FEATS.items()}
    feats["logits_lowres"] = torch.randn(2, n_classes, 4, 4, generator=g).requires_grad_(grad)
    return Outputs(logits, feats)


def labels(all_ignored: bool = False) -> torch.Tensor:
    """Background with a block of new class 3, a corner of new class 4 and an ignored first row."""
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, 2:5, 2:5] = 3
    y[1, 5:, 5:] = 4
    y[:, 0] = 255
    return torch.full_like(y, 255) if all_ignored else y


def step0_labels() -> torch.Tensor:
    """`labels()` as step 0 sees them: the new classes folded onto the last old one."""
    y = labels()
    return torch.where(y == 255, y, y.clamp(max=N_OLD - 1))


def images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def context(step: int = 1, old: nn.Module | None = None, batches: Callable | None = None,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> StepContext:
    """A step over three batches of `images`/`labels` (or `batches`), with `old` as the frozen model."""
    data = [(images(i), labels()) for i in range(3)]
    return StepContext(step=step, classmap=classmap(step), n_old=N_OLD if step else 0, model=nn.Identity(),
                       old_model=old if step else None, device=torch.device("cpu"),
                       batches=batches or (lambda: iter(data)), all_reduce=all_reduce)
