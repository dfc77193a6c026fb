"""What a config value may be: its TOML type and, where it has one, its range or its choices.

Every setting of every command (`ciss learn`'s configs/defaults.toml, `ciss export`'s and `ciss live`'s
tables, a method's options) is checked by one of these rules, so a wrong value is refused with the same
words wherever it was typed. TOML types are strict: `true` is not an integer, `1.7` is not an integer,
and NaN and infinities are no number of any setting. Torch-free, like ciss/config.py which applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


class _AsGiven:
    """A rule whose valid values are already canonical: `clean` hands them back unchanged."""

    def clean(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Flag(_AsGiven):
    """true or false; 1, "yes" and "true" are not booleans in TOML."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, not {kind_of(value)}"


@dataclass(frozen=True)
class Text(_AsGiven):
    """A string, one of `choices` when given (a callable is read when first needed: presets live in TOML)."""

    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] = ()

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, not {kind_of(value)}"
        choices = self.choices() if callable(self.choices) else self.choices
        if choices and value not in choices:
            return f"must be one of {', '.join(map(repr, choices))}"
        return None


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
class Table(_AsGiven):
    """A free-form table its reader checks (the dataset reader's options)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, dict) else f"must be a table, not {kind_of(value)}"


def rule_for(default: Any, choices: tuple[str, ...] = ()) -> Rule:
    """The rule of a setting of its default's type: a boolean, an integer, a float, else a string (one
    of `choices` when given). What defaults without rules of their own are checked against."""
    if isinstance(default, bool):
        return Flag()
    if isinstance(default, (int, float)):
        return Number(integer=isinstance(default, int))
    return Text(choices)
