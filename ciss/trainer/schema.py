"""What every key of configs/defaults.toml accepts: its TOML type and its range, in one table.

The flags of `ciss learn`, `--set` and `--config` files are all checked against `SCHEMA` before a
dataset is opened or a file written, so a wrong value costs one line instead of a traceback minutes
into training (or, worse, a step that trained on nothing). TOML types are strict: `true` is not an
integer, `1.7` is not an integer, and NaN and infinities are no number of any setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Protocol


class Rule(Protocol):
    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, worded to follow the key ("must be at least 1"), or None."""

    def clean(self, value: Any) -> Any:
        """A valid `value` in its canonical type (an integer given for a float key becomes a float)."""


def kind_of(value: Any) -> str:
    """A value's TOML type, as a refusal names it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "a table" if isinstance(value, dict) else type(value).__name__


def _number_problem(value: Any, integer: bool) -> str | None:
    """Type and finiteness of a number; Python's bool is an int, but TOML's true is not a number."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, not {kind_of(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, not {kind_of(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


@dataclass(frozen=True)
class Number:
    """An integer or a float between bounds (`above`/`below` exclude the bound itself), or from `choices`."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    choices: tuple[int, ...] = ()

    def problem(self, value: Any) -> str | None:
        wrong = _number_problem(value, self.integer)
        if wrong:
            return wrong
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.low is not None and (value < self.low or self.above and value == self.low):
            return f"must be {'above' if self.above else 'at least'} {_show(self.low)}"
        if self.high is not None and (value > self.high or self.below and value == self.high):
            return f"must be {'below' if self.below else 'at most'} {_show(self.high)}"
        return None

    def clean(self, value: Any) -> Any:
        return value if self.integer else float(value)


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@dataclass(frozen=True)
class Flag:
    """true or false; 1, "yes" and "true" are not booleans in TOML."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, not {kind_of(value)}"

    def clean(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Text:
    """A string, one of `choices` when given (a callable is read when first needed: presets live in TOML)."""

    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] = ()

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, not {kind_of(value)}"
        choices = self.choices() if callable(self.choices) else self.choices
        if choices and value not in choices:
            return f"must be one of {', '.join(map(repr, choices))}"
        return None

    def clean(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class ScaleRange:
    """[low, high] of the random rescaling: 0 < low <= high, and no larger than `limit`, where the
    resized image (and its memory) grows with the square of the factor."""

    limit: float = 16.0

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != 2 \
                or any(_number_problem(v, integer=False) for v in value):
            return "must be two finite numbers [low, high]"
        low, high = value
        if not 0 < low <= high <= self.limit:
            return f"must be [low, high] with 0 < low <= high <= {_show(self.limit)}"
        return None

    def clean(self, value: Any) -> Any:
        return [float(v) for v in value]


@dataclass(frozen=True)
class Table:
    """A free-form table its reader checks (the dataset reader's options)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, dict) else f"must be a table, not {kind_of(value)}"

    def clean(self, value: Any) -> Any:
        return value


@lru_cache(maxsize=1)
def model_presets() -> tuple[str, ...]:
    from ciss.trainer.models import model_presets as presets  # the backbones are models too: imports torch

    return ("auto", *presets())


COUNT = Number(integer=True, low=1)
WEIGHT = Number(low=0)  # learning-rate multipliers, decay, clipping: 0 switches them off
MULTIPLIERS = ("backbone", "backbone_pretrained", "decoder", "head_new", "method")
MULTIPLIERS_NEXT = ("backbone", "decoder", "head_old", "head_new", "method")

# Every key of configs/defaults.toml (tests/trainer/test_validation.py holds the two to the same keys).
SCHEMA: dict[str, Rule] = {
    "seed": Number(integer=True, low=0, high=2**32 - 1),  # numpy's and torch's common seed range
    "model.preset": Text(model_presets),
    "model.output_stride": Number(integer=True, choices=(8, 16)),  # what the backbones support
    "model.pretrained": Text(),  # auto, imagenet, none or a file: checked where the weights are read
    "data.kind": Text(),  # checked by the dataset registry, before anything is read
    "data.root": Text(),
    "data.train_split": Text(),
    "data.eval_split": Text(),
    "data.setting": Text(("overlap", "disjoint")),
    "data.eval_protocol": Text(("mib", "all")),
    "data.options": Table(),
    "train.batch_size": COUNT,
    "train.crop": Number(integer=True, low=1, high=8192),  # the model's output stride is checked once known
    "train.scale": ScaleRange(),
    "train.flip": Flag(),
    "train.epochs": COUNT,
    "train.epochs_next": COUNT,
    "train.iterations": Number(integer=True, low=0),  # 0: the schedule is in epochs
    "train.iterations_next": Number(integer=True, low=0),
    "train.lr": Number(low=0, above=True),
    "train.lr_next": Number(low=0, above=True),
    "train.momentum": Number(low=0, high=1, below=True),
    "train.weight_decay": WEIGHT,
    "train.poly_power": WEIGHT,
    "train.clip_grad_norm": WEIGHT,
    "train.freeze_bn_next": Flag(),
    "train.sync_bn": Flag(),
    "train.amp": Flag(),
    "train.workers": Number(integer=True, low=0, high=256),  # each one is a process
    "train.checkpoint_every": COUNT,
    "train.log_every": COUNT,
    **{f"train.lr_mult.{group}": WEIGHT for group in MULTIPLIERS},
    **{f"train.lr_mult_next.{group}": WEIGHT for group in MULTIPLIERS_NEXT},
    "eval.batch_size": COUNT,
}
